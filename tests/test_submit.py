"""`ray job submit -- python -m tbps.train / tune.sweep ...` against a running Ray head on loopback (real CLI, real
cluster)."""

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


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with the dashboard (the job server), started by the real `ray start` CLI."""
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
        yield {"env": env, "address": f"http://127.0.0.1:{dash}"}
    finally:
        _ray("stop", "--force", env=env, timeout=120)


def _submit(head, *entrypoint):
    runtime_env = json.dumps({"excludes": [".venv", ".git", "runs", "*.egg-info"]})
    job = _ray("job", "submit", f"--address={head['address']}", "--working-dir", ".", "--runtime-env-json",
               runtime_env, "--", *entrypoint, env=head["env"], timeout=600)
    out = re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)
    assert job.returncode == 0, out[-6000:]
    assert re.search(r"Job '[^']+' succeeded", out), out[-2000:]
    return out


def test_ray_job_submit_trains_and_writes_metrics(ray_head, synth_tiny, tmp_path):
    storage = tmp_path / "runs"
    out = _submit(ray_head, "python", "-m", "tbps.train", "--config", "clip_tiny", f"data.url={synth_tiny}",
                  "data.batch_size=8", "train.epochs=1", "train.num_workers=2", f"train.storage_path={storage}",
                  "train.run_name=submitted")
    metrics = json.load(open(storage / "submitted" / "metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert set(metrics["test"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert re.search(r"^test\s+[0-9.]+", out, re.M)  # the final table reached the submitting client


def test_ray_job_submit_runs_a_sweep(ray_head, synth_tiny, tmp_path):
    storage = tmp_path / "sweeps"
    out = _submit(ray_head, "python", "-m", "tune.sweep", "--config", "smoke", f"data_url={synth_tiny}",
                  f"storage_path={storage}", "name=submitted", "num_samples=2", "train.epochs=1",
                  "train.max_steps_per_epoch=2")
    assert "2 trials over irra, pcc" in out
    table = open(storage / "submitted" / "results.md").read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 2 and {r.split("|")[3].strip() for r in rows} == {"irra", "pcc"}, table
    assert all("completed" in r or "stopped early (ASHA)" in r for r in rows), table
    assert any("completed" in r for r in rows), table
    assert (storage / "submitted" / "best.yaml").exists()
