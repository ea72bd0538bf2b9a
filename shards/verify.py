"""Check a published dataset against its manifest: every shard of every split present, of the listed size, with the
listed sha256 (read in parallel, streamed in 8 MiB blocks).

    python -m shards.verify s3://bucket/cuhk-pedes [--workers 16] [--split train]

Exit status 0 when every shard matches, 2 when any is missing or differs (each one listed), or when the dataset
has no readable manifest. Training, evaluation and search check each shard they read the same way
(``data.on_bad_shard``); this checks them all at once, e.g. after copying a dataset between buckets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from .cli import add_verbose, run_command
from .storage import MANIFEST, StorageUnavailableError, filesystem, join, read_json, with_retries

BLOCK = 8 * 2**20


def check_shard(fs, root: str, entry: dict) -> str | None:
    """None when the shard matches its manifest entry, else what is wrong."""
    path = join(root, entry["name"])  # root: the file system's own path (no scheme)

    def digest():  # a transient storage error re-reads the shard from its start (with_retries)
        sha, size = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while True:
                block = f.read(BLOCK)
                if not block:
                    return sha, size
                sha.update(block)
                size += len(block)
    try:
        sha, size = with_retries("read shard", path, digest)
    except FileNotFoundError:
        return "missing"
    except StorageUnavailableError:
        raise
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if "bytes" in entry and size != entry["bytes"]:
        return f"{size} bytes, the manifest lists {entry['bytes']}"
    if "sha256" in entry and sha.hexdigest() != entry["sha256"]:
        return f"sha256 {sha.hexdigest()[:16]}... differs from the manifest's {entry['sha256'][:16]}... (same size)"
    return None


def verify(url: str, workers: int = 8, splits: list[str] | None = None) -> dict:
    """``{"shards": n, "bytes": total, "bad": {shard name: problem}}`` of the dataset at ``url``."""
    manifest = read_json(join(url, MANIFEST))
    fs, root = filesystem(url)
    entries = [s for name, info in manifest["splits"].items() if not splits or name in splits for s in info["shards"]]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(lambda e: check_shard(fs, root, e), entries))
    return {"shards": len(entries), "bytes": sum(e.get("bytes", 0) for e in entries),
            "bad": {e["name"]: p for e, p in zip(entries, problems) if p}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="dataset directory or fsspec URL (holding manifest.json)")
    ap.add_argument("--workers", type=int, default=8, help="shards read at a time")
    ap.add_argument("--split", action="append", help="only this split (repeatable)")
    add_verbose(ap)
    args = ap.parse_args(argv)
    return run_command("python -m shards.verify", lambda: _report(args), args.verbose)


def _report(args) -> int:
    try:
        report = verify(args.url, args.workers, args.split)
    except FileNotFoundError:
        print(f"error: no {MANIFEST} at {args.url}: not a published tbps dataset", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, KeyError) as e:
        print(f"error: cannot read {join(args.url, MANIFEST)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for name, problem in sorted(report["bad"].items()):
        print(f"BAD  {join(args.url, name)}: {problem}")
    bad = len(report["bad"])
    print(f"{args.url}: {report['shards'] - bad} of {report['shards']} shards match the manifest "
          f"({report['bytes'] / 2**20:.1f} MiB listed)" + (f"; {bad} bad: convert the dataset again" if bad else ""))
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
