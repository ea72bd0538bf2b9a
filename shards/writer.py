"""Writes samples into WebDataset tar shards and publishes them with a manifest written last.

Publishing protocol (what makes an interrupted conversion harmless):
1. the old ``manifest.json`` is removed first, so readers never pair an old manifest with new shards;
2. shards ``{split}-{NNNNNN}.tar`` are written, each hashed (sha256) while it streams out;
3. shards left over from an earlier, larger conversion are deleted;
4. ``manifest.json`` is written last, atomically. Readers trust only the shards it lists.
If anything fails before step 4, the shards of this run are removed and no manifest exists.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import math
import posixpath
import sys
import time
from datetime import datetime, timezone
from typing import Iterable, Iterator

import webdataset as wds

from . import __version__
from .storage import MANIFEST, filesystem, write_bytes_atomic

MANIFEST_FORMAT = "tbps-shards/1"
# every tar member's mtime: fixed, so the same input gives the same bytes, and an int: Python's tarfile writes a
# float one (webdataset's TarWriter passes it through) as a PAX extended header before each member -- 1 KB more per
# member, and half the time of reading the shard back (docs/benchmarks.md)
TAR_MTIME = 0


def _caption_count(meta) -> int:
    """Captions in a sample's json record (a dict, or already encoded bytes/str)."""
    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    return len(meta.get("captions", ())) if isinstance(meta, dict) else 0


class _HashingWriter(io.RawIOBase):
    """File-like wrapper that hashes and counts every byte written through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.nbytes += len(b)
        self.raw.write(b)
        return len(b)


def plan_shards(num_samples: int, shard_size: int, min_shards: int) -> list[int]:
    """Sample counts per shard: at most ``shard_size`` each, at least ``min_shards`` shards (when there are enough
    samples), and counts differing by at most one so that ranks and loader workers get balanced work."""
    if num_samples <= 0:
        return []
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    n = max(math.ceil(num_samples / shard_size), min(min_shards, num_samples))
    base, extra = divmod(num_samples, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def group_shard_counts(group_sizes: list[int], shard_size: int, min_shards: int) -> list[tuple[int, int]]:
    """Shards that never split a group (an identity): ``[(first group, end group), ...]`` per shard, cut at the group
    boundary nearest each of :func:`plan_shards`' boundaries. A shard can pass ``shard_size`` by up to half a group,
    and there are fewer shards than planned when groups are larger than shards."""
    if any(n <= 0 for n in group_sizes):
        raise ValueError("every group needs at least one sample")
    total = sum(group_sizes)
    if total == 0:
        return []
    ends = list(itertools.accumulate(group_sizes))  # samples up to and including group g
    cuts: list[int] = []  # group indices where a new shard starts
    for target in itertools.accumulate(plan_shards(total, shard_size, min(min_shards, len(group_sizes)))[:-1]):
        g = bisect.bisect_left(ends, target)  # first group ending at or after the target
        if g > 0 and target - ends[g - 1] < ends[g] - target:
            g -= 1  # the boundary before that group is nearer
        start = g + 1
        if start >= len(group_sizes) or (cuts and start <= cuts[-1]):
            continue
        cuts.append(start)
    bounds = [0] + cuts + [len(group_sizes)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


class Progress:
    """Rate-limited progress line on stderr: records/s and shards written."""

    def __init__(self, label: str, total: int, every_s: float = 2.0, stream=None):
        self.label, self.total, self.every_s, self.stream = label, total, every_s, stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.done = 0
        self.shards = 0

    def update(self, n: int = 1, shards: int = 0, force: bool = False):
        self.done += n
        self.shards += shards
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"[{self.label}] {self.done}/{self.total} records, {rate:.0f} records/s, "
                  f"{self.shards} shards written", file=self.stream, flush=True)


class DatasetWriter:
    """Context manager that writes the splits of one dataset to ``out_url`` and publishes a manifest on success.

    >>> with DatasetWriter("s3://bucket/cuhk", dataset="cuhk-pedes") as w:
    ...     w.write_split("train", samples, num_samples=len(samples))
    ...     w.publish(extra={"num_train_ids": 11003})
    """

    def __init__(self, out_url: str, dataset: str, shard_size: int = 1000, min_shards: int = 8,
                 mtime: int = TAR_MTIME, progress: bool = True):
        self.out_url = out_url.rstrip("/") if "://" in out_url else out_url
        self.fs, self.root = filesystem(out_url)
        self.dataset = dataset
        self.shard_size = shard_size
        self.min_shards = min_shards
        self.mtime = int(mtime)  # fixed tar member mtime: the same input gives the same bytes
        self.progress = progress
        self.splits: dict[str, dict] = {}
        self.written: list[str] = []
        self.published = False

    def __enter__(self):
        self.fs.makedirs(self.root, exist_ok=True)
        manifest = f"{self.root}/{MANIFEST}"
        if self.fs.exists(manifest):  # unpublish first: the old manifest must never describe new shards
            self.fs.rm(manifest)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.published:
            self.abort()
        return False

    def abort(self):
        for path in self.written:
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        self.written.clear()

    def write_split(self, split: str, samples: Iterable[dict], num_samples: int, stats: dict | None = None,
                    shard_counts: list[int] | None = None, shard_extras: list[dict] | None = None):
        """Write ``num_samples`` samples (dicts with ``__key__`` and encoded fields) as the shards of ``split``.
        ``shard_counts`` overrides the planned samples per shard (they must add up to ``num_samples``);
        ``shard_extras`` adds fields to each shard's manifest entry (one dict per shard)."""
        if split in self.splits:
            raise ValueError(f"split {split!r} written twice")
        counts = shard_counts or plan_shards(num_samples, self.shard_size, self.min_shards)
        if sum(counts) != num_samples:
            raise ValueError(f"shard_counts add up to {sum(counts)}, not {num_samples}")
        if shard_extras is not None and len(shard_extras) != len(counts):
            raise ValueError(f"{len(shard_extras)} shard_extras for {len(counts)} shards")
        progress = Progress(f"{self.dataset}/{split}", num_samples) if self.progress else None
        it: Iterator[dict] = iter(samples)
        shards = []
        for index, count in enumerate(counts):
            name = f"{split}-{index:06d}.tar"
            path = f"{self.root}/{name}"
            self.written.append(path)
            captions = 0
            with self.fs.open(path, "wb") as raw:
                hashing = _HashingWriter(raw)
                with wds.TarWriter(hashing, mtime=self.mtime) as tar:
                    for _ in range(count):
                        try:
                            sample = next(it)
                        except StopIteration:
                            raise ValueError(f"split {split!r}: expected {num_samples} samples, the input ended "
                                             f"early") from None
                        captions += _caption_count(sample.get("json"))
                        tar.write(sample)
                        if progress:
                            progress.update(1)
            # captions: the (image, caption) pairs of the shard, what pair-level epochs balance and count
            shards.append({"name": name, "samples": count, "captions": captions, "bytes": hashing.nbytes,
                           "sha256": hashing.sha.hexdigest(), **(shard_extras[index] if shard_extras else {})})
            if progress:
                progress.update(0, shards=1)
        if next(it, None) is not None:
            raise ValueError(f"split {split!r}: the input holds more than the {num_samples} samples announced")
        if progress:
            progress.update(0, force=True)
        self.splits[split] = {"samples": num_samples, **(stats or {}), "shards": shards}

    def publish(self, extra: dict | None = None) -> dict:
        """Delete stale shards, then write the manifest (last). Returns the manifest."""
        keep = {s["name"] for info in self.splits.values() for s in info["shards"]}
        for path in self.fs.glob(f"{self.root}/*.tar"):
            if posixpath.basename(path) not in keep:
                self.fs.rm(path)
        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset": self.dataset,
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
            "splits": self.splits,
        }
        data = json.dumps(manifest, indent=1, sort_keys=False).encode("utf-8")
        write_bytes_atomic(self.fs, f"{self.root}/{MANIFEST}", data)
        self.published = True
        return manifest
