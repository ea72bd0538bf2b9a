"""One storage abstraction for every dataset location: fsspec URLs (local paths, file://, s3://, gs://, ...)."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import posixpath
import random
import shutil
import sys
import time
import uuid
from typing import Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

MANIFEST = "manifest.json"
RETRY_ENV = "TBPS_STORAGE_RETRY_S"  # seconds a storage operation keeps retrying transient errors (default 120)
DEFAULT_RETRY_S = 120.0
T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY}
# object-store answers that mean "try again" (throttling, a server restarting)
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"}


class StorageUnavailableError(OSError):
    """Storage kept failing with transient errors (connection refused or reset, timeouts, throttling) for longer
    than the retry budget."""


def retry_budget() -> float:
    """Seconds to keep retrying a transient storage error: ``$TBPS_STORAGE_RETRY_S`` (forwarded to Ray workers with
    every ``TBPS_*`` variable), default 120; 0 turns retrying off."""
    value = os.environ.get(RETRY_ENV, "")
    try:
        budget = float(value) if value else DEFAULT_RETRY_S
    except ValueError:
        raise ValueError(f"{RETRY_ENV} must be a number of seconds, got {value!r}") from None
    if budget < 0:
        raise ValueError(f"{RETRY_ENV} must be >= 0, got {value!r}")
    return budget


# errors that mean a bug in the code that raised them, never a problem of the input or the storage
BUG_TYPES = (NameError, AttributeError, TypeError, AssertionError, ZeroDivisionError, IndexError, NotImplementedError,
             RecursionError)


def error_chain(error: BaseException):
    """``error``, then what it wraps, outermost first: Ray Train's worker failures (``worker_failures``,
    ``controller_failure``), ``cause``, ``__cause__``/``__context__``; each error once."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> the worker's error
        if isinstance(failures, dict):
            todo += [failures[k] for k in sorted(failures)]
        for attr in ("controller_failure", "cause"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        # an error raised while another was handled has it as __context__; a bug raised that way (a NameError in an
        # except block) is not the handled error: following it would print the handled error's message as a user
        # error and hide the bug's traceback
        todo += [e.__cause__] if isinstance(e, BUG_TYPES) else [e.__cause__, e.__context__]


def is_transient(error: BaseException) -> bool:
    """A storage error worth retrying: the connection or the service, not the request (a missing object, denied
    access, bad credentials and corrupt data are not). Looks through wrapped errors (``error_chain``)."""
    for error in error_chain(error):
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        module = type(error).__module__ or ""
        names = {c.__name__ for c in type(error).__mro__}
        if module.startswith("botocore") and names & {"ConnectionError", "HTTPClientError", "ReadTimeoutError",
                                                      "ConnectTimeoutError", "ConnectionClosedError"}:
            return True
        if module.startswith("aiohttp") and "ClientError" in names:
            return True
        if "FSTimeoutError" in names:
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return True
    return False


def with_retries(what: str, url: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """``fn()``, retried on transient storage errors with exponential backoff (0.5 s doubling to 15 s, jittered) for
    at most ``budget`` seconds (``retry_budget()``); each retry is logged. Past the budget: StorageUnavailableError
    naming ``what`` and ``url``. Other errors pass through at once."""
    budget = retry_budget() if budget is None else budget
    start, delay, attempt = time.monotonic(), 0.5, 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            attempt += 1
            elapsed = time.monotonic() - start
            if elapsed + delay > budget:
                raise StorageUnavailableError(
                    f"storage unavailable: {what} {url} failed {attempt} time(s) over {elapsed:.0f} s "
                    f"(last: {type(e).__name__}: {e}). Check the endpoint and the network; {RETRY_ENV} sets how "
                    f"long to keep retrying (now {budget:g} s)") from e
            wait = delay * (1 + 0.25 * random.random())
            print(f"[tbps] storage: {what} {url} failed ({type(e).__name__}: {str(e)[:200]}); retry {attempt} in "
                  f"{wait:.1f} s ({elapsed:.0f} of {budget:g} s used)", file=sys.stderr, flush=True)
            time.sleep(wait)
            delay = min(delay * 2, 15.0)


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


def read_bytes(url: str) -> bytes:
    """The whole object at ``url``, retrying transient storage errors (``with_retries``)."""
    def read():
        with fsspec.open(url, "rb") as f:
            return f.read()
    return with_retries("read", url, read)


def read_json(url: str):
    return json.loads(read_bytes(url).decode("utf-8"))


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
        def put():
            with fs.open(path, "wb") as f:
                f.write(data)
        with_retries("write", path, put)


# ------------------------------------------------------------------------------ webdataset URLs, remote files
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
    fs, path = url_to_fs(url)
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
