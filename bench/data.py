"""Decode + augment throughput per core: WebDataset shards (local disk and an S3 server) through the training
pipeline's decode + batched augmentation, vs a map-style folder dataset that opens each JPEG with PIL and applies
torchvision's per-image transforms (the public TBPS repos' way): same images, same operations (resize, flip,
pad + crop, normalise, random erasing).

    python bench/data.py [--size demo] [--image-size 384 128] [--samples 4000] [--quick]
    python bench/data.py --image-size 384 128 --loader-workers 7 15 --images-per-id 16 [--no-s3]
                                          # + the training loader with 7 and 15 loader processes (total samples/s)

Goal (issue #2): shards >= 1.5x the folder baseline per core; S3 within 10% of local disk. Issue #18: checking each
shard's sha256 against the manifest while streaming costs <= 3 % (shards_local, verified as training reads, vs
unverified_local). ``trainloader``: the whole training loader (TrainLoader: its round-robin, per-batch seeding,
tokenisation, MLM masking, collation) in one process, on the same shards. ``trainloader_wN`` (issue #15): the same
loader with N loader processes, as a GPU worker runs it (``data.loader_workers``), in total samples/s against the
rate the GPU step consumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.storage import join  # noqa: E402
from shards.synth import generate  # noqa: E402
from tbps.config import DataConfig  # noqa: E402
from tbps.data import load_manifest  # noqa: E402
from tbps.data.stream import ShardCheck, _decode_image, decode_target, shard_samples, split_shards  # noqa: E402
from tbps.data.transforms import BatchAugment, build_transform, resize_uint8  # noqa: E402

torch.set_num_threads(1)  # per core


class FolderDataset(torch.utils.data.Dataset):
    """The baseline: reid_raw.json + imgs/, one PIL.Image.open per item."""

    def __init__(self, root: str, split: str, transform):
        records = json.load(open(os.path.join(root, "reid_raw.json")))
        self.items = [(os.path.join(root, "imgs", r["file_path"]), r["captions"][0]) for r in records
                      if r["split"] == split]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        img = Image.open(path).convert("RGB")
        return self.transform(img), caption


def time_folder(root: str, transform, n: int) -> float:
    ds = FolderDataset(root, "train", transform)
    start = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - start)


def time_shards(url: str, cfg, n: int, batch_size: int = 64, verify: bool = True) -> float:
    """The training pipeline's path: shard reader (next shard prefetched, each checked against the manifest's
    sha256 unless ``verify`` is off, JPEGs decoded as ``data.decode`` says), one resize to uint8 per image, then
    BatchAugment (flip, pad + crop, normalise, erasing) per batch."""
    entries = split_shards(load_manifest(url), "train")
    urls = [join(url, s["name"]) for s in entries]
    check = ShardCheck(url, entries) if verify else None
    augment = BatchAugment(cfg, train=True)
    size = tuple(cfg.image_size)
    gen = torch.Generator().manual_seed(0)
    decode_hw = decode_target(cfg)
    count, pending = 0, []
    start = time.perf_counter()
    while count < n:
        for sample in shard_samples(urls, check):
            pending.append(resize_uint8(_decode_image(sample, decode_hw), size))
            json.loads(sample["json"])["captions"][0]
            count += 1
            if len(pending) == batch_size or count >= n:
                augment(torch.from_numpy(np.stack(pending)), gen)
                pending = []
            if count >= n:
                break
    return count / (time.perf_counter() - start)


def time_trainloader(url: str, cfg, n: int, tokenizer) -> float:
    """The whole training loader in one process (``data.loader_workers: 0``, so per core like the rows above):
    ``TrainLoader``'s own round-robin and batch positions, per-batch seeded generators, shuffle buffer, tokenisation,
    IRRA's MLM masking and collation, on top of the shard path."""
    from tbps.data import DataNeeds, build_train_loader

    loader = build_train_loader(cfg, tokenizer, DataNeeds(mlm_ratio=0.15))
    count, epoch = 0, 0
    start = time.perf_counter()
    while count < n:
        loader.set_epoch(epoch)
        for batch in loader:
            count += len(batch["pids"])
            if count >= n:
                break
        epoch += 1
    return count / (time.perf_counter() - start)


def time_loader_workers(url: str, cfg, workers: int, epochs: int, tokenizer) -> float:
    """The training loader as a GPU worker runs it: ``workers`` loader processes decoding, augmenting, tokenising
    and masking, this process only receiving the batches (where the training step would run). Total samples/s over
    ``epochs`` epochs, each timed from its first batch on (the loader processes' start-up left out)."""
    from tbps.data import DataNeeds, build_train_loader

    loader = build_train_loader(replace(cfg, loader_workers=workers), tokenizer, DataNeeds(mlm_ratio=0.15))
    count, elapsed = 0, 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        next(batches)
        start = time.perf_counter()
        for batch in batches:
            count += len(batch["pids"])
        elapsed += time.perf_counter() - start
    if count == 0:
        raise ValueError(f"{workers} loader workers got one batch per epoch: generate more data (--images-per-id)")
    return count / elapsed


def time_tokenize(tokenizer, captions: list[str], length: int, padded_by_tokenizer: bool, rounds: int) -> float:
    """Milliseconds per IVT batch of captions (4 tokenize calls: the caption and MLA's three levels) at
    data.text_length ``length``: tbps's ``tokenize`` (the tokenizer pads to the longest, torch to ``length``) or the
    tokenizer padding to ``length`` itself (before 2026-12-07)."""
    from tbps.data.text import tokenize

    def padded(texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    run = padded if padded_by_tokenizer else (lambda texts: tokenize(tokenizer, texts, length))
    start = time.perf_counter()
    for _ in range(rounds):
        for _ in range(4):
            run(captions)
    return (time.perf_counter() - start) / rounds * 1e3


def start_moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return proc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="demo")
    ap.add_argument("--image-size", type=int, nargs=2, default=[96, 32], metavar=("H", "W"))
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--decode", choices=("exact", "reduced"), default="exact",
                    help="data.decode of the shard path and the loaders (the folder baseline always decodes fully)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, nargs="*", default=[],
                    help="also time the training loader with these numbers of loader processes (total samples/s)")
    ap.add_argument("--epochs", type=int, default=2, help="--loader-workers: epochs timed per measurement")
    ap.add_argument("--images-per-id", type=int, help="more images per identity (default: the size's)")
    ap.add_argument("--no-s3", action="store_true",
                    help="leave out the S3 row (also left out where moto, boto3 or s3fs is not installed)")
    ap.add_argument("--quick", action="store_true", help="tiny data, few samples: checks the comparison runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.samples, args.repeats, args.loader_workers, args.epochs = "tiny", 200, 1, [2], 1
    missing = [m for m in ("moto", "boto3", "s3fs") if importlib.util.find_spec(m) is None]
    s3 = not args.no_s3 and not missing
    if not args.no_s3 and missing:
        print(f"(the S3 row is left out: {', '.join(missing)} not installed)")
    work = tempfile.mkdtemp(prefix="tbps-bench-data-")
    shards, raw = os.path.join(work, "shards"), os.path.join(work, "raw")
    # enough shards for two per loader process (shards are dealt to loader workers whole)
    generate(out=shards, raw=raw, size=args.size, seed=0, progress=False, images_per_id=args.images_per_id,
             min_shards=max([8] + [2 * n for n in args.loader_workers]), workers=os.cpu_count() or 1)
    cfg = DataConfig(image_size=list(args.image_size), decode=args.decode)
    transform = build_transform(cfg, train=True)
    from tbps.data import build_tokenizer, load_tokenizer, split_captions

    build_tokenizer(split_captions(shards, "train"), os.path.join(shards, "tokenizer"))
    tokenizer = load_tokenizer(os.path.join(shards, "tokenizer"))
    loader_cfg = DataConfig(url=shards, image_size=list(args.image_size), loader_workers=0, batch_size=64,
                            sampling="images", text_length=48, decode=args.decode)
    target = tuple(args.image_size)
    # --quick's 120 images give two loader processes a few batches each only at a smaller batch
    workers_cfg = replace(loader_cfg, batch_size=16) if args.quick else loader_cfg

    moto = start_moto() if s3 else None
    try:
        if s3:
            import boto3
            import s3fs

            boto3.client("s3").create_bucket(Bucket="bench")
            s3fs.S3FileSystem(skip_instance_cache=True).put(shards + "/", "bench/shards/", recursive=True)
        results = {"folder": [], "shards_local": [], "shards_s3": [], "unverified_local": [], "trainloader": []}
        if not s3:
            del results["shards_s3"]
        results.update({f"trainloader_w{n}": [] for n in args.loader_workers})
        for _ in range(args.repeats):  # interleaved, best of N: the same machine state for every contender
            results["folder"].append(time_folder(raw, transform, args.samples))
            results["shards_local"].append(time_shards(shards, cfg, args.samples))
            results["trainloader"].append(time_trainloader(shards, loader_cfg, args.samples, tokenizer))
            results["unverified_local"].append(time_shards(shards, cfg, args.samples, verify=False))
            if s3:
                results["shards_s3"].append(time_shards("s3://bench/shards", cfg, args.samples))
            for n in args.loader_workers:
                results[f"trainloader_w{n}"].append(time_loader_workers(shards, workers_cfg, n, args.epochs,
                                                                        tokenizer))
    finally:
        if moto is not None:
            moto.terminate()
    best = {k: max(v) for k, v in results.items()}
    # sanity: the two readers see the same images (the comparison is apples to apples)
    first = next(iter(wds.DataPipeline(wds.SimpleShardList([join(shards, "train-000000.tar")]),
                                       wds.tarfile_to_samples())))
    path = os.path.join(raw, "imgs", json.loads(first["json"])["path"])
    assert open(path, "rb").read() == first["jpg"], "shards and folder hold different images"

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread; "
          f"ToyPEDES {args.size}, decode ({args.decode})+augment to {target[0]}x{target[1]}, {args.samples} samples, "
          f"best of {args.repeats}")
    print(f"{'reader':<16}{'samples/s/core':>16}{'vs folder':>11}")
    for k in ("folder", "shards_local", "shards_s3", "unverified_local", "trainloader"):
        if k in best:
            print(f"{k:<16}{best[k]:>16.0f}{best[k] / best['folder']:>10.2f}x")
    print(f"TrainLoader (round-robin, seeded batches, tokenise, MLM, collate) vs the shard path: "
          f"{best['trainloader'] / best['shards_local']:.2f}x")
    if s3:
        print(f"S3 vs local disk: {best['shards_s3'] / best['shards_local']:.2f}x")
    cost = 1 - best["shards_local"] / best["unverified_local"]
    print(f"sha256 check of every shard read: {100 * cost:.1f} % of local decode throughput (goal <= 3 %)")
    # tokenisation at IVT's batch (28 captions) and the presets' caption lengths: tbps's tokenize against the
    # tokenizer padding to data.text_length itself; the same tensors (checked), other costs
    from tbps.data.text import tokenize

    captions = split_captions(shards, "train")[:28]
    print(f"\n{'tokenise 28 captions x 4':<26}{'text_length':>12}{'tbps (ms)':>11}{'padded by tokenizer (ms)':>26}")
    for length in (48, 100, 512):
        ids, mask = tokenize(tokenizer, captions, length)
        ref = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"]), length
        rounds = 10 if args.quick else 200
        ours, theirs = (min(time_tokenize(tokenizer, captions, length, by, rounds) for _ in range(args.repeats))
                        for by in (False, True))
        print(f"{'tokenize':<26}{length:>12}{ours:>11.2f}{theirs:>26.2f}")
    if args.loader_workers:
        print(f"\n{'loader':<20}{'processes':>10}{'samples/s':>11}{'per process':>13}{'vs in-process':>14}")
        for n in args.loader_workers:
            k = f"trainloader_w{n}"
            print(f"{k:<20}{n:>10}{best[k]:>11.0f}{best[k] / n:>13.0f}{best[k] / best['trainloader']:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
