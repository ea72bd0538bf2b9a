"""`ray job submit -- python -m tbps.train ...` against a running Ray head on loopback (real CLI, real cluster)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _ray(*args, env, timeout=600):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_trains_and_writes_metrics(synth_tiny, tmp_path):
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # the job's `python` must be this interpreter (CI runs pytest through .venv/bin/python without activating it)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    start = _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--temp-dir={ray_tmp}", "--disable-usage-stats", env=env, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        storage = tmp_path / "runs"
        runtime_env = json.dumps({"excludes": [".venv", ".git", "runs", "*.egg-info"]})
        job = _ray("job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                   "--runtime-env-json", runtime_env, "--",
                   "python", "-m", "tbps.train", "--config", "clip_tiny", f"data.url={synth_tiny}",
                   "data.batch_size=8", "train.epochs=1", "train.num_workers=2", f"train.storage_path={storage}",
                   "train.run_name=submitted", env=env, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        out = re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)
        assert re.search(r"Job '[^']+' succeeded", out), out[-2000:]
        metrics = json.load(open(storage / "submitted" / "metrics.json"))
        assert [h["epoch"] for h in metrics["history"]] == [1]
        assert set(metrics["test"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
        assert re.search(r"^test\s+[0-9.]+", out, re.M)  # the final table reached the submitting client
    finally:
        _ray("stop", "--force", env=env, timeout=120)
