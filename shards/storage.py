"""One storage abstraction for every dataset location: fsspec URLs (local paths, file://, s3://, gs://, ...)."""

from __future__ import annotations

import json
import os
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs

MANIFEST = "manifest.json"


def filesystem(url: str):
    """Return ``(fs, root_path)`` for a dataset URL; local paths are made absolute."""
    if "://" not in url:
        url = os.path.abspath(url)
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path (URLs always use '/')."""
    if "://" in url:
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def read_json(url: str):
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write a whole object so that readers see either nothing or all of it.

    Object stores publish an object only when its upload completes; on a local file system we write a temporary
    sibling and rename it over the target.
    """
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
