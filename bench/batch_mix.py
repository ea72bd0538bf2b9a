"""Batch composition: same-identity pairs per training batch, tbps's stream against a global shuffle.

Contrastive losses (SDM, ITC, CMPM) take their positives from identity labels inside the batch, so a stream whose
batches hold far more same-identity pairs than a global shuffle trains a different objective. This builds a
CUHK-PEDES-shaped raw dataset (identities with ~3 images, 2 captions each, the annotation grouped by identity, as
real annotation files are), converts it, and counts same-identity pairs (i < j, same person id) per batch for:

- ``tbps``: ``shards.build`` (train records in a seeded shuffled order) + ``data.sampling=pairs`` (pair passes);
- ``annotation order``: the same records written in annotation order, same stream (the old behaviour's shards);
- ``global shuffle``: a uniformly random permutation of all pairs (IRRA's DataLoader(shuffle=True)).

    python bench/batch_mix.py            # 3,000 identities, 9,000 images, 18,000 pairs, batch 64
    python bench/batch_mix.py --quick    # 300 identities (CI)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
from itertools import combinations

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402


def write_raw(root: str, ids: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (90, 60, 30)).save(buf, format="JPEG")
    records = []
    for p in range(ids):
        for j in range(rng.choice([2, 3, 3, 4])):  # ~3.0 images per identity (CUHK-PEDES: 3.1)
            path = f"{p:05d}_{j}.jpg"
            with open(os.path.join(root, "imgs", path), "wb") as f:
                f.write(buf.getvalue())
            records.append({"split": "train", "id": p + 1, "file_path": path,
                            "captions": [f"person {p} view {j} first.", f"person {p} view {j} second."]})
        if p % 10 == 9:  # a small val/test split so the dataset is complete
            records[-1]["split"] = "test"
    with open(os.path.join(root, "reid_raw.json"), "w") as f:
        json.dump(records, f)
    return records


def same_id_pairs(pids: list[int]) -> int:
    return sum(a == b for a, b in combinations(pids, 2))


def stream_batches(url: str, batch: int, buffer: int) -> list[list[int]]:
    from tbps.config import DataConfig
    from tbps.data import build_train_loader, load_tokenizer

    tok = load_tokenizer(os.path.join(url, "tokenizer"))
    cfg = DataConfig(url=url, image_size=[16, 8], batch_size=batch, loader_workers=0, text_length=16,
                     shuffle_buffer=buffer, sampling="pairs", random_erasing=0.0, pad=0)
    loader = build_train_loader(cfg, tok)
    return [b["pids"].tolist() for b in loader]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.ids = 300
    from shards.build import convert
    from shards.writer import DatasetWriter
    from tbps.data import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        records = write_raw(raw, args.ids)
        train = [r for r in records if r["split"] == "train"]
        pair_pids = [r["id"] for r in train for _ in r["captions"]]
        shuffled = os.path.join(tmp, "shuffled")
        convert("cuhk-pedes", raw, shuffled, shard_size=1000, min_shards=1, log=open(os.devnull, "w"))
        ordered = os.path.join(tmp, "ordered")
        with open(os.path.join(raw, "imgs", train[0]["file_path"]), "rb") as f:
            jpg = f.read()
        with DatasetWriter(ordered, "annotation-order", shard_size=1000, min_shards=1, progress=False) as w:
            w.write_split("train", ({"__key__": f"train-{i:08d}", "jpg": jpg,
                                     "json": {"pid": r["id"], "train_id": r["id"] - 1, "captions": r["captions"],
                                              "path": r["file_path"]}} for i, r in enumerate(train)), len(train))
            w.publish()
        captions = [c for r in train for c in r["captions"]]
        for url in (shuffled, ordered):
            build_tokenizer(captions, os.path.join(url, "tokenizer"))
        rows = {"tbps (shuffled shards, pair passes)": stream_batches(shuffled, args.batch, args.buffer),
                "annotation-order shards, same stream": stream_batches(ordered, args.batch, args.buffer)}
        rng = random.Random(0)
        glob = []
        for _ in range(5):  # five global shuffles
            perm = pair_pids[:]
            rng.shuffle(perm)
            glob += [perm[i:i + args.batch] for i in range(0, len(perm) - args.batch + 1, args.batch)]
        rows["global shuffle (reference)"] = glob
    base = sum(same_id_pairs(b) for b in glob) / len(glob)
    print(f"{len(train)} train images, {len(pair_pids)} pairs, {args.ids} identities, batch {args.batch}, "
          f"shuffle buffer {args.buffer}\n")
    print("| stream | batches | same-identity pairs per batch | x global shuffle |\n|---|---|---|---|")
    for name, batches in rows.items():
        mean = sum(same_id_pairs(b) for b in batches) / len(batches)
        print(f"| {name} | {len(batches)} | {mean:.2f} | {mean / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
