"""Generic image-text corpora -> shards: JSONL, CSV, or existing WebDataset tars (LAION-style).

    python -m shards.build --dataset jsonl --root corpus.jsonl --out s3://bucket/mals --workers 16
    python -m shards.build --dataset csv --root corpus.csv --out /data/shards/mine
    python -m shards.build --dataset wds --root s3://bucket/laion-person/ --out s3://bucket/laion-person-tbps

One record per image. JSONL: one JSON object per line; CSV: a header row, one row per image. Fields:
- ``image``: a path relative to the file's folder, an absolute path, or a URL fsspec reads (s3://, https://, ...);
- ``caption`` (a string) or ``captions`` (a list; in CSV a JSON list, or one caption per ``|``-separated part);
- optional ``person_id`` (any string or number: images of one person share it; without it every image is its own
  identity) and ``split`` (default ``train``).
WebDataset input: every ``*.tar`` under ``--root`` (or a single .tar), each sample an image (jpg/png/...) with its
caption in ``txt`` or a ``json`` holding ``caption``/``captions`` (and optionally ``person_id``/``split``); each
input tar becomes one shard (``--shard-size`` applies to JSONL and CSV).

How millions of records convert (bounded memory, in parallel, resumably):
1. *Plan* (one streaming pass over the text; images untouched): every record is parsed and checked -- a bad one
   stops the conversion naming the file and line, or with ``--skip-bad`` is counted and listed in the manifest --
   and appended to a part file of at most ``--shard-size`` records in a work folder (``--work-dir``, default under
   ``~/.cache/tbps/corpus``). Person ids become integers and train ids are assigned contiguously on the way; memory
   holds the identity tables only. Splits smaller than ``--min-shards`` parts are re-cut into that many.
2. *Shards*: ``--workers`` processes each turn a part into a shard -- read, check (decode) and store the images,
   hash the tar while it streams out -- and record it as done in the work folder.
3. *Publish*: the old manifest is removed before the first shard is written, stale shards deleted at the end, the
   manifest written last. Readers see the old dataset, nothing, or the new one.
Interrupted (Ctrl-C, a killed machine, a bad image without ``--skip-bad``)? Run the same command again: the plan is
reused when the input has not changed, finished shards are kept, the rest is written; the work folder is deleted
once the dataset is published. Record order is kept (no global shuffle: the loader shuffles shards per epoch and
samples in a buffer).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from typing import Iterator

from . import __version__
from .readers import BadRecord, check_image
from .storage import MANIFEST, filesystem, join, read_bytes, with_retries, write_bytes_atomic
from .writer import MANIFEST_FORMAT, TAR_MTIME, _HashingWriter, plan_shards

KINDS = ("jsonl", "csv", "wds")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


@dataclass
class CorpusRecord:
    line: int  # 1-based line (JSONL), data row (CSV) or sample number in its tar (WebDataset)
    image: str  # as written in the record (JSONL/CSV), or "<tar url>#<sample key>" (WebDataset)
    captions: list[str]
    person: str | None
    split: str


# ------------------------------------------------------------------------------------------------ reading
def _captions(raw: dict, where: tuple[str, int], csv_row: bool = False) -> list[str]:
    file, line = where
    if raw.get("captions") not in (None, ""):
        value = raw["captions"]
        if csv_row and isinstance(value, str):
            try:
                value = json.loads(value) if value.lstrip().startswith("[") else value.split("|")
            except json.JSONDecodeError as e:
                raise BadRecord(file, line, f"captions: not a JSON list ({e.msg})") from None
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise BadRecord(file, line, "captions must be a list of strings")
    elif raw.get("caption") not in (None, ""):
        value = raw["caption"]
        if not isinstance(value, str):
            raise BadRecord(file, line, "caption must be a string")
        value = [value]
    else:
        raise BadRecord(file, line, "no caption: give caption (a string) or captions (a list)")
    value = [" ".join(c.split()) for c in value]
    if not any(value):
        raise BadRecord(file, line, "every caption is empty")
    return [c for c in value if c]


def _record(raw, file: str, line: int, csv_row: bool = False, image: str | None = None) -> CorpusRecord:
    if not isinstance(raw, dict):
        raise BadRecord(file, line, f"expected an object, got {type(raw).__name__}")
    if image is None:
        image = raw.get("image")
        if not isinstance(image, str) or not image.strip():
            raise BadRecord(file, line, "no image: give image (a path relative to the file, or a URL)")
    person = raw.get("person_id")
    if person in ("", None):
        person = None
    elif not isinstance(person, (str, int)) or isinstance(person, bool):
        raise BadRecord(file, line, f"person_id must be a string or an integer, got {person!r}")
    split = raw.get("split") or "train"
    if not isinstance(split, str) or not SPLIT_NAME.match(split):
        raise BadRecord(file, line, f"split must be a name of letters, digits, _ or -, got {split!r}")
    return CorpusRecord(line, image.strip(), _captions(raw, (file, line), csv_row),
                        None if person is None else str(person), split)


def _open_text(url: str):
    import fsspec

    return fsspec.open(url, "r", encoding="utf-8", newline="").open()


def read_jsonl(file: str) -> Iterator[CorpusRecord | BadRecord]:
    with _open_text(file) as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                yield BadRecord(file, n, f"not valid JSON at column {e.colno}: {e.msg}")
                continue
            try:
                yield _record(raw, file, n)
            except BadRecord as e:
                yield e


def read_csv(file: str) -> Iterator[CorpusRecord | BadRecord]:
    with _open_text(file) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise BadRecord(file, None, f"a CSV corpus needs a header row with an image column (and caption or "
                                        f"captions); got {reader.fieldnames}")
        for n, row in enumerate(reader, 1):
            if None in row:
                yield BadRecord(file, n, f"{len(row[None])} more field(s) than the header has")
                continue
            try:
                yield _record(row, file, n, csv_row=True)
            except BadRecord as e:
                yield e


def list_tars(root: str) -> list[str]:
    fs, path = filesystem(root)
    if path.endswith(".tar"):
        return [root]
    found = sorted(p for p in with_retries("list", root, lambda: fs.find(path)) if p.endswith(".tar"))
    if not found:
        raise BadRecord(root, None, "no .tar files in it (a WebDataset corpus is a folder or prefix of tars)")
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    return [protocol + p for p in found]


def _tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a WebDataset tar, in order."""
    import fsspec

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            stem, _, ext = base.partition(".")
            k = posixpath.join(posixpath.dirname(member.name), stem)
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


def read_wds(url: str) -> Iterator[CorpusRecord | BadRecord]:
    for n, (key, fields) in enumerate(_tar_samples(url), 1):
        ref = f"{url}#{key}"
        try:
            if not any(e in fields for e in IMAGE_FIELDS):
                raise BadRecord(url, n, f"sample {key} has no image ({', '.join(IMAGE_FIELDS)})")
            raw: dict = {}
            if "json" in fields:
                try:
                    raw = json.loads(fields["json"])
                except ValueError as e:
                    raise BadRecord(url, n, f"sample {key}: its json is not valid JSON ({e})") from None
                if not isinstance(raw, dict):
                    raise BadRecord(url, n, f"sample {key}: its json is not an object")
            if "txt" in fields and not raw.get("caption") and not raw.get("captions"):
                raw = {**raw, "caption": fields["txt"].decode("utf-8", "replace")}
            yield _record(raw, url, n, image=ref)
        except BadRecord as e:
            yield e


# ------------------------------------------------------------------------------------------------ 1. the plan
class _Part:
    def __init__(self, folder: str, split: str, index: int):
        self.name = f"{split}-{index:06d}"
        self.split, self.count = split, 0
        self.file = open(os.path.join(folder, "parts", self.name + ".jsonl"), "w", encoding="utf-8")

    def add(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1


def _signature(kind: str, root: str) -> dict:
    """What identifies the input: its files' sizes and modification stamps."""
    urls = list_tars(root) if kind == "wds" else [root]
    out = []
    for url in urls:
        fs, path = filesystem(url)
        info = with_retries("stat", url, lambda: fs.info(path))
        out.append([url, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag"))])
    return {"kind": kind, "files": out}


def shared_ids_note(split: str, info: dict) -> str:
    """The warning for an evaluation split some of whose identities are also in train (``ids_in_train``, manifest)."""
    return (f"{info['ids_in_train']} of the {info['ids']} person ids of split {split!r} also appear in train: "
            "evaluating on it measures people the model trained on (CUHK-PEDES, ICFG-PEDES and RSTPReid share none "
            "between splits), so its R1/mAP read higher than on unseen people; give each person's records one "
            "split, unless the ids are not people")


def make_plan(kind: str, root: str, work: str, shard_size: int, min_shards: int, skip_bad: bool, log) -> dict:
    os.makedirs(os.path.join(work, "parts"), exist_ok=True)
    for f in os.listdir(os.path.join(work, "parts")):
        os.remove(os.path.join(work, "parts", f))
    sources = [(u, read_wds(u)) for u in list_tars(root)] if kind == "wds" else \
        [(root, read_jsonl(root) if kind == "jsonl" else read_csv(root))]
    persons: dict[str, int] = {}  # the corpus's person ids -> ints
    train_ids: dict[int, int] = {}  # train pid -> 0..N-1 (first appearance)
    split_ids: dict[str, set] = {}
    open_parts: dict[str, _Part] = {}
    part_source: dict[str, str] = {}
    counts: dict[str, int] = {}
    parts: list[dict] = []
    stats: dict[str, dict] = {}
    skipped: list[dict] = []
    next_pid, seen, t0 = 0, 0, time.time()

    def close(part: _Part):
        part.file.close()
        parts.append({"name": part.name, "split": part.split, "records": part.count})

    for url, records in sources:
        for item in records:
            seen += 1
            if isinstance(item, BadRecord):
                if not skip_bad:
                    for p in open_parts.values():
                        p.file.close()
                    raise item
                skipped.append(item.as_dict())
                continue
            rec = item
            if rec.person is None:
                pid, next_pid = next_pid, next_pid + 1
                persons_pid = None
            else:
                persons_pid = persons.get(rec.person)
                if persons_pid is None:
                    persons_pid = persons[rec.person] = next_pid
                    next_pid += 1
                pid = persons_pid
            train_id = -1
            if rec.split == "train":
                train_id = train_ids.setdefault(pid, len(train_ids))
            part = open_parts.get(rec.split)
            if part is not None and kind == "wds" and part_source.get(rec.split) != url:
                close(part)  # WebDataset input: one shard per input tar (each read once, by one process)
                part = None
            part_source[rec.split] = url
            if part is None or (kind != "wds" and part.count >= shard_size):
                if part is not None and part.count >= shard_size:
                    close(part)
                counts[rec.split] = counts.get(rec.split, -1) + 1
                part = open_parts[rec.split] = _Part(work, rec.split, counts[rec.split])
            image = rec.image if kind == "wds" or "://" in rec.image or os.path.isabs(rec.image) else \
                join(posixpath.dirname(url) if "://" in url else os.path.dirname(os.path.abspath(url)), rec.image)
            part.add({"line": rec.line, "file": url, "image": image, "path": rec.image, "captions": rec.captions,
                      "pid": pid, "train_id": train_id})
            s = stats.setdefault(rec.split, {"images": 0, "captions": 0, "ids": 0})
            s["images"] += 1
            s["captions"] += len(rec.captions)
            split_ids.setdefault(rec.split, set()).add(pid)
            if log and seen % 100000 == 0:
                print(f"[corpus] planned {seen} records ({seen / max(time.time() - t0, 1e-9):.0f}/s)", file=log,
                      flush=True)
    for part in open_parts.values():
        close(part)
    for split, ids in split_ids.items():
        stats[split]["ids"] = len(ids)
        if split != "train":  # the benchmarks' splits share no identity with train (shared_ids_note)
            stats[split]["ids_in_train"] = len(ids & split_ids.get("train", set()))
            if stats[split]["ids_in_train"] and log:
                print(f"[corpus] warning: {shared_ids_note(split, stats[split])}", file=log)
    if "train" not in stats:
        raise BadRecord(root, None, "no usable train records (records without a split are train)")
    for split in list(stats):  # small splits: re-cut into min_shards balanced parts (every rank x worker gets work)
        mine = [p for p in parts if p["split"] == split]
        total = sum(p["records"] for p in mine)
        want = plan_shards(total, shard_size, min_shards)
        if len(mine) >= len(want) or total > shard_size * min_shards:
            continue
        rows = []
        for p in mine:
            path = os.path.join(work, "parts", p["name"] + ".jsonl")
            with open(path, encoding="utf-8") as f:
                rows += f.readlines()
            os.remove(path)
        parts = [p for p in parts if p["split"] != split]
        start = 0
        for i, n in enumerate(want):
            part = _Part(work, split, i)
            part.file.writelines(rows[start:start + n])
            part.count = n
            start += n
            close(part)
    plan = {"parts": parts, "splits": stats, "num_train_ids": len(train_ids), "skipped": skipped,
            "records": seen, "shard_size": shard_size, "min_shards": min_shards}
    return plan


# ------------------------------------------------------------------------------------------------ 2. shards
def _image_bytes(row: dict, kind: str, tar_cache: dict) -> bytes:
    if kind != "wds":
        return read_bytes(row["image"])
    url, key = row["image"].rsplit("#", 1)
    if tar_cache.get("url") != url:  # parts follow the tars' order: stream each tar once
        tar_cache.clear()
        tar_cache.update(url=url, it=_tar_samples(url))
    for k, fields in tar_cache["it"]:
        if k == key:
            return next(fields[e] for e in IMAGE_FIELDS if e in fields)
    raise FileNotFoundError(f"sample {key} not found in {url}")


def write_part(work: str, name: str, out: str, kind: str, skip_bad: bool) -> dict:
    """One part -> one shard ``<out>/<name>.tar``. Returns its manifest entry and the records skipped."""
    import webdataset as wds

    fs, root = filesystem(out)
    path = f"{root}/{name}.tar"
    skipped, captions, samples, tar_cache = [], 0, 0, {}
    with open(os.path.join(work, "parts", name + ".jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]

    with fs.open(path, "wb") as raw:
        hashing = _HashingWriter(raw)
        with wds.TarWriter(hashing, mtime=TAR_MTIME) as tar:
            for j, row in enumerate(rows):
                try:
                    try:
                        data = _image_bytes(row, kind, tar_cache)
                    except FileNotFoundError:
                        raise BadRecord(row["file"], row["line"], f"image not found: {row['image']}",
                                        row["path"]) from None
                    except OSError as e:
                        raise BadRecord(row["file"], row["line"], f"cannot read image {row['image']}: {e}",
                                        row["path"]) from None
                    ext = check_image(data, row["file"], row["line"], row["path"])
                except BadRecord as e:
                    if not skip_bad:
                        raise
                    skipped.append(e.as_dict())
                    continue
                meta = {"pid": row["pid"], "train_id": row["train_id"], "captions": row["captions"],
                        "path": row["path"]}
                tar.write({"__key__": f"{name}-{j:06d}", ext: data, "json": meta})
                captions += len(row["captions"])
                samples += 1
    return {"entry": {"name": f"{name}.tar", "samples": samples, "captions": captions, "bytes": hashing.nbytes,
                      "sha256": hashing.sha.hexdigest()}, "skipped": skipped}


# ------------------------------------------------------------------------------------------------ 3. the whole
def default_work_dir(root: str, out: str) -> str:
    key = hashlib.sha256(f"{os.path.abspath(root) if '://' not in root else root}\0{out}".encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "tbps", "corpus", key)


def convert_corpus(kind: str, root: str, out: str, shard_size: int = 1000, min_shards: int = 8,
                   skip_bad: bool = False, workers: int = 8, work_dir: str | None = None, log=None) -> dict:
    """Plan, write the shards in ``workers`` processes, publish (see the module doc). Resumes an interrupted run of
    the same command. Returns the manifest."""
    log = log or sys.stderr
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "wds":
        fs, path = filesystem(root)
        if not with_retries("stat", root, lambda: fs.isfile(path)):
            raise BadRecord(root, None, f"no such {kind.upper()} file")
    work = work_dir or default_work_dir(root, out)
    os.makedirs(os.path.join(work, "done"), exist_ok=True)
    signature = {**_signature(kind, root), "out": out, "shard_size": shard_size, "min_shards": min_shards,
                 "skip_bad": skip_bad}
    plan_file = os.path.join(work, "plan.json")
    plan = None
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            saved = json.load(f)
        if saved.get("signature") == signature:
            plan = saved
            print(f"[corpus] resuming: the plan of {root} from {work}", file=log)
    if plan is None:
        for f in os.listdir(os.path.join(work, "done")):
            os.remove(os.path.join(work, "done", f))
        plan = {**make_plan(kind, root, work, shard_size, min_shards, skip_bad, log), "signature": signature}
        with open(plan_file + ".tmp", "w") as f:
            json.dump(plan, f)
        os.replace(plan_file + ".tmp", plan_file)  # the plan counts only once complete
        print(f"[corpus] planned {plan['records']} records into {len(plan['parts'])} shards "
              f"({len(plan['skipped'])} skipped)", file=log)

    fs, out_root = filesystem(out)
    with_retries("mkdir", out, lambda: fs.makedirs(out_root, exist_ok=True))
    manifest_path = f"{out_root}/{MANIFEST}"
    if with_retries("stat", out, lambda: fs.exists(manifest_path)):  # unpublish before the first shard changes
        with_retries("delete", out, lambda: fs.rm(manifest_path))

    results: dict[str, dict] = {}
    pending = []
    for part in plan["parts"]:
        done = os.path.join(work, "done", part["name"] + ".json")
        if os.path.exists(done):
            with open(done) as f:
                result = json.load(f)
            shard = f"{out_root}/{result['entry']['name']}"
            if with_retries("stat", out, lambda: fs.exists(shard)) and \
                    with_retries("stat", out, lambda: fs.size(shard)) == result["entry"]["bytes"]:
                results[part["name"]] = result
                continue
        pending.append(part["name"])
    if results:
        print(f"[corpus] {len(results)} of {len(plan['parts'])} shards already written", file=log)
    t0, written = time.time(), 0
    if pending:
        with ProcessPoolExecutor(max(1, min(workers, len(pending))), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(write_part, work, name, out, kind, skip_bad): name for name in pending}
            try:
                for future in as_completed(futures):
                    name = futures[future]
                    result = future.result()  # a BadRecord stops here, naming the record
                    with open(os.path.join(work, "done", name + ".json"), "w") as f:
                        json.dump(result, f)
                    results[name] = result
                    written += 1
                    rate = sum(results[n]["entry"]["samples"] for n in results) / max(time.time() - t0, 1e-9)
                    print(f"[corpus] {len(results)}/{len(plan['parts'])} shards ({rate:.0f} images/s)", file=log,
                          flush=True)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    skipped = plan["skipped"] + [s for r in results.values() for s in r["skipped"]]
    for s in skipped[len(plan["skipped"]):]:
        print(f"skipped: {s['file']}: record #{s['record']} ({s['path']}): {s['reason']}", file=log)
    splits: dict[str, dict] = {}
    for part in plan["parts"]:
        entry = results[part["name"]]["entry"]
        info = splits.setdefault(part["split"], {**plan["splits"][part["split"]], "shards": []})
        info["shards"].append(entry)
    for info in splits.values():  # images skipped at the shard stage leave the split
        info["images"] = info["samples"] = sum(s["samples"] for s in info["shards"])
        info["captions"] = sum(s["captions"] for s in info["shards"])
    keep = {s["name"] for info in splits.values() for s in info["shards"]}
    for path in with_retries("list", out, lambda: fs.glob(f"{out_root}/*.tar")):
        if posixpath.basename(path) not in keep:
            with_retries("delete", out, lambda: fs.rm(path))
    manifest = {"format": MANIFEST_FORMAT, "dataset": f"{kind}:{posixpath.basename(root.rstrip('/'))}",
                "tool_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "num_train_ids": plan["num_train_ids"], "source": root, "num_skipped": len(skipped),
                "skipped": skipped[:1000], "splits": splits}
    write_bytes_atomic(fs, manifest_path, json.dumps(manifest, indent=1).encode("utf-8"))
    shutil.rmtree(work, ignore_errors=True)
    return manifest
