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
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}"}
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


# one run configuration for the submitted job and the driver killed mid-epoch: their final metrics must agree
TRAIN = ["--config", "clip_tiny", "data.batch_size=8", "train.epochs=2", "train.eval_every=0", "train.num_workers=2",
         "train.checkpoint_every_steps=3", "train.log_every=1"]


@pytest.fixture(scope="module")
def submitted(ray_head, synth_tiny, tmp_path_factory):
    storage = tmp_path_factory.mktemp("submitted") / "runs"
    out = _submit(ray_head, "python", "-m", "tbps.train", *TRAIN, f"data.url={synth_tiny}",
                  f"train.storage_path={storage}", "train.run_name=submitted")
    return out, json.load(open(storage / "submitted" / "metrics.json"))


def test_ray_job_submit_trains_and_writes_metrics(submitted):
    out, metrics = submitted
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["test"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert re.search(r"^test\s+[0-9.]+", out, re.M)  # the final table reached the submitting client
    # the driver's console: tbps's lines, progress as plain lines (not a terminal), none of Ray's per-report lines,
    # DeepSpeed's accelerator warning or the workers' prefixes
    assert re.search(r"^\[tbps\] epoch 2/2 step \d+/\d+ loss [0-9.]+ \(itc [0-9.]+\) lr ", out, re.M), out[-3000:]
    for noise in ("Reporting training result", "Checkpoint successfully created", "(RayTrainWorker pid=",
                  "Setting accelerator to CPU", "CUDA_HOME"):
        assert noise not in out, noise


def _mid_epoch_checkpoints(run_dir, epoch: int) -> list[str]:
    found = []
    for d in sorted(run_dir.glob("checkpoint_*")) if run_dir.exists() else []:
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):  # not yet complete
            continue
        if meta.get("mid_epoch") == epoch:
            found.append(d.name)
    return found


def test_driver_killed_mid_epoch_then_rerun_finishes_with_the_uninterrupted_metrics(ray_head, submitted, synth_tiny,
                                                                                       tmp_path):
    """SIGKILL of `python -m tbps.train` (the driver, on a running cluster) after a mid-epoch checkpoint of epoch 2;
    the same command again resumes from the run's last checkpoint and ends with the submitted run's metrics."""
    import signal
    import time

    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tbps.train", *TRAIN, f"data.url={synth_tiny}", f"train.storage_path={storage}",
           "train.run_name=killed"]
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not _mid_epoch_checkpoints(storage / "killed", 2):
        assert driver.poll() is None, "the run ended before a mid-epoch checkpoint of epoch 2: " + \
            (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    assert not (storage / "killed" / "metrics.json").exists() or \
        "test" not in json.loads((storage / "killed" / "metrics.json").read_text())

    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    (tmp_path / "second.log").write_text(out)
    assert again.returncode == 0, out[-4000:]
    # from the last checkpoint Ray registered before the driver died (its registration can lag the upload)
    assert re.search(r"\[tbps\] resumed (mid-epoch [12]: after batch|from checkpoint of epoch 1)", out), out[-4000:]
    metrics = json.loads((storage / "killed" / "metrics.json").read_text())
    _, reference = submitted
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    timing = ("samples_per_s", "eval_seconds", "val_eval_seconds")
    for got, want in zip(metrics["history"], reference["history"], strict=True):
        assert {k: v for k, v in got.items() if k not in timing} == \
            pytest.approx({k: v for k, v in want.items() if k not in timing}, rel=1e-5)
    assert {k: v for k, v in metrics["test"].items() if k not in timing} == \
        pytest.approx({k: v for k, v in reference["test"].items() if k not in timing}, rel=1e-5)


def test_ray_job_submit_runs_a_sweep(ray_head, synth_tiny, tmp_path):
    storage = tmp_path / "sweeps"
    # one epoch and no ASHA rung before it (grace_period 2): both trials complete, 2 at a time on the 4-CPU head
    out = _submit(ray_head, "python", "-m", "tune.sweep", "--config", "smoke", f"data_url={synth_tiny}",
                  f"storage_path={storage}", "name=submitted", "num_samples=2", "train.epochs=1",
                  "train.max_steps_per_epoch=2", "seeds=2", "train.num_workers=1", "scheduler.grace_period=2")
    assert "2 trials over irra, pcc, 2 at a time" in out
    exp = storage / "submitted"
    table = open(exp / "results.md").read().split("## Seeds")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 2 and {r.split("|")[3].strip() for r in rows} == {"irra", "pcc"}, table
    assert all(r.rstrip().endswith("| completed |") for r in rows), table
    # seeds=2: each method's best configuration trained again with 2 seeds, all runs at once; mean ± std and the
    # 95 % interval in results.md, best.yaml chosen by the mean. Each trial completed with seed 0: its own run
    # stands for seed 0, so only seed 1 of each is trained
    assert re.search(r"with 2 seeds each \(2 runs; irra seed 0: its search trial's own finished run; pcc seed 0: "
                     r"its search trial's own finished run\)", out), out[-3000:]
    assert sorted(p.name for p in (exp / "seeds").iterdir()) == ["irra-seed1", "pcc-seed1"]
    section = open(exp / "results.md").read().split("## Seeds")[1]
    seed_rows = [line for line in section.splitlines() if line.startswith("| irra") or line.startswith("| pcc")]
    assert len(seed_rows) == 2, section
    assert all(re.search(r"\d+\.\d\d ± \d+\.\d\d \[", r) and r.endswith("| 2 |") for r in seed_rows), section
    for method in ("irra", "pcc"):
        trial = next(r.split("|")[2].strip() for r in rows if r.split("|")[3].strip() == method)
        own = json.loads((exp / "runs" / trial / "metrics.json").read_text())
        seed1 = json.loads((exp / "seeds" / f"{method}-seed1" / "metrics.json").read_text())
        assert seed1["history"][-1]["epoch"] == 1 and "test" in seed1
        assert f"{method} seed 0 (trial {trial})" in section
        row = next(r for r in seed_rows if r.startswith(f"| {method} "))
        mean = (own["test"]["mAP"] + seed1["test"]["mAP"]) / 2  # seed 0 is the trial's own test
        assert row.split("|")[6].strip().startswith(f"{mean:.2f} ± "), (row, mean)
    assert "# Chosen by the mean over 2 seeds" in open(exp / "best.yaml").read()
