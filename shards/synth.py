"""ToyPEDES: an offline, procedurally drawn text-based person search dataset.

    python -m shards.synth --out DIR_OR_URL [--size tiny|demo|cuhk] [--seed 0]
    python -m shards.synth --raw DIR ...        # CUHK-PEDES raw layout (reid_raw.json + imgs/) for shards.build

An identity is a combination of 9 attribute values over 8 slots (hair style and colour, upper garment type and
colour, lower garment type and colour, shoes, bag, accessory). Identities come in small families that differ by a
single attribute, so retrieval is fine-grained. Images of one identity differ in pose, offset, scale, background,
lighting, noise and partial occlusion. Each image has two captions from varied templates that mention a random
subset of the attributes, so some queries are ambiguous, as real captions are. Splits have disjoint identities.
Everything is a deterministic function of ``--seed``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

from .writer import DatasetWriter, Progress

COLOURS = {
    "black": (25, 25, 28), "white": (235, 235, 230), "grey": (128, 128, 128), "red": (200, 30, 35),
    "blue": (35, 70, 200), "green": (40, 150, 60), "yellow": (235, 205, 40), "purple": (120, 50, 160),
    "orange": (240, 130, 30), "pink": (240, 150, 190), "brown": (115, 75, 40),
}
HAIR_COLOURS = {"black": (20, 20, 20), "brown": (100, 60, 30), "blonde": (225, 195, 110), "grey": (165, 165, 165),
                "red": (170, 60, 30)}

SLOTS: dict[str, list[str]] = {
    "hair_style": ["short", "long", "ponytail", "curly"],
    "hair_colour": list(HAIR_COLOURS),
    "upper_type": ["t-shirt", "shirt", "jacket", "coat", "vest"],
    "upper_colour": list(COLOURS),
    "lower_type": ["trousers", "shorts", "skirt"],
    "lower_colour": list(COLOURS),
    "shoes": ["black", "white", "brown", "red", "blue"],
    "bag": ["none", "backpack", "handbag", "shoulder bag"],
    "accessory": ["none", "hat", "glasses", "scarf"],
}
SLOT_NAMES = list(SLOTS)

SIZES = {  # identities per split and images per identity
    "tiny": dict(train=40, val=12, test=12, images_per_id=3),
    "demo": dict(train=500, val=60, test=300, images_per_id=4),
    "cuhk": dict(train=11003, val=1000, test=1000, images_per_id=3),
}
IMAGE_SIZE = (64, 192)  # (width, height) as drawn; the loader resizes to the configured input size


@dataclass(frozen=True)
class Identity:
    pid: int
    split: str
    attrs: tuple[int, ...]  # one index per slot, in SLOT_NAMES order

    def value(self, slot: str) -> str:
        return SLOTS[slot][self.attrs[SLOT_NAMES.index(slot)]]


def sample_identities(counts: dict[str, int], seed: int) -> list[Identity]:
    """Identities in families of 1-3 that differ by one attribute; all combinations unique across splits."""
    rng = np.random.default_rng([seed, 1])
    seen: set[tuple[int, ...]] = set()
    out: list[Identity] = []
    pid = 1
    for split in ("train", "val", "test"):
        made = 0
        while made < counts[split]:
            base = tuple(int(rng.integers(len(SLOTS[s]))) for s in SLOT_NAMES)
            family = [base]
            for _ in range(int(rng.integers(0, 3))):  # siblings: change exactly one slot of the base
                slot = int(rng.integers(len(SLOT_NAMES)))
                choices = [v for v in range(len(SLOTS[SLOT_NAMES[slot]])) if v != base[slot]]
                sib = list(base)
                sib[slot] = int(rng.choice(choices))
                family.append(tuple(sib))
            for attrs in family:
                if made >= counts[split] or attrs in seen:
                    continue
                seen.add(attrs)
                out.append(Identity(pid, split, attrs))
                pid += 1
                made += 1
    return out


# ---------------------------------------------------------------------------------------------------- drawing
def _shade(rgb, f):
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def draw_person(ident: Identity, rng: np.random.Generator) -> Image.Image:
    W, H = IMAGE_SIZE
    # background: a vertical gradient between two random colours plus a few clutter blocks
    top, bottom = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
    t = np.linspace(0, 1, H)[:, None, None]
    bg = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t) * np.ones((1, W, 1))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = int(rng.integers(0, W)), int(rng.integers(0, H))
        d.rectangle([x0, y0, x0 + int(rng.integers(5, 30)), y0 + int(rng.integers(5, 60))],
                    fill=tuple(int(c) for c in rng.integers(30, 230, 3)))

    s = float(rng.uniform(0.78, 1.0)) * H / 192  # person scale
    cx = W / 2 + float(rng.uniform(-6, 6))
    y0 = float(rng.uniform(2, 12)) + (1 - s * 192 / H) * H * float(rng.uniform(0, 0.6))

    def P(x, y):  # person coordinates (origin top centre, 192 units tall) -> pixels
        return (cx + x * s, y0 + y * s)

    def rect(x0, yy0, x1, yy1, fill):
        (a, b), (c, e) = P(x0, yy0), P(x1, yy1)
        d.rectangle([min(a, c), min(b, e), max(a, c), max(b, e)], fill=fill)

    def poly(points, fill):
        d.polygon([P(x, y) for x, y in points], fill=fill)

    skin = _shade((224, 172, 130), float(rng.uniform(0.7, 1.1)))
    upper = COLOURS[ident.value("upper_colour")]
    lower = COLOURS[ident.value("lower_colour")]
    hair = HAIR_COLOURS[ident.value("hair_colour")]
    shoes = COLOURS[ident.value("shoes")]
    utype, ltype, style = ident.value("upper_type"), ident.value("lower_type"), ident.value("hair_style")
    stride = float(rng.uniform(-8, 8))  # pose: leg stride and arm swing
    swing = float(rng.uniform(-7, 7))
    side = 1 if rng.random() < 0.5 else -1  # which side bags are carried on

    # legs + lower garment
    leg_len = 66
    hip_y, knee_y = 100, 100 + leg_len
    for sx, st in ((-7, -stride), (7, stride)):
        rect(sx - 5 + st * 0.0, hip_y, sx + 5 + st, knee_y, skin)
        rect(sx - 6 + st, knee_y, sx + 6 + st, knee_y + 7, shoes)  # shoes
    if ltype == "trousers":
        for sx, st in ((-7, -stride), (7, stride)):
            poly([(sx - 6, hip_y), (sx + 6, hip_y), (sx + 6 + st, knee_y - 1), (sx - 6 + st, knee_y - 1)], lower)
    elif ltype == "shorts":
        for sx, st in ((-7, -stride), (7, stride)):
            poly([(sx - 7, hip_y), (sx + 7, hip_y), (sx + 7 + st * 0.4, hip_y + 26), (sx - 7 + st * 0.4, hip_y + 26)],
                 lower)
    else:  # skirt
        poly([(-13, hip_y - 2), (13, hip_y - 2), (20, hip_y + 38), (-20, hip_y + 38)], lower)

    # torso + upper garment (coat reaches the thighs; vest leaves the arms bare)
    torso_bottom = 128 if utype == "coat" else 102
    poly([(-16, 40), (16, 40), (14, torso_bottom), (-14, torso_bottom)], upper)
    if utype == "jacket":
        d.line([P(0, 42), P(0, 102)], fill=_shade(upper, 0.45), width=max(1, int(2 * s)))
    if utype == "shirt":
        poly([(-4, 40), (4, 40), (0, 50)], (240, 240, 240))  # collar
    sleeve = {"t-shirt": 20, "vest": 0}.get(utype, 52)
    for sx, sw in ((-20, -swing), (20, swing)):
        rect(sx - 4, 42, sx + 4 + sw * 0.3, 96 + sw * 0.2, skin)  # arm
        if sleeve:
            rect(sx - 5, 41, sx + 5 + sw * 0.3 * sleeve / 52, 41 + sleeve, upper)

    # head, hair, accessories
    (hx0, hy0), (hx1, hy1) = P(-11, 10), P(11, 38)
    hair_top = 4
    if style == "long":
        rect(-13, 8, 13, 60, hair)
    elif style == "ponytail":
        rect(10, 14, 17, 50, hair)
    d.ellipse([hx0, hy0, hx1, hy1], fill=skin)
    if style == "curly":
        for k in range(7):
            (a, b) = P(-12 + k * 4, 9 + (k % 2) * 3)
            d.ellipse([a - 4 * s, b - 4 * s, a + 4 * s, b + 4 * s], fill=hair)
    else:
        (a, b), (c, e) = P(-12, hair_top + 4), P(12, 22)
        d.chord([a, b, c, e + 10 * s], 180, 360, fill=hair)
    acc = ident.value("accessory")
    if acc == "hat":
        rect(-15, 10, 15, 14, (60, 40, 30))
        rect(-10, 0, 10, 11, (60, 40, 30))
    elif acc == "glasses":
        rect(-9, 21, -2, 25, (10, 10, 10))
        rect(2, 21, 9, 25, (10, 10, 10))
    elif acc == "scarf":
        rect(-14, 36, 14, 46, (150, 20, 60) if ident.value("upper_colour") != "red" else (230, 200, 40))

    bag = ident.value("bag")
    if bag == "backpack":
        rect(side * 14, 46, side * 22, 92, (50, 50, 60))
        d.line([P(-10, 42), P(10, 42)], fill=(50, 50, 60), width=max(1, int(3 * s)))
    elif bag == "handbag":
        rect(side * 20, 90, side * 30, 106, (150, 40, 40))
    elif bag == "shoulder bag":
        d.line([P(-side * 14, 42), P(side * 18, 96)], fill=(90, 60, 30), width=max(1, int(3 * s)))
        rect(side * 14, 92, side * 28, 112, (90, 60, 30))

    # occlusion: a foreground object over a random part of the person
    if rng.random() < 0.3:
        ow, oh = int(W * rng.uniform(0.3, 0.7)), int(H * rng.uniform(0.1, 0.3))
        ox, oy = int(rng.integers(-ow // 2, W - ow // 2)), int(rng.integers(H // 3, H - oh // 2))
        d.rectangle([ox, oy, ox + ow, oy + oh], fill=tuple(int(c) for c in rng.integers(20, 235, 3)))

    # lighting and sensor noise
    arr = np.asarray(img).astype(np.float32)
    arr = arr * float(rng.uniform(0.6, 1.3)) + float(rng.uniform(-20, 20))
    arr += rng.normal(0, float(rng.uniform(0, 10)), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------- captions
SUBJECTS = ["A person", "A pedestrian", "The person", "This individual", "Someone", "A young person",
            "The pedestrian"]


def _phrases(ident: Identity) -> dict[str, list[str]]:
    """For each slot group, the ways a caption may describe it (the clause keeps commas out: IVT splits on them)."""
    hs, hc = ident.value("hair_style"), ident.value("hair_colour")
    hair = {"short": f"short {hc} hair", "long": f"long {hc} hair", "ponytail": f"{hc} hair in a ponytail",
            "curly": f"curly {hc} hair"}[hs]
    ut, uc = ident.value("upper_type"), ident.value("upper_colour")
    lt, lc = ident.value("lower_type"), ident.value("lower_colour")
    art = "an" if uc[0] in "aeiou" else "a"
    lower = f"a {lc} skirt" if lt == "skirt" else f"{lc} {lt}"
    out = {
        "hair": [f"has {hair}", f"with {hair}"],
        "upper": [f"is wearing {art} {uc} {ut}", f"wears {art} {uc} {ut}", f"is dressed in {art} {uc} {ut}"],
        "lower": [f"wears {lower}", f"is in {lower}", f"is wearing {lower}"],
        "shoes": [f"wears {ident.value('shoes')} shoes", f"has {ident.value('shoes')} shoes on"],
    }
    bag = ident.value("bag")
    out["bag"] = ["carries no bag", "has nothing in the hands"] if bag == "none" else \
        [f"carries a {bag}", f"has a {bag}", f"is carrying a {bag}"]
    acc = ident.value("accessory")
    if acc != "none":
        out["accessory"] = {"hat": ["wears a hat", "has a hat on"], "glasses": ["wears glasses", "has glasses"],
                            "scarf": ["wears a scarf", "has a scarf around the neck"]}[acc]
    return out


def make_caption(ident: Identity, rng: np.random.Generator) -> str:
    phrases = _phrases(ident)
    groups = list(phrases)
    k = int(rng.integers(3, len(groups) + 1))
    chosen = [groups[i] for i in sorted(rng.choice(len(groups), size=k, replace=False))]
    if rng.random() < 0.5:
        rng.shuffle(chosen)
    clauses = [str(rng.choice(phrases[g])) for g in chosen]
    subject = str(rng.choice(SUBJECTS))
    # 1-3 sentences; clauses within a sentence joined by ", " and " and "
    n_sent = min(len(clauses), int(rng.integers(1, 4)))
    cuts = sorted(rng.choice(np.arange(1, len(clauses)), size=n_sent - 1, replace=False)) if n_sent > 1 else []
    parts, start = [], 0
    for cut in list(cuts) + [len(clauses)]:
        parts.append(clauses[start:cut])
        start = cut
    sentences = []
    for i, part in enumerate(parts):
        subj = subject if i == 0 else str(rng.choice(["The person", "This person", "They"]))
        if subj == "They":
            part = [p.replace("wears ", "wear ").replace("has ", "have ").replace("carries ", "carry ")
                    .replace("is ", "are ") for p in part]
        body = part[0] if len(part) == 1 else ", ".join(part[:-1]) + " and " + part[-1]
        sentences.append(f"{subj} {body}.")
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------------- dataset
def render_image(args) -> tuple[bytes, list[str]]:
    ident, j, seed = args
    rng = np.random.default_rng([seed, 2, ident.pid, j])
    img = draw_person(ident, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    captions = [make_caption(ident, rng) for _ in range(2)]
    return buf.getvalue(), captions


def _tasks(idents, images_per_id, seed):
    return [(ident, j, seed) for ident in idents for j in range(images_per_id)]


def generate(out: str | None = None, raw: str | None = None, size: str = "tiny", seed: int = 0,
             train: int | None = None, val: int | None = None, test: int | None = None,
             images_per_id: int | None = None, shard_size: int = 1000, min_shards: int = 8, workers: int = 1,
             progress: bool = True, group_ids: bool = False) -> dict:
    """Generate ToyPEDES as shards at ``out`` and/or in the CUHK-PEDES raw layout at ``raw``; ``group_ids``
    writes the train shards by identity (as ``shards.build --group-ids``)."""
    if not out and not raw:
        raise ValueError("give out (shards) and/or raw (CUHK-PEDES layout)")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    spec = dict(SIZES[size])
    for k, v in (("train", train), ("val", val), ("test", test), ("images_per_id", images_per_id)):
        if v is not None:
            spec[k] = v
    idents = sample_identities({s: spec[s] for s in ("train", "val", "test")}, seed)
    train_ids = {ident.pid: i for i, ident in enumerate(i for i in idents if i.split == "train")}
    by_split = {s: [i for i in idents if i.split == s] for s in ("train", "val", "test")}
    ipi = spec["images_per_id"]
    pool = Pool(workers) if workers > 1 else None
    imap = pool.imap if pool else map

    tasks = {split: _tasks(by_split[split], ipi, seed) for split in by_split}
    grouped: dict = {}
    if group_ids and out:
        from .build import group_by_identity

        tasks["train"], counts, extras = group_by_identity(tasks["train"], lambda t: t[0].pid, lambda t: 2,
                                                           seed, shard_size, min_shards)  # make_caption x 2
        grouped = {"shard_counts": counts, "shard_extras": extras}

    def rendered(split):
        return zip(tasks[split], imap(render_image, tasks[split]))

    summary = {"size": size, "seed": seed, **spec}
    try:
        if raw:
            os.makedirs(os.path.join(raw, "imgs"), exist_ok=True)
            records = []
            for split in ("train", "val", "test"):
                prog = Progress(f"synth-raw/{split}", len(by_split[split]) * ipi) if progress else None
                for (ident, j, _), (data, captions) in rendered(split):
                    rel = f"synth/{ident.pid:06d}_{j:02d}.jpg"
                    os.makedirs(os.path.dirname(os.path.join(raw, "imgs", rel)), exist_ok=True)
                    with open(os.path.join(raw, "imgs", rel), "wb") as f:
                        f.write(data)
                    records.append({"split": split, "id": ident.pid, "file_path": rel, "captions": captions,
                                    "processed_tokens": [c.lower().rstrip(".").split() for c in captions]})
                    if prog:
                        prog.update()
            with open(os.path.join(raw, "reid_raw.json"), "w") as f:
                json.dump(records, f)
        if out:
            def samples(split):
                for n, ((ident, j, _), (data, captions)) in enumerate(rendered(split)):
                    yield {"__key__": f"{split}-{n:08d}", "jpg": data, "json": {
                        "pid": ident.pid, "train_id": train_ids.get(ident.pid, -1), "captions": captions,
                        "path": f"synth/{ident.pid:06d}_{j:02d}.jpg",
                        "attributes": {s: ident.value(s) for s in SLOT_NAMES}}}

            with DatasetWriter(out, dataset="toypedes", shard_size=shard_size, min_shards=min_shards,
                               progress=progress) as w:
                for split in ("train", "val", "test"):
                    n = len(by_split[split]) * ipi
                    layout = grouped if split == "train" else {}
                    w.write_split(split, samples(split), n, stats={
                        "images": n, "captions": 2 * n, "ids": len(by_split[split]),
                        **({"layout": "by_identity"} if layout else {})}, **layout)
                return w.publish(extra={"num_train_ids": len(train_ids), "synth": summary})
    finally:
        if pool:
            pool.close()
            pool.join()
    return {"dataset": "toypedes", "num_train_ids": len(train_ids), "synth": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="shard output directory or fsspec URL")
    ap.add_argument("--raw", help="also/instead write the CUHK-PEDES raw layout (reid_raw.json + imgs/) here")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES),
                    help="; ".join(f"{k}: {v['train']}/{v['val']}/{v['test']} ids x {v['images_per_id']} images"
                                   for k, v in SIZES.items()))
    ap.add_argument("--seed", type=int, default=0)
    for split in ("train", "val", "test"):
        ap.add_argument(f"--{split}-ids", type=int, dest=split, help=f"override the number of {split} identities")
    ap.add_argument("--images-per-id", type=int)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--min-shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="processes that draw images")
    ap.add_argument("--group-ids", action="store_true",
                    help="write the train shards by identity, as data.sampler=identity needs (shards.build --group-ids)")
    args = ap.parse_args(argv)
    if not args.out and not args.raw:
        ap.error("give --out and/or --raw")
    info = generate(args.out, args.raw, args.size, args.seed, args.train, args.val, args.test, args.images_per_id,
                    args.shard_size, args.min_shards, args.workers, group_ids=args.group_ids)
    if "splits" in info:
        from .build import summarize
        print(summarize(info))
    print("wrote " + " and ".join(x for x in (args.out, args.raw) if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
