"""One driver per run: a lease file ``<storage>/<run>/driver.lease`` (local or on object storage).

Re-running the same command resumes a run (#18), so a second ``python -m tbps.train`` on a run whose first driver
is still alive -- a second terminal, a retried ``ray job submit`` -- would train the same run twice, both writing
its checkpoints, best/ and metrics.json. The driver therefore holds a lease: it writes the file when it starts,
refreshes its heartbeat every ``beat_s`` seconds from a thread, and deletes it when it ends. A driver that finds a
lease held by another live driver stops before Ray starts, naming the holder. A lease is taken over when it is
stale: its heartbeat is older than ``stale_s`` seconds, or its holder ran on this host and that process is gone (a
killed driver's run resumes at once). Object storage has no create-if-absent for every backend, so two drivers
starting within the same second could both write; each re-reads the lease after writing and the one whose token is
not there stops.

No Ray: the driver (``tbps.engine.launcher.fit``) takes it around the whole run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from shards.storage import filesystem, join, read_json, with_retries, write_bytes_atomic

LEASE = "driver.lease"


class RunLeaseError(RuntimeError):
    """Another live driver holds the run; the message names it and what to do."""

    is_user_error = True  # shards.cli: one message and exit code 2, no traceback


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DriverLease:
    def __init__(self, storage_path: str, run_name: str, stale_s: float | None = None, beat_s: float | None = None):
        self.run = run_name
        self.url = join(storage_path, run_name, LEASE)
        self.fs, self.path = filesystem(self.url)
        self.stale_s = float(os.environ.get("TBPS_LEASE_STALE_S", 60)) if stale_s is None else stale_s
        self.beat_s = min(self.stale_s / 4, 15.0) if beat_s is None else beat_s
        self.token = uuid.uuid4().hex
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file
    def _read(self) -> dict | None:
        try:
            return read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:  # half-written by a writer without atomic renames: treat as stale
            return {}

    def _write(self) -> None:
        doc = {"host": self.host, "pid": self.pid, "token": self.token, "started": self.started,
               "heartbeat": time.time()}
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else self.path
        with_retries("write", self.url, lambda: self.fs.makedirs(parent, exist_ok=True))
        write_bytes_atomic(self.fs, self.path, json.dumps(doc).encode())

    def holder(self) -> dict | None:
        """The live lease another driver holds, or None (no lease, ours, or stale)."""
        doc = self._read()
        if not doc or doc.get("token") == self.token:
            return None
        if time.time() - float(doc.get("heartbeat", 0)) > self.stale_s:
            return None
        if doc.get("host") == self.host and not _alive(int(doc.get("pid", -1))):
            return None
        return doc

    def _refuse(self, doc: dict) -> RunLeaseError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("started", 0))))
        beat = time.time() - float(doc.get("heartbeat", 0))
        return RunLeaseError(
            f"run {self.run!r} is being trained by another driver (host {doc.get('host')}, pid {doc.get('pid')}, since {since}, "
            f"alive {beat:.0f} s ago): wait for it to finish, or stop it; its lease {self.url} goes stale "
            f"{self.stale_s:.0f} s after its driver dies (at once on the same host)")

    # -- taking and giving back
    def acquire(self) -> "DriverLease":
        doc = self.holder()
        if doc:
            raise self._refuse(doc)
        self._write()
        time.sleep(min(0.5, self.beat_s))  # a driver that wrote at the same moment: the last write wins
        current = self._read()
        if current and current.get("token") != self.token:
            raise self._refuse(current)
        self._thread = threading.Thread(target=self._beat, name="tbps-driver-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except Exception as e:  # a storage hiccup must not kill the run; the next beat retries
                print(f"[tbps] could not refresh the driver lease {self.url}: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        doc = self._read()
        if doc is not None and doc.get("token") == self.token:
            with_retries("delete", self.url, lambda: self.fs.rm(self.path))

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
