"""fsspec-backed URL opener for webdataset (1.0.2 ships none for s3:// and friends)."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil

import fsspec


SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory", "hdfs", "webhdfs")


_FS_BY_PROCESS: dict[tuple[int, str], object] = {}


def _filesystem(url: str):
    """One file system per (process, protocol): s3fs instances (and their event loops) are not fork-safe, so a
    loader worker never reuses the parent's; within a process, creating a client per shard would cost more than
    reading the shard."""
    protocol = url.split("://", 1)[0]
    key = (os.getpid(), protocol)
    fs = _FS_BY_PROCESS.get(key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        _FS_BY_PROCESS[key] = fs
    return fs


def _fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
    fs = _filesystem(url)
    return fs.open(fs._strip_protocol(url), mode, block_size=8 * 2**20)


def register_fsspec_gopen() -> None:
    """Make webdataset open s3://, gs://, ... URLs through fsspec. Idempotent; call again in each loader worker
    when workers are spawned rather than forked (the registration lives in module state)."""
    # ``import webdataset.gopen`` would give the *function* webdataset re-exports under that name, not the module;
    # imported here so that reading weights (local_copy) needs no webdataset
    wds_gopen = importlib.import_module("webdataset.gopen")
    for scheme in SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _fsspec_gopen


def local_copy(url: str) -> str:
    """A local path for ``url``: local paths pass through; remote files/directories (s3://, ...) are copied once
    into a cache keyed by the URL (``$TBPS_CACHE/remote``). Raises FileNotFoundError when the URL does not exist."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        return path
    cache = os.path.join(os.path.expanduser(os.environ.get("TBPS_CACHE", "~/.cache/tbps")), "remote",
                         # keep the file name: readers choose a format by extension (.safetensors, .bin)
                         hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + url.rstrip("/").rsplit("/", 1)[-1])
    if os.path.exists(cache):
        return cache
    from shards.storage import with_retries

    fs, path = fsspec.core.url_to_fs(url)
    if not with_retries("look up", url, lambda: fs.exists(path)):
        raise FileNotFoundError(f"{url} does not exist")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.part-{os.getpid()}"

    def get():
        shutil.rmtree(tmp, ignore_errors=True)  # a retry starts over
        if os.path.exists(tmp):
            os.remove(tmp)
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        else:
            fs.get(path, tmp)
    with_retries("download", url, get)
    os.replace(tmp, cache)
    return cache
