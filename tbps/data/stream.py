"""Streaming pipeline: published shards (manifest.json) -> per-rank, per-loader-worker batches.

Stages, in order: shard list of the split -> deterministic shuffle keyed to (seed, epoch) -> balanced assignment to
(rank, loader worker) -> tar streaming (fsspec for remote URLs) -> caption choice -> in-worker sample shuffle buffer
-> decode and augment -> batch -> tokenise (+ MLM masking) per batch.

Two epoch definitions (``data.sampling``):
- ``pairs`` (IRRA, IVT): every (image, caption) pair once per epoch. A worker makes P passes over its shards,
  P = the split's captions per image rounded (CUHK-PEDES 2), each pass in its own shard order; an image's captions,
  in an order drawn per (seed, epoch, image), are dealt one per pass. Two captions of one image are thus about half
  an epoch apart, not neighbours, and batches mix identities as a global shuffle does (docs/benchmarks.md).
- ``images``: every image once per epoch with one caption drawn at random.

Two batch compositions (``data.sampler``): ``random`` (the above, through a shuffle buffer) and ``identity``
(IVT's K pairs per identity, tbps/data/identity.py; the train split written with ``shards.build --group-ids``).

Every rank yields exactly the same number of batches per epoch, computed from the manifest alone (no communication),
so uneven shards can never leave one rank waiting on another in a collective.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import sys
import tarfile
import typing
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.storage import MANIFEST, StorageUnavailableError, join, read_json, register_fsspec_gopen, with_retries
from shards.writer import MANIFEST_FORMAT
from tbps.config import OnBadShard

from .batch import EvalBatch, TrainBatch
from .needs import DataNeeds
from .identity import block_batches, check_identity_config, check_identity_layout, identity_rank_batches, \
    identity_sequence, leftover_samples, picks_per_step
from .text import mask_tokens, mla_texts, mla_word_rule, mlm_rows, tokenize
from .transforms import BatchAugment, batch_tensor, resize_mode, resize_uint8

register_fsspec_gopen()  # s3:// and other fsspec URLs for webdataset, in this process

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def load_manifest(url: str) -> dict:
    """Read and check ``<url>/manifest.json``; readers trust only the shards it lists."""
    path = join(url, MANIFEST)
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} at {url}: not a published tbps dataset (convert it with "
                                "python -m shards.build / shards.synth; an interrupted conversion publishes none)"
                                ) from None
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read {path}: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})")
    return manifest


class UnknownSplitError(ValueError):
    """A split the dataset does not have (a user error: one message naming the splits it has)."""

    is_user_error = True


def split_shards(manifest: dict, split: str, url: str = "") -> list[dict]:
    if split not in manifest["splits"]:
        raise UnknownSplitError(f"split {split!r} not in dataset {url or manifest.get('dataset')} "
                                f"(has {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def check_pair_counts(shards: list[dict], url: str = "") -> None:
    """Pair-level epochs need each shard's caption count (written by shards.build/synth since tbps 0.1 + #13)."""
    if any("captions" not in s for s in shards):
        raise ValueError(f"the manifest of {url or 'this dataset'} has no per-shard caption counts (written by an "
                         "older shards.build): convert the dataset again, or set data.sampling=images")


def assign_shards(shards: list[dict], world_size: int, num_workers: int, epoch: int, seed: int,
                  weight: str = "samples") -> list[list[list[dict]]]:
    """Deterministic, balanced assignment ``[rank][worker] -> shards`` for one epoch.

    Shards are shuffled with (seed, epoch), then each goes (largest first, ties in shuffled order) to the
    (rank, worker) slot holding the fewest units of ``weight`` (``samples``: images; ``captions``: pairs). Every
    rank computes the same answer.
    """
    order = list(range(len(shards)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    order.sort(key=lambda i: -shards[i][weight])  # stable: ties keep the shuffled order
    slots = world_size * num_workers
    load = [0] * slots
    out: list[list[list[dict]]] = [[[] for _ in range(num_workers)] for _ in range(world_size)]
    for i in order:
        # fill ranks evenly first, then workers within a rank: slot s = worker * world_size + rank
        s = min(range(slots), key=lambda k: (load[k], k))
        load[s] += shards[i][weight]
        out[s % world_size][s // world_size].append(shards[i])
    return out


def batches_per_epoch(assignment: list[list[list[dict]]], batch_size: int, weight: str = "samples") -> int:
    """Full batches every rank can produce: min over ranks of floor(its units / batch). Each loader worker yields its
    full batches and then its remainder, and the rank's loader joins the remainders into full batches
    (:func:`merge_partials`), so only the rank's last remainder, below one batch, is left out."""
    return min(sum(s[weight] for worker in rank for s in worker) // batch_size for rank in assignment)


def resolve_loader_workers(n: int, cpus: int | None = None) -> int:
    """``data.loader_workers``: n >= 0 as given; -1 (auto) = ``cpus`` - 1, at least 1 (``cpus``: the CPUs Ray gives a
    Train worker, train.cpus_per_worker; without it, this machine's usable CPUs)."""
    if n >= 0:
        return n
    if n != -1:
        raise ValueError(f"data.loader_workers must be >= 0, or -1 for what the CPUs allow; got {n}")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - 1)


def train_batches(shards: list[dict], cfg, world_size: int, num_workers: int, epoch: int,
                  keep_last: bool = False) -> int:
    """Batches every rank yields in ``epoch`` of the train split (``cfg``: the DataConfig); ``keep_last`` (one rank,
    random sampler): the last, partial batch counted too."""
    weight = sampling_weight(cfg.sampling)
    assignment = assign_shards(shards, world_size, num_workers, epoch, cfg.seed, weight)
    if cfg.sampler != "identity":
        full = batches_per_epoch(assignment, cfg.batch_size, weight)
        return full + (keep_last and world_size == 1 and sum(s[weight] for s in shards) % cfg.batch_size > 0)
    return min(identity_rank_batches(rank, cfg.batch_size, cfg.instances_per_id, cfg.identity_blocks,
                                     weight == "captions") for rank in assignment)


def first_epoch_shards(cfg, manifest: dict) -> list[dict]:
    """The train shards epoch 0 deals out (``cfg``: the DataConfig): the split's, or a mixture's draw for it -- what
    pre-flight and the ``--check`` plans count."""
    if cfg.mix:
        return Mixture(cfg.mix, cfg.train_split).epoch_shards(0, cfg.seed, sampling_weight(cfg.sampling))
    return split_shards(manifest, cfg.train_split)


def epoch_coverage(shards: list[dict], cfg, world_size: int, num_workers: int, epoch: int = 0,
                   keep_last: bool = False) -> dict[str, int]:
    """How much of the train split an epoch trains on, in pairs (``data.sampling=pairs``) or images (``images``):
    ``used``, ``total``, and what the rest is: ``shares`` -- whole shards go to ranks and every rank stops at the
    smallest rank's share, so a shard count that does not divide evenly leaves part out (another part each epoch) --
    and ``remainders``, the part of each rank's share below a full batch (the identity sampler's also the pairs its
    chunks of K leave and, with identity_blocks > 1, each loader worker's last block below batch / blocks), none
    where the last, partial batch is kept (``keep_last``: one rank, :func:`keeps_last_batch`)."""
    weight = sampling_weight(cfg.sampling)
    batches = train_batches(shards, cfg, world_size, num_workers, epoch)
    assignment = assign_shards(shards, world_size, num_workers, epoch, cfg.seed, weight)
    smallest = min(sum(s[weight] for worker in rank for s in worker) for rank in assignment)
    used, total = batches * cfg.batch_size * world_size, sum(s[weight] for s in shards)
    if keep_last and world_size == 1:
        used = total
    return {"used": used, "total": total, "shares": total - smallest * world_size,
            "remainders": smallest * world_size - used}


def sampling_weight(sampling: str, train: bool = True) -> str:
    """The manifest count that an epoch of ``data.sampling`` iterates: ``captions`` (pairs) or ``samples``."""
    if sampling not in ("pairs", "images"):
        raise ValueError(f"data.sampling must be pairs or images, got {sampling!r}")
    return "captions" if train and sampling == "pairs" else "samples"


def pair_passes(shards: list[dict]) -> int:
    """Passes a pair-level epoch makes over a worker's shards: the split's captions per image, rounded."""
    images = sum(s["samples"] for s in shards)
    return max(1, round(sum(s["captions"] for s in shards) / max(1, images)))


def pair_stream(urls: list[str], passes: int, seed: int, epoch: int, rank: int, worker: int,
                check: ShardCheck | None = None) -> Iterator[dict]:
    """Every (image, caption) pair of these shards once: ``passes`` passes, each over the shards in its own order; an
    image's captions, permuted per (seed, epoch, image key), are dealt to the passes (caption j to pass j mod P).
    Yields the raw sample with ``__meta__`` (its parsed json) and ``__caption__`` (the caption's index)."""
    for p in range(passes):
        order = list(urls)
        random.Random(_seed_int(seed, epoch, rank, worker, "pass", p)).shuffle(order)
        for sample in shard_samples(order, check):
            meta = json.loads(sample["json"])
            n = len(meta["captions"])
            perm = random.Random(_seed_int(seed, epoch, sample["__key__"])).sample(range(n), n)
            for j in range(p, n, passes):
                yield {**sample, "__meta__": meta, "__caption__": perm[j]}


def _seed_int(*parts) -> int:
    """A stable 63-bit seed from parts (Python's hash() of strings changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def batch_counts(batch: dict) -> dict:
    """Set the per-batch counts the loader derives from a training batch's tensors (on the CPU, where counting the
    GPU copy would cost a device sync every step): ``mlm_rows`` (IRRA's masked tokens, rounded up) and ``mla_length``
    (the longest text of IVT's three levels: its one tokenizer call pads the 3B texts to it, and the model cuts the
    padding to it)."""
    if "mlm_labels" in batch:
        batch["mlm_rows"] = mlm_rows(batch["mlm_labels"])
    if "mla_mask" in batch:
        batch["mla_length"] = max(1, int(batch["mla_mask"].sum(dim=-1).max()))
    return batch


BOOKKEEPING = ("worker", "skipped_shards", "partial", "mlm_rows", "mla_length")  # not cut along the batch


def merge_partials(parts: list[dict], size: int, keep_rest: bool = False) -> list[dict]:
    """Full batches of ``size`` made of partial training batches (each loader worker's last), taken in the order
    given; the rest, below ``size``, is left out, or with ``keep_rest`` a last, smaller batch. Every tensor and list
    of a batch runs along its samples: they are cut and joined, and :func:`batch_counts` derived again. Each sample
    keeps the augmentation and masking it was drawn with."""
    def join(pieces):
        batch = {}
        for key, value in pieces[0][0].items():
            if key in BOOKKEEPING:
                continue
            cut = [p[key][a:b] for p, a, b in pieces]
            batch[key] = torch.cat(cut) if isinstance(value, torch.Tensor) else [x for piece in cut for x in piece]
        return batch_counts(batch)

    out, pieces, filled = [], [], 0
    for part in parts:
        n, start = len(part["keys"]), 0
        while start < n:
            take = min(size - filled, n - start)
            pieces.append((part, start, start + take))
            filled, start = filled + take, start + take
            if filled == size:
                out.append(join(pieces))
                pieces, filled = [], 0
    if keep_rest and pieces:
        out.append(join(pieces))
    return out


ON_BAD_SHARD = typing.get_args(OnBadShard)  # ("error", "skip"), the values tbps.config accepts


def check_on_bad_shard(value: str) -> None:
    if value not in ON_BAD_SHARD:
        raise ValueError(f"data.on_bad_shard must be one of {', '.join(ON_BAD_SHARD)}, got {value!r}")


class CorruptShardError(OSError):
    """A shard that is missing, differs from its manifest entry (size, sha256) or is not a readable tar."""

    is_user_error = True  # shards.cli: one message and exit code 2, no traceback

    def __init__(self, url: str, problem: str | None = None):
        if problem is None:  # re-raised from a DataLoader worker with the message alone
            super().__init__(url)
            self.url = self.problem = ""
            return
        self.url, self.problem = url, problem
        super().__init__(f"shard {url}: {problem}. The dataset is damaged: check every shard with `python -m "
                         "shards.verify <dataset URL>` and convert it again (python -m shards.build / shards.synth), "
                         "or set data.on_bad_shard=skip to go on without the bad shards")


class ShardCheck:
    """How shards are checked while streaming: each against its manifest entry (``bytes``, ``sha256``), and what a
    bad one does (``data.on_bad_shard``: ``error`` stops with :class:`CorruptShardError`; ``skip`` logs it, records
    its name in ``skipped`` and goes on)."""

    def __init__(self, url: str, shards: list[dict], on_bad: str = "error"):
        check_on_bad_shard(on_bad)
        self.expected = {s.get("url") or join(url, s["name"]): s for s in shards}
        self.on_bad = on_bad
        self.skipped: list[str] = []

    def verify(self, url: str, data: bytes) -> None:
        entry = self.expected.get(url)
        if entry is None:
            return
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise CorruptShardError(url, f"{len(data)} bytes read, the manifest lists {entry['bytes']}")
        if "sha256" in entry:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise CorruptShardError(url, f"sha256 {digest[:16]}... differs from the manifest's "
                                             f"{entry['sha256'][:16]}... (same size: bytes changed in place)")

    def bad(self, error: CorruptShardError) -> None:
        if self.on_bad != "skip":
            raise error
        self.skipped.append(os.path.basename(error.url))
        print(f"[tbps] warning: skipped {error.url}: {error.problem} (data.on_bad_shard=skip)", file=sys.stderr,
              flush=True)

    def drain(self) -> list[str]:
        out, self.skipped = self.skipped, []
        return out


def _read_shard(url: str) -> bytes:
    """A whole shard; transient storage errors (an endpoint down or resetting connections, throttling) are retried
    with backoff for ``$TBPS_STORAGE_RETRY_S`` seconds, re-reading the shard from its start."""
    def read():
        with wds.gopen(url, "rb") as f:
            return f.read()
    return with_retries("read shard", url, read)


def prefetched_shards(urls: list[str], depth: int = 1, check: ShardCheck | None = None) -> Iterator[dict]:
    """``{"url", "stream"}`` per shard (or ``{"url", "error"}`` for a missing or corrupt one), the next ``depth``
    shards read on a background thread while the current one is decoded: object-storage latency and transfer
    overlap with CPU work instead of adding to it. With ``check``, each shard is verified against its manifest entry
    (sha256 of the bytes read; well under 1 % of decoding them, docs/benchmarks.md)."""
    if not urls:
        return
    with ThreadPoolExecutor(1) as pool:
        pending = deque((u, pool.submit(_read_shard, u)) for u in urls[: depth + 1])
        rest = iter(urls[depth + 1:])
        while pending:
            url, future = pending.popleft()
            nxt = next(rest, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_shard, nxt)))
            try:
                data = future.result()
            except FileNotFoundError:
                yield {"url": url, "error": CorruptShardError(url, "missing: the manifest lists it, the storage has "
                                                                   "no such file")}
                continue
            except StorageUnavailableError:
                raise
            except Exception as e:
                raise OSError(f"cannot read shard {url}: {type(e).__name__}: {e}") from e
            if check is not None:
                try:
                    check.verify(url, data)
                except CorruptShardError as e:
                    yield {"url": url, "error": e}
                    continue
            yield {"url": url, "stream": io.BytesIO(data)}


def split_captions(url: str, split: str = "train") -> list[str]:
    """Every caption of a split, in shard order (to build a word-level tokenizer from a dataset's train text)."""
    shards = split_shards(load_manifest(url), split, url)
    return [c for s in shard_samples([join(url, e["name"]) for e in shards]) for c in json.loads(s["json"])["captions"]]


def shard_samples(urls: list[str], check: ShardCheck | None = None) -> Iterator[dict]:
    """Samples (dicts of raw fields keyed by extension, plus ``__key__``/``__url__``) of the given shards, in order.
    A missing, corrupt (``check``) or unreadable shard raises :class:`CorruptShardError` naming it, or with
    ``check.on_bad == "skip"`` is skipped."""
    for shard in prefetched_shards(urls, check=check):
        error = shard.get("error")
        if error is None:
            try:
                yield from group_by_keys(tar_file_expander([shard]))
                continue
            except (tarfile.TarError, EOFError, ValueError, KeyError) as e:
                error = CorruptShardError(shard["url"], f"not a readable tar ({type(e).__name__}: {e})")
        if check is None:
            raise error
        check.bad(error)


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (2-8; 1 = as stored)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def decode_image(data: bytes, target_hw: tuple[int, int] | None = None) -> Image.Image:
    """Decode to RGB, upright: an EXIF orientation tag (phone and camera photos: ``tbps.search --images``, generic
    corpora) is applied, as a photo viewer and the browser's search page show the image; the person datasets' crops
    carry none, so their pixels are unchanged. With ``target_hw`` (``data.decode: reduced``), a JPEG at least twice
    the target size is decoded directly at a reduced scale (libjpeg's DCT scaling via ``draft``): about 2x cheaper
    than a full decode followed by a downscale for a crop twice the target, more for larger photos, but not the
    pixels of a full decode (``decode_target``)."""
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1) if "exif" in im.info else 1
        if orientation not in UPRIGHT:
            orientation = 1
        if target_hw and im.format == "JPEG":
            h, w = target_hw if orientation < 5 else target_hw[::-1]  # 5-8: stored rotated by a quarter turn
            if im.width >= 2 * w and im.height >= 2 * h:
                im.draft("RGB", (w, h))
        rgb = im.convert("RGB")
    return rgb if orientation == 1 else rgb.transpose(UPRIGHT[orientation])


def decode_target(cfg) -> tuple[int, int] | None:
    """What ``decode_image`` may decode a JPEG down towards under ``cfg`` (a DataConfig): the input size with
    ``data.decode: reduced``; None with ``exact``, a full decode as the official pipelines' ``Image.open(...)
    .convert("RGB")`` before the resize, so train and evaluation images have their pixels."""
    return tuple(cfg.image_size) if cfg.decode == "reduced" else None


def _decode_image(sample: dict, target_hw: tuple[int, int] | None = None) -> Image.Image:
    for k in IMAGE_KEYS:
        if k in sample:
            return decode_image(sample[k], target_hw)
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image field")


class Mixture:
    """The train split of a mixture of datasets (``data.url: [{url, weight, eval}, ...]``, kept in ``data.mix``).

    Each epoch, member i contributes ``weight_i / sum(weights)`` of the epoch's units (images, or pairs with
    ``data.sampling=pairs``; the epoch holds as many units as all members together): its shards ``floor(f)`` times
    plus a seeded subset of ``frac(f)`` of them, ``f`` = that share over the member's own share of the units.
    Identities stay apart: person ids become ``pid * members + i`` and train ids are offset by the earlier members'
    counts, so the ID classifier spans the union."""

    def __init__(self, members, split: str):
        self.members = list(members)
        self.entries: list[list[dict]] = []
        self.train_id_offsets: list[int] = []
        self.datasets: list[str] = []  # each member's manifest name (shards.build --dataset)
        offset = 0
        for i, m in enumerate(self.members):
            manifest = load_manifest(m.url)
            self.datasets.append(str(manifest.get("dataset", "")))
            shards = split_shards(manifest, split, m.url)
            self.entries.append([{**e, "url": join(m.url, e["name"]), "member": i} for e in shards])
            self.train_id_offsets.append(offset)
            offset += int(manifest.get("num_train_ids", 0))
        self.num_train_ids = offset
        self.member_of = {e["url"]: e["member"] for entries in self.entries for e in entries}

    def all_shards(self) -> list[dict]:
        return [e for entries in self.entries for e in entries]

    def epoch_shards(self, epoch: int, seed: int, weight: str = "samples") -> list[dict]:
        sizes = [sum(e[weight] for e in entries) for entries in self.entries]
        total, weights = sum(sizes), sum(m.weight for m in self.members)
        out: list[dict] = []
        for i, (entries, size, m) in enumerate(zip(self.entries, sizes, self.members)):
            factor = (m.weight / weights) * total / max(size, 1)
            whole = int(factor)
            out += entries * whole
            out += random.Random(f"{seed}-mix-{epoch}-{i}").sample(entries, round((factor - whole) * len(entries)))
        return out

    def relabel(self, url: str, pid: int, train_id: int) -> tuple[int, int]:
        i = self.member_of.get(url)
        if i is None:
            return pid, train_id
        return pid * len(self.members) + i, (train_id + self.train_id_offsets[i] if train_id >= 0 else -1)


class ShardStream(IterableDataset):
    """Batches of one split for one rank; each DataLoader worker streams its own shards."""

    def __init__(self, url: str, manifest: dict, split: str, cfg, tokenizer, needs: DataNeeds | None = None,
                 rank: int = 0, world_size: int = 1, train: bool = True, mixture: Mixture | None = None):
        self.url, self.split, self.cfg, self.tokenizer = url, split, cfg, tokenizer
        self.mixture = (mixture or Mixture(cfg.mix, split)) if train and cfg.mix else None
        self.shards = self.mixture.all_shards() if self.mixture else split_shards(manifest, split, url)
        self.needs = needs or DataNeeds()
        self.rank, self.world_size, self.train = rank, world_size, train
        self.weight = sampling_weight(cfg.sampling, train)
        check_on_bad_shard(cfg.on_bad_shard)
        if self.weight == "captions":
            check_pair_counts(self.shards, url)
        check_identity_config(cfg)
        self.identity = train and cfg.sampler == "identity"
        if self.identity:
            check_identity_layout(self.shards, url, split)
        self.loader_workers = resolve_loader_workers(cfg.loader_workers)
        self.num_workers = max(1, self.loader_workers)
        self.epoch = 0
        self.skip: list[int] | None = None  # per loader worker: batches a resumed epoch does not yield again
        self.augment = BatchAugment(cfg, train=train)
        self.decode_hw = decode_target(cfg)  # what a JPEG may be decoded down towards (data.decode)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        # IVT's word-level rule per dataset (data.mla_words): the split's, or per mixture member
        self.dataset = str(manifest.get("dataset", ""))  # shards.build --dataset (cuhk-pedes, icfg-pedes, ...)
        self.word_rule = mla_word_rule(cfg.mla_words, self.dataset)
        self.member_word_rules = [mla_word_rule(cfg.mla_words, d) for d in self.mixture.datasets] if self.mixture \
            else []

    def mla_words(self, url) -> str:
        """The word-level rule of the dataset a shard (``__url__``) belongs to."""
        if self.mixture:
            member = self.mixture.member_of.get(url)
            if member is not None:
                return self.member_word_rules[member]
        return self.word_rule

    def mla_words_summary(self) -> str:
        """The word-level rule per dataset, for the run's log: e.g. ``clauses (icfg-pedes, data.mla_words=auto)``."""
        if self.mixture:
            rules = [f"{rule} ({name or m.url})" for m, name, rule in
                     zip(self.mixture.members, self.mixture.datasets, self.member_word_rules)]
            return "; ".join(rules) + f" (data.mla_words={self.cfg.mla_words})"
        return f"{self.word_rule} ({self.dataset or self.url}, data.mla_words={self.cfg.mla_words})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_shards(self) -> list[dict]:
        """This epoch's shards: the split's, or a mixture's draw for the epoch."""
        if self.mixture:
            return self.mixture.epoch_shards(self.epoch, self.cfg.seed, self.weight)
        return self.shards

    def assignment(self):
        return assign_shards(self.epoch_shards(), self.world_size, self.num_workers, self.epoch, self.cfg.seed,
                             self.weight)

    def num_batches(self, keep_last: bool = False) -> int:
        """Batches of this epoch on this rank (``keep_last``: with the last, partial one, TrainLoader's)."""
        if self.train:
            return train_batches(self.epoch_shards(), self.cfg, self.world_size, self.num_workers, self.epoch,
                                 keep_last)
        return batches_per_epoch(self.assignment(), self.cfg.batch_size, self.weight)

    # -- per sample (runs in the loader worker)
    def _sample(self, sample: dict, rng: random.Random, decode: bool = True) -> dict:
        """One (image, caption) pair. ``decode=False`` (a batch a resumed epoch has already trained on) draws the
        same random numbers but leaves the image undecoded."""
        meta = sample.get("__meta__") or json.loads(sample["json"])
        size = tuple(self.cfg.image_size)
        index = sample["__caption__"] if "__caption__" in sample else rng.randrange(len(meta["captions"]))
        caption = meta["captions"][index]
        image = resize_uint8(_decode_image(sample, self.decode_hw), size, self.cfg.interpolation) if decode else None
        pid, train_id = meta["pid"], meta.get("train_id", -1)
        if self.mixture:  # identities of different members kept apart
            pid, train_id = self.mixture.relabel(sample.get("__url__"), pid, train_id)
        out = {"image": image, "caption": caption, "caption_index": index, "pid": pid, "train_id": train_id,
               "key": sample["__key__"], "shard": os.path.basename(str(sample.get("__url__", "")))}
        if self.needs.mla:
            attributes = meta.get("caption_attributes")
            out["mla"] = mla_texts(caption, rng, attributes[index] if attributes else None,
                                   self.mla_words(sample.get("__url__")))
        return out

    # -- per batch (runs in the loader worker)
    def _collate(self, samples: list[dict], gen: torch.Generator) -> TrainBatch:
        length = self.cfg.text_length
        ids, mask = tokenize(self.tokenizer, [s["caption"] for s in samples], length)
        pixels = torch.from_numpy(np.stack([s["image"] for s in samples]))  # uint8 [B, H, W, 3]
        views = self.needs.views
        images = batch_tensor((len(samples), 3, *self.cfg.image_size) if views == 1 else
                              (len(samples), views, 3, *self.cfg.image_size))
        for v in range(views):  # independent augmentations, written in place ([B, V, 3, H, W] for several views)
            self.augment(pixels, gen, out=images if views == 1 else images[:, v])
        batch = {
            "images": images,
            "text_ids": ids,
            "text_mask": mask,
            "pids": torch.tensor([s["pid"] for s in samples], dtype=torch.long),
            "train_ids": torch.tensor([s["train_id"] for s in samples], dtype=torch.long),
            "keys": [s["key"] for s in samples],
            "caption_index": [s["caption_index"] for s in samples],  # with keys: which (image, caption) pair
            "shards": [s["shard"] for s in samples],  # where each sample came from (placement records, debugging)
        }
        if self.needs.mlm_ratio > 0:
            batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(
                ids, mask, self.special_ids, self.needs.mlm_ratio, self.tokenizer.mask_token_id,
                len(self.tokenizer), gen)
        if self.needs.mla:
            # levels stacked [B, 3, L]: sentence, phrase, word
            level_ids, level_mask = zip(*(tokenize(self.tokenizer, [s["mla"][k] for s in samples], length)
                                          for k in range(3)))
            batch["mla_ids"] = torch.stack(level_ids, dim=1)
            batch["mla_mask"] = torch.stack(level_mask, dim=1)
        return batch_counts(batch)

    def _batch_generator(self, worker: int, index: int) -> torch.Generator:
        """The random numbers of one batch (augmentation, MLM masking) depend on its position alone, so a resumed
        epoch reproduces the batches after its checkpoint without redoing the ones before."""
        return torch.Generator().manual_seed(_seed_int(self.cfg.seed, self.epoch, self.rank, worker, "batch", index))

    def __iter__(self) -> Iterator[dict]:
        """This loader worker's batches, each tagged ``worker``, then one ``{"worker", "end": True}`` marker (with the
        bad shards skipped since the last batch). The first ``self.skip[worker]`` batches (a resumed epoch's
        already-trained ones) are read and shuffled but neither decoded nor yielded."""
        info = get_worker_info()
        worker = info.id if info else 0
        if info and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream built for {self.num_workers} loader workers, run with {info.num_workers}")
        register_fsspec_gopen()
        mine = self.assignment()[self.rank][worker] if info or self.num_workers == 1 else \
            [s for w in self.assignment()[self.rank] for s in w]
        rng = random.Random(_seed_int(self.cfg.seed, self.epoch, self.rank, worker))
        urls = [s.get("url") or join(self.url, s["name"]) for s in mine]
        check = ShardCheck(self.url, mine, self.cfg.on_bad_shard)
        skip = self.skip[worker] if self.skip else 0
        batches = self._identity_batches(urls, worker, rng, check, skip) if self.identity else \
            self._random_batches(urls, worker, rng, check, skip)
        for batch in batches:
            if batch is None:  # skipped (already trained on)
                continue
            batch["skipped_shards"] = check.drain()  # bad shards skipped since the previous batch
            batch["worker"] = worker
            yield batch
        yield {"worker": worker, "end": True, "skipped_shards": check.drain()}

    def _random_batches(self, urls, worker, rng, check, skip: int = 0) -> Iterator[dict | None]:
        if self.weight == "captions":
            passes = pair_passes(self.shards)
            stages = [lambda: pair_stream(urls, passes, self.cfg.seed, self.epoch, self.rank, worker, check)]
        else:
            stages = [lambda: shard_samples(urls, check)]
        if self.train and self.cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=min(100, self.cfg.shuffle_buffer), rng=rng))
        size = self.cfg.batch_size
        mapped, made = [0], [0]  # samples mapped and batches collated so far

        def sample(s):  # sample k goes into batch k // size
            index = mapped[0] // size
            mapped[0] += 1
            return self._sample(s, rng, decode=index >= skip)

        def collate(samples):
            index = made[0]
            made[0] += 1
            return None if index < skip else self._collate(samples, self._batch_generator(worker, index))

        # the last batch may be partial: TrainLoader joins the loader workers' remainders into full batches
        stages += [wds.map(sample), wds.batched(size, collation_fn=collate, partial=True)]
        for batch in wds.DataPipeline(*stages):
            if batch is not None and len(batch["keys"]) < size:
                batch["partial"] = True
            yield batch

    def _identity_batches(self, urls: list[str], worker: int, rng: random.Random, check: ShardCheck,
                          skip: int = 0) -> Iterator[dict | None]:
        """``data.sampler=identity``: this worker's shards read whole (their identities are whole), then batches of
        K units per identity (tbps/data/identity.py); a unit is an (image, caption) pair, or an image with
        ``data.sampling=images``."""
        samples, groups = [], {}
        for sample in shard_samples(urls, check):
            meta = json.loads(sample["json"])
            i = len(samples)
            samples.append({**sample, "__meta__": meta})
            units = [(i, c) for c in range(len(meta["captions"]))] if self.weight == "captions" else [(i, None)]
            groups.setdefault(meta["pid"], []).extend(units)
        cfg = self.cfg
        sequence = identity_sequence(groups, cfg.instances_per_id,
                                     picks_per_step(cfg.batch_size, cfg.identity_blocks, cfg.instances_per_id), rng)
        batches = block_batches(sequence, cfg.batch_size, cfg.identity_blocks)
        # then what they leave, whole blocks, for TrainLoader to join with the other loader workers' leftovers
        rest = leftover_samples(sequence, cfg.batch_size, cfg.identity_blocks)
        for index, units in enumerate(batches + ([rest] if rest else [])):
            chosen = [samples[i] if c is None else {**samples[i], "__caption__": c} for i, c in units]
            made = [self._sample(s, rng, decode=index >= skip) for s in chosen]
            batch = None if index < skip else self._collate(made, self._batch_generator(worker, index))
            if batch is not None and index == len(batches):
                batch["partial"] = True
            yield batch


class TrainLoader:
    """An epoch of exactly ``len(self)`` batches on this rank (the same on every rank), in a fixed order: round-robin
    over the loader workers (as torch's DataLoader yields them), each worker's full batches in its own fixed order,
    then the workers' last, partial batches joined into full ones (:func:`merge_partials`, in worker order). Where
    an epoch stands is thus a small record, :meth:`position`, and ``set_epoch(epoch, position)`` continues an epoch
    from there: no batch repeated, none left out, the same batches as an uninterrupted epoch (mid-epoch
    checkpoints, ``train.checkpoint_every_steps``)."""

    def __init__(self, stream: ShardStream, pin_memory: bool = False, keep_last: bool = False):
        if keep_last and (stream.world_size > 1 or stream.identity):
            raise ValueError("the epoch's last, partial batch can be kept on one rank with data.sampler=random only "
                             f"(this loader: {stream.world_size} ranks, data.sampler={stream.cfg.sampler})")
        self.keep_last = keep_last
        self.stream = stream
        self.skipped: set[str] = set()  # bad shards skipped in the current epoch (data.on_bad_shard=skip)
        self._resume: dict | None = None
        self._position: dict | None = None
        workers = stream.loader_workers
        # pin_memory (training on a GPU): the DataLoader's pinning thread puts each batch in page-locked memory, so
        # the step's non-blocking copy to the device is asynchronous. A copy from pageable memory makes the host
        # wait until the kernels already queued on the stream have run: a host synchronisation per step that keeps
        # the host from running ahead of the GPU
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                                 worker_init_fn=_worker_init if workers > 0 else None, pin_memory=pin_memory)
        self.pin = pin_memory and torch.cuda.is_available()
        if len(self) == 0:
            total = sum(s["samples"] for s in stream.shards)
            raise ValueError(
                f"split {stream.split!r} of {stream.url} ({total} samples in {len(stream.shards)} shards) gives no "
                f"full batch of {stream.cfg.batch_size} on each of {stream.world_size} rank(s) x "
                f"{stream.num_workers} loader worker(s): lower data.batch_size or data.loader_workers, or write "
                "more shards")

    def set_epoch(self, epoch: int, position: dict | None = None) -> None:
        """The epoch the next iteration yields; with ``position`` (from :meth:`position` in that epoch, on the same
        number of ranks and loader workers), only the batches after it."""
        if position is not None:
            expected = {"epoch": epoch, "rank": self.stream.rank, "world_size": self.stream.world_size,
                        "loader_workers": self.stream.num_workers}
            got = {k: position.get(k) for k in expected}
            if got != expected:
                raise ValueError(f"cannot continue the epoch from data position {got}: this loader is {expected} "
                                 "(a mid-epoch checkpoint continues on the same number of workers and "
                                 "data.loader_workers)")
        self.stream.set_epoch(epoch)
        self._resume = position

    def __len__(self) -> int:
        return self.stream.num_batches(self.keep_last)

    def position(self) -> dict:
        """Where the epoch being iterated stands after the last batch yielded (JSON-serialisable)."""
        if self._position is None:
            raise RuntimeError("TrainLoader.position(): no epoch is being iterated")
        return dict(self._position, taken=list(self._position["taken"]))

    def __iter__(self):
        """Exactly ``len(self)`` batches. With ``data.on_bad_shard=skip`` a rank whose shards were skipped refills
        its epoch by reading its (good) shards again from the start ("refill" passes), so every rank still yields the
        same count."""
        n = len(self)
        workers = self.stream.num_workers
        start, self._resume = self._resume, None
        pos = {"epoch": self.stream.epoch, "rank": self.stream.rank, "world_size": self.stream.world_size,
               "loader_workers": workers, "count": 0, "refill": 0, "taken": [0] * workers, "next": 0, "merged": 0}
        if start is not None:
            pos.update(count=start["count"], refill=start["refill"], taken=list(start["taken"]), next=start["next"],
                       merged=start.get("merged", 0))
        self._position = pos
        self.skipped = set()
        while pos["count"] < n:
            produced = 0
            self.stream.skip = list(pos["taken"])  # read by each worker as the DataLoader starts it
            queues, ended = [deque() for _ in range(workers)], [False] * workers
            partials: list[dict | None] = [None] * workers  # each worker's last, partial batch
            source = iter(self.loader)
            while pos["count"] < n:
                w = next((k % workers for k in range(pos["next"], pos["next"] + workers)
                          if queues[k % workers] or not ended[k % workers]), None)
                if w is None:  # every worker has ended
                    break
                while not queues[w] and not ended[w]:
                    item = next(source)  # each worker ends with a marker, so this cannot run dry first
                    self.skipped.update(item.get("skipped_shards", ()))
                    if item.get("end"):
                        ended[item["worker"]] = True
                    elif item.get("partial"):
                        partials[item["worker"]] = item
                    else:
                        queues[item["worker"]].append(item)
                if not queues[w]:
                    continue
                batch = queues[w].popleft()
                pos["taken"][w] += 1
                pos["next"] = (w + 1) % workers
                pos["count"] += 1
                produced += 1
                yield batch
            del source  # stops the loader workers of this pass
            # then the workers' remainders joined into full batches, in worker order (the same on a resumed epoch:
            # its workers skip their full batches already taken, and their remainders are drawn as before)
            merged = merge_partials([p for p in partials if p is not None], self.stream.cfg.batch_size,
                                    self.keep_last) if pos["count"] < n else []
            for batch in merged[pos["merged"]:]:
                if pos["count"] >= n:
                    break
                if self.pin:  # as the DataLoader's pinning thread does for the workers' batches
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                pos["merged"] += 1
                pos["count"] += 1
                produced += 1
                yield batch
            if pos["count"] < n and (not self.skipped or produced == 0):
                # cannot happen with an intact dataset; fail loudly instead of hanging other ranks
                raise RuntimeError(f"rank {self.stream.rank} produced {pos['count']} of {n} batches in epoch "
                                   f"{self.stream.epoch}; are the shards at {self.stream.url} intact? (python -m "
                                   f"shards.verify {self.stream.url})")
            if pos["count"] < n:
                pos.update(refill=pos["refill"] + 1, taken=[0] * workers, next=0, merged=0)
        self.stream.skip = None


def _worker_init(_):
    register_fsspec_gopen()


def build_train_loader(cfg, tokenizer, needs: DataNeeds | None = None, rank: int = 0, world_size: int = 1,
                       manifest: dict | None = None, url: str | None = None,
                       mixture: Mixture | None = None, pin_memory: bool = False,
                       keep_last: bool = False) -> TrainLoader:
    """``manifest`` and ``mixture`` (``data.mix``'s members, read once by the caller) are read here if not given;
    ``pin_memory``: batches in page-locked memory (training on a GPU); ``keep_last``: the epoch's last batch, below
    ``data.batch_size``, yielded too (one rank, random sampler: :func:`keeps_last_batch`)."""
    url = url or cfg.url
    manifest = manifest or load_manifest(url)
    return TrainLoader(ShardStream(url, manifest, cfg.train_split, cfg, tokenizer, needs, rank, world_size, True,
                                   mixture), pin_memory=pin_memory, keep_last=keep_last)


def keeps_last_batch(cfg, world_size: int) -> tuple[bool, str]:
    """``data.last_batch`` for a run on ``world_size`` ranks (``cfg``: the whole Config): whether the epoch's last,
    partial batch is kept, and why not where ``keep`` cannot be. IRRA's one loader keeps it (``drop_last=False``);
    several ranks drop it, so that every rank makes the same steps over equal batches (a gathered loss needs them),
    and so do micro-batches (train.grad_accum > 1: a step's micro-batches weigh alike) and the identity sampler (its
    batches are groups of K)."""
    if cfg.data.last_batch != "keep":
        return False, ""
    why = [f"{world_size} ranks" if world_size > 1 else "",
           f"train.grad_accum={cfg.train.grad_accum}" if cfg.train.grad_accum > 1 else "",
           "data.sampler=identity" if cfg.data.sampler == "identity" else ""]
    why = [w for w in why if w]
    return not why, ", ".join(why)


# ---------------------------------------------------------------------------------------------------- evaluation
class EvalStream(IterableDataset):
    """The gallery (each image once) and the queries (every caption) of a split, for one rank.

    Each item is a batch of images with their captions flattened (``tbps.data.batch.EvalBatch``).
    """

    def __init__(self, url: str, manifest: dict, split: str, cfg, tokenizer, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"the evaluation batch size must be >= 1, got {batch_size}")
        self.url, self.cfg, self.tokenizer, self.batch_size = url, cfg, tokenizer, batch_size
        shards = split_shards(manifest, split, url)
        offsets = list(itertools.accumulate([0] + [s["samples"] for s in shards]))
        self.mine = [(s, offsets[i]) for i, s in enumerate(shards) if i % world_size == rank]
        self.augment = BatchAugment(cfg, train=False)
        # each image decoded (data.decode) and resized (data.eval_interpolation) as evaluation does
        self.decode_hw, self.resize = decode_target(cfg), resize_mode(cfg, train=False)
        check_on_bad_shard(cfg.on_bad_shard)

    def __iter__(self):
        register_fsspec_gopen()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard, offset in self.mine[worker::workers]:
            check = ShardCheck(self.url, [shard], self.cfg.on_bad_shard)
            samples = shard_samples([join(self.url, shard["name"])], check)
            chunk = []
            for position, sample in enumerate(samples):
                chunk.append((offset + position, sample))
                if len(chunk) == self.batch_size:
                    yield self._batch(chunk, shard["name"])
                    chunk = []
            if chunk:
                yield self._batch(chunk, shard["name"])
            if check.skipped:  # a marker (tbps.eval.embed counts it): this shard's images and captions are missing
                yield {"skipped_shards": check.drain()}

    def _batch(self, chunk, shard: str) -> EvalBatch:
        images, pids, index, paths, captions, cpids, cindex, cimage = [], [], [], [], [], [], [], []
        keys, size = [], tuple(self.cfg.image_size)
        for i, sample in chunk:
            meta = json.loads(sample["json"])
            images.append(resize_uint8(_decode_image(sample, self.decode_hw), size, self.resize))
            pids.append(meta["pid"])
            index.append(i)
            paths.append(meta.get("path", sample["__key__"]))
            keys.append(sample["__key__"])
            for j, cap in enumerate(meta["captions"]):
                captions.append(cap)
                cpids.append(meta["pid"])
                cindex.append((i << 24) + j)  # (image, caption) order; unique up to 16.7M captions per image
                cimage.append(i)
        ids, mask = tokenize(self.tokenizer, captions, self.cfg.text_length)
        return {"images": self.augment(torch.from_numpy(np.stack(images))), "image_pids": torch.tensor(pids),
                "image_index": torch.tensor(index), "image_path": paths, "image_key": keys,
                "image_shard": [shard] * len(keys),
                "text_ids": ids, "text_mask": mask, "text_pids": torch.tensor(cpids),
                "text_index": torch.tensor(cindex), "text_image": torch.tensor(cimage), "captions": captions}


def build_eval_loader(cfg, tokenizer, split: str, batch_size: int = 256, rank: int = 0, world_size: int = 1,
                      manifest: dict | None = None, url: str | None = None) -> DataLoader:
    url = url or cfg.url
    manifest = manifest or load_manifest(url)
    stream = EvalStream(url, manifest, split, cfg, tokenizer, batch_size, rank, world_size)
    workers = min(resolve_loader_workers(cfg.loader_workers), len(stream.mine))
    return DataLoader(stream, batch_size=None, num_workers=workers,
                      worker_init_fn=_worker_init if workers > 0 else None)
