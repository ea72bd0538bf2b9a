"""fsspec-backed URL opener for webdataset (1.0.2 ships none for s3:// and friends)."""

from __future__ import annotations

import importlib

import fsspec

# ``import webdataset.gopen`` would give the *function* webdataset re-exports under that name, not the module
wds_gopen = importlib.import_module("webdataset.gopen")

SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory", "hdfs", "webhdfs")


def _fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
    # A new file system per shard: s3fs instances (and their event loops) are not fork-safe, and loader workers
    # are forked. skip_instance_cache keeps fsspec from handing back an instance made in the parent process.
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    return fs.open(path, mode, block_size=8 * 2**20)


def register_fsspec_gopen() -> None:
    """Make webdataset open s3://, gs://, ... URLs through fsspec. Idempotent; call again in each loader worker
    when workers are spawned rather than forked (the registration lives in module state)."""
    for scheme in SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _fsspec_gopen


register_fsspec_gopen()
