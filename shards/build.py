"""Convert a raw text-based person search dataset into WebDataset shards.

    python -m shards.build --dataset cuhk-pedes --root /data/CUHK-PEDES --out s3://bucket/cuhk-pedes
    python -m shards.build --dataset jsonl --root corpus.jsonl --out s3://bucket/mals   # any image-text corpus

Generic corpora (jsonl, csv, WebDataset tars) convert streaming, in parallel and resumably: shards/corpus.py.

One sample per image: the original image bytes (``jpg``/``png``/...) and a ``json`` record with all captions, the
original person id, the contiguous train id (train split; -1 elsewhere) and the image's relative path; with
``--attributes FILE`` (IVT's attribute annotation, ``cuhk_pedes_att.json`` layout) also ``caption_attributes``: per caption,
its attribute phrases (IVT's word-level texts). Train records
are written in a seeded shuffled order (``--seed``), so no shard holds one identity's images (annotation files are
often grouped by identity); val and test keep annotation order (the gallery order breaks ties).

``--caption-rule ivt`` treats long captions as IVT's ICFG-PEDES and RSTPReid loaders do (shards/readers.py), for
reproducing IVT; the default keeps every caption as written.

``--group-ids`` writes the train split by identity instead (what ``data.sampler=identity``, IVT's identity-sampled
batches, needs): identities in a seeded random order, each identity's images together and never split between
shards, and each shard's per-identity image and caption counts (``id_counts``) in the manifest.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from .cli import add_verbose, at_least, run_command
from .corpus import KINDS, convert_corpus, shared_ids_note
from .readers import CAPTION_RULES, FORMATS, IVT_RULE_DATASETS, BadRecord, RawRecord, load_image, read_annotations
from .writer import DatasetWriter, group_shard_counts


def split_stats(records: list[RawRecord]) -> dict:
    return {
        "images": len(records),
        "captions": sum(len(r.captions) for r in records),
        "ids": len({r.pid for r in records}),
    }


def read_attributes(file: str) -> dict[tuple[str, str], list[str]]:
    """IVT's attribute annotation (``cuhk_pedes_att.json``: ``{split: [{"file_path", "captions", "att": {name:
    phrase}, ...}]}``, one item per (image, caption)) -> {(image path, caption): [phrase, ...]} in the file's order.
    Errors name the file, the split and the item."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BadRecord(file, None, f"cannot read the attribute file: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise BadRecord(file, None, "an attribute file maps split names to lists of items ({'train': [...], ...})")
    out: dict[tuple[str, str], list[str]] = {}
    for split, items in data.items():
        for i, item in enumerate(items):
            where = f"{split}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("file_path"), str) or \
                    not isinstance(item.get("captions"), str):
                raise BadRecord(file, None, f"item {where} needs a file_path string and a captions string")
            att = item.get("att", {})
            if not isinstance(att, dict) or not all(isinstance(v, str) for v in att.values()):
                raise BadRecord(file, None, f"item {where} ({item['file_path']}): att must map attribute names to "
                                            f"phrases, got {type(att).__name__}")
            out[(item["file_path"], item["captions"].strip())] = [v for v in att.values()]
    return out


def group_by_identity(records: list, pid_of, caption_count, seed: int, shard_size: int, min_shards: int):
    """``records`` reordered by identity (identities and each identity's images in a seeded random order), the
    samples per shard (shards never split an identity) and each shard's manifest extras: ``id_counts``, one
    ``[images, captions]`` per identity of the shard, what ``data.sampler=identity`` counts its batches from."""
    rng = random.Random(seed)
    groups: dict = defaultdict(list)
    for rec in records:
        groups[pid_of(rec)].append(rec)
    pids = list(groups)
    rng.shuffle(pids)
    ordered_groups = []
    for pid in pids:
        members = groups[pid]
        rng.shuffle(members)
        ordered_groups.append(members)
    ranges = group_shard_counts([len(g) for g in ordered_groups], shard_size, min_shards)
    counts = [sum(len(g) for g in ordered_groups[a:b]) for a, b in ranges]
    extras = [{"id_counts": [[len(g), sum(caption_count(r) for r in g)] for g in ordered_groups[a:b]]}
              for a, b in ranges]
    return [r for g in ordered_groups for r in g], counts, extras


def convert(dataset: str, root: str, out: str, shard_size: int = 1000, min_shards: int = 8,
            skip_bad: bool = False, workers: int = 8, log=None, seed: int = 0, attributes: str | None = None,
            group_ids: bool = False, val_from_train: float = 0.0, caption_rule: str = "as-is") -> dict:
    """Validate everything, then write and publish. Raises ``BadRecord`` (nothing published) on bad input.
    ``val_from_train``: the fraction of train identities (at least one, never all) moved, with all their images,
    into a val split, for datasets published without one (ICFG-PEDES); chosen by ``seed``. ``caption_rule="ivt"``:
    IVT's loader's treatment of long captions (``shards.readers.IVT_RULE_DATASETS``), counted per split in the
    manifest's ``caption_rule``."""
    log = log or sys.stderr
    if not 0.0 <= val_from_train < 1.0:
        raise ValueError(f"--val-from-train must be a fraction in [0, 1), got {val_from_train}")
    fmt = FORMATS[dataset]
    file = os.path.join(root, fmt.annotation_file)
    phrases = read_attributes(attributes) if attributes else None
    records, skipped = read_annotations(dataset, root, skip_bad=skip_bad, caption_rule=caption_rule)
    rule: dict = {}
    if caption_rule != "as-is":  # counted in the annotation file's splits (before --val-from-train)
        counts: dict = {split: {"cut": 0, "left_out": 0, "images_left_out": 0} for split in fmt.splits}
        for rec in records:
            c = counts[rec.split]
            c["cut"] += rec.cut
            c["left_out"] += rec.left_out
            c["images_left_out"] += not rec.captions
        rule = {"name": caption_rule, "splits": counts}
        records = [r for r in records if r.captions]
        names = {"cut": "caption(s) cut", "left_out": "pair(s) left out", "images_left_out": "image(s) left out"}
        changed = "; ".join(f"{split}: " + (", ".join(f"{n} {names[what]}" for what, n in c.items() if n) or
                                            "nothing changed") for split, c in counts.items())
        print(f"caption rule {caption_rule} ({dataset}: IVT's loader {IVT_RULE_DATASETS[dataset]}): {changed}",
              file=log)

    # Check every image before writing anything: a bad image found half-way would leave a partial dataset.
    def check(rec):
        try:
            load_image(root, rec, file)
            return None
        except BadRecord as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(check, records))
    good = []
    for rec, problem in zip(records, problems):
        if problem is None:
            good.append(rec)
        elif skip_bad:
            skipped.append(problem)
        else:
            raise problem
    for s in skipped:
        print(f"skipped: {s}", file=log)
    if skipped:
        print(f"skipped {len(skipped)} bad record(s)", file=log)

    # One sample per image: records naming the same image (some annotation files list an image once per caption
    # pair) are merged; the gallery must hold each image once.
    by_split: dict[str, list[RawRecord]] = defaultdict(list)
    by_path: dict[str, RawRecord] = {}
    for rec in good:
        first = by_path.get(rec.path)
        if first is None:
            merged = RawRecord(rec.index, rec.split, rec.pid, rec.path, list(rec.captions))
            by_path[rec.path] = merged
            by_split[rec.split].append(merged)
        elif (first.split, first.pid) != (rec.split, rec.pid):
            raise BadRecord(file, rec.index, f"image listed again with split/id {rec.split}/{rec.pid}, but record "
                                             f"#{first.index} gives {first.split}/{first.pid}", rec.path)
        else:
            first.captions.extend(c for c in rec.captions if c not in first.captions)
    if not by_split.get("train"):
        raise BadRecord(file, None, "no usable train records")
    carved = {}
    if val_from_train:
        if by_split.get("val"):
            raise BadRecord(file, None, f"--val-from-train: {dataset} has its own val split "
                                        f"({len(by_split['val'])} images); leave the option out")
        pids = sorted({r.pid for r in by_split["train"]})
        if len(pids) < 2:
            raise BadRecord(file, None, f"--val-from-train: {len(pids)} train identity, nothing to carve a val split "
                                        "from")
        chosen = set(random.Random(f"{seed}-val").sample(pids, min(len(pids) - 1,
                                                                    max(1, round(val_from_train * len(pids))))))
        by_split["val"] = [r for r in by_split["train"] if r.pid in chosen]
        by_split["train"] = [r for r in by_split["train"] if r.pid not in chosen]
        carved = {"fraction": val_from_train, "ids": len(chosen), "images": len(by_split["val"]), "seed": seed}
        print(f"val from train: {len(chosen)} of {len(pids)} identities ({len(by_split['val'])} images), "
              "identity-disjoint from train", file=log)
    train_pids = sorted({r.pid for r in by_split["train"]})
    train_id = {pid: i for i, pid in enumerate(train_pids)}  # contiguous 0..N-1 for the ID classifier
    layout: dict = {}
    if group_ids:
        by_split["train"], counts, extras = group_by_identity(by_split["train"], lambda r: r.pid,
                                                              lambda r: len(r.captions), seed, shard_size, min_shards)
        layout = {"shard_counts": counts, "shard_extras": extras}
    else:
        random.Random(seed).shuffle(by_split["train"])
    if phrases is not None:
        matched = sum(1 for r in good for c in r.captions if (r.path, c.strip()) in phrases)
        total = sum(len(r.captions) for r in good)
        if matched == 0:
            raise BadRecord(attributes, None, f"no caption of {file} is in the attribute file (items are matched by "
                                              "file_path, relative to imgs/, and caption text)")
        print(f"attributes: {matched} of {total} captions have attribute phrases ({attributes})", file=log)

    # the benchmarks' evaluation splits share no person with train; an edited annotation file might
    shared = {split: len({r.pid for r in recs} & train_id.keys()) for split, recs in by_split.items()
              if split != "train"}
    for split, n in shared.items():
        if n:
            ids = len({r.pid for r in by_split[split]})
            print(f"warning: {shared_ids_note(split, {'ids_in_train': n, 'ids': ids})}", file=log)

    def samples(split: str):
        for i, rec in enumerate(by_split[split]):
            data, ext = load_image(root, rec, file)
            meta = {
                "pid": rec.pid,
                "train_id": train_id.get(rec.pid, -1) if split == "train" else -1,
                "captions": rec.captions,
                "path": rec.path,
            }
            if phrases is not None:  # per caption; [] where the file has none (the word level falls back)
                meta["caption_attributes"] = [phrases.get((rec.path, c.strip()), []) for c in rec.captions]
            yield {"__key__": f"{split}-{i:08d}", ext: data, "json": meta}

    with DatasetWriter(out, dataset=dataset, shard_size=shard_size, min_shards=min_shards) as writer:
        for split in (*fmt.splits, *(["val"] if carved and "val" not in fmt.splits else [])):
            if by_split.get(split):
                grouped = layout if split == "train" else {}
                stats = {**split_stats(by_split[split]), **({"layout": "by_identity"} if grouped else {})}
                if split != "train":
                    stats["ids_in_train"] = shared[split]
                writer.write_split(split, samples(split), len(by_split[split]), stats=stats, **grouped)
        return writer.publish(extra={
            "num_train_ids": len(train_pids),
            "source": os.path.abspath(root),
            "num_skipped": len(skipped),
            "skipped": [s.as_dict() for s in skipped],
            **({"val_from_train": carved} if carved else {}),
            **({"caption_rule": rule} if rule else {}),
        })


def summarize(manifest: dict) -> str:
    lines = [f"{manifest['dataset']}: {manifest.get('num_train_ids', '?')} train ids, "
             f"{manifest.get('num_skipped', 0)} skipped record(s)"]
    lines.append(f"  {'split':<8}{'images':>9}{'captions':>10}{'ids':>7}{'shards':>8}{'MiB':>9}")
    for split, info in manifest["splits"].items():
        mib = sum(s["bytes"] for s in info["shards"]) / 2**20
        lines.append(f"  {split:<8}{info['images']:>9}{info['captions']:>10}{info['ids']:>7}"
                     f"{len(info['shards']):>8}{mib:>9.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(FORMATS) + list(KINDS),
                    help="a raw dataset's format, or a generic image-text corpus: jsonl | csv (one record per "
                         "image: image, caption or captions, optional person_id and split) | wds (existing "
                         "WebDataset tars with jpg + txt/json)")
    ap.add_argument("--root", required=True, help="directory holding the annotation JSON and imgs/; for a corpus "
                                                  "the .jsonl/.csv file, or the folder/prefix of .tar files")
    ap.add_argument("--work-dir", help="corpora: the folder of the resumable conversion's plan and progress "
                                       "(default ~/.cache/tbps/corpus/<hash of root and out>)")
    ap.add_argument("--out", required=True, help="output directory or fsspec URL (e.g. s3://bucket/prefix)")
    ap.add_argument("--shard-size", type=at_least(1), default=1000, help="max samples (images) per shard")
    ap.add_argument("--min-shards", type=at_least(1), default=8,
                    help="at least this many shards per split, so every rank x loader worker gets work")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad records (listed in the manifest) instead of "
                                                            "stopping")
    ap.add_argument("--workers", type=at_least(1), default=8, help="threads that check images (corpora: processes that "
                                                           "write shards)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order of the train records")
    ap.add_argument("--attributes", help="IVT's attribute annotation JSON (cuhk_pedes_att.json layout): stores each "
                                         "caption's attribute phrases for IVT's word-level texts")
    ap.add_argument("--group-ids", action="store_true",
                    help="write the train split by identity (shards never split an identity, per-identity counts "
                         "in the manifest), as data.sampler=identity (IVT's identity-sampled batches) needs")
    ap.add_argument("--caption-rule", choices=CAPTION_RULES, default="as-is",
                    help="ivt: treat long captions as IVT's loaders do, to reproduce IVT (icfg-pedes: a caption of "
                         "more than 90 processed tokens is cut before its 91st; rstpreid: a pair whose caption has "
                         "more than 90 words is left out of every split); the other methods read them as-is")
    ap.add_argument("--val-from-train", type=float, default=0.0, metavar="FRACTION",
                    help="carve a val split from this fraction of the train identities (identity-disjoint; for "
                         "datasets without a val split, e.g. ICFG-PEDES: 0.05)")
    add_verbose(ap)
    args = ap.parse_args(argv)
    if not 0.0 <= args.val_from_train < 1.0:
        ap.error(f"--val-from-train must be a fraction in [0, 1), got {args.val_from_train}")

    if args.dataset in KINDS:
        for flag, given in (("--attributes", args.attributes), ("--group-ids", args.group_ids),
                            ("--val-from-train", args.val_from_train),
                            ("--caption-rule", args.caption_rule != "as-is")):
            if given:
                ap.error(f"{flag} applies to the raw datasets ({', '.join(sorted(FORMATS))}), not to a {args.dataset} "
                         "corpus (give records a split instead)")

        def run() -> int:
            manifest = convert_corpus(args.dataset, args.root, args.out, args.shard_size, args.min_shards,
                                      args.skip_bad, args.workers, args.work_dir)
            print(summarize(manifest))
            print(f"published {args.out}")
            return 0
        return run_command("python -m shards.build", run, args.verbose,
                           after=f"nothing was published to {args.out} (run the same command again to resume)")

    def run() -> int:
        manifest = convert(args.dataset, args.root, args.out, args.shard_size, args.min_shards, args.skip_bad,
                           args.workers, seed=args.seed, attributes=args.attributes, group_ids=args.group_ids,
                           val_from_train=args.val_from_train, caption_rule=args.caption_rule)
        print(summarize(manifest))
        print(f"published {args.out}")
        return 0
    return run_command("python -m shards.build", run, args.verbose, after=f"nothing was published to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
