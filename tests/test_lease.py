"""One driver per run (tbps/engine/lease.py): a second driver on a run whose driver is alive stops before Ray
starts, naming it; a dead or silent driver's lease is taken over; local and on object storage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tbps.engine.lease import LEASE, DriverLease, RunLeaseError


def _foreign_lease(path, host: str, pid: int, age_s: float = 0.0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    now = time.time()
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "token": "someone-else", "started": now - 3600,
                   "heartbeat": now - age_s}, f)


def test_a_second_driver_is_refused_while_the_first_lives(tmp_path):
    t0 = time.time()
    first = DriverLease(str(tmp_path), "run", stale_s=60, beat_s=0.2).acquire()
    try:
        time.sleep(1.5)  # heartbeats every 0.2 s
        with pytest.raises(RunLeaseError, match=rf"run 'run' is being trained by another driver \(host "
                                                rf"{socket.gethostname()}, pid {os.getpid()}, since "):
            DriverLease(str(tmp_path), "run", stale_s=60).acquire()
        doc = json.loads((tmp_path / "run" / LEASE).read_text())
        assert doc["heartbeat"] > t0 + 0.7  # refreshed by the first driver's thread after it acquired
    finally:
        first.release()
    assert not (tmp_path / "run" / LEASE).exists()
    with DriverLease(str(tmp_path), "run"):  # released: the next driver goes ahead
        assert (tmp_path / "run" / LEASE).exists()


def test_a_dead_or_silent_drivers_lease_is_taken_over(tmp_path):
    path = str(tmp_path / "run" / LEASE)
    _foreign_lease(path, "another-host", 1234, age_s=5)  # alive on another host: refused
    with pytest.raises(RunLeaseError, match="host another-host, pid 1234"):
        DriverLease(str(tmp_path), "run", stale_s=60).acquire()
    _foreign_lease(path, "another-host", 1234, age_s=120)  # silent for longer than stale_s: taken over
    DriverLease(str(tmp_path), "run", stale_s=60).acquire().release()
    gone = subprocess.Popen(["sleep", "30"])
    gone.kill()
    gone.wait()
    _foreign_lease(path, socket.gethostname(), gone.pid)  # this host, process gone (a killed driver): at once
    DriverLease(str(tmp_path), "run", stale_s=60).acquire().release()


def test_tbps_train_stops_before_ray_when_the_run_is_held(synth_tiny, tmp_path, capsys):
    import ray

    from tbps.train import main as train_main

    _foreign_lease(str(tmp_path / "held" / LEASE), "gpu-node-7", 4242)
    code = train_main(["--config", "clip_tiny", f"data.url={synth_tiny}", f"train.storage_path={tmp_path}",
                       "train.run_name=held"])
    assert code == 2
    err = capsys.readouterr().err
    assert "run 'held' is being trained by another driver (host gpu-node-7, pid 4242" in err, err
    assert not ray.is_initialized()


def test_the_lease_on_object_storage(s3_server):
    storage = f"s3://{s3_server['bucket']}/lease-test"
    first = DriverLease(storage, "run", stale_s=60, beat_s=0.2).acquire()
    try:
        with pytest.raises(RunLeaseError, match="is being trained by another driver"):
            DriverLease(storage, "run").acquire()
    finally:
        first.release()
    DriverLease(storage, "run").acquire().release()
