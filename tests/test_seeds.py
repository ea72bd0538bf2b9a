"""Seeds with confidence (tbps/seeds.py, train.seeds): the summary's arithmetic over three seeds, and seeds trained
concurrently on a real local Ray (two, to keep CI short), summarised from their own metrics.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tbps.seeds import aggregate, markdown, summarize, t95


def test_mean_std_and_the_95_percent_interval():
    s = summarize([70.0, 72.0, 74.0])
    assert s["n"] == 3 and s["mean"] == 72.0 and s["std"] == pytest.approx(2.0)
    half = 4.303 * 2.0 / math.sqrt(3)  # Student's t, 2 degrees of freedom
    assert s["ci95"] == pytest.approx([72.0 - half, 72.0 + half])
    assert math.isnan(summarize([70.0])["std"])
    # beyond the table (30 degrees of freedom): Student's t, not the normal's 1.96 (4 % below t at 31)
    for df, t in ((30, 2.042), (31, 2.040), (40, 2.021), (60, 2.000), (120, 1.980)):
        assert t95(df) == pytest.approx(t, abs=1e-3), df
    runs = {0: {"test": {"R1": 70.0, "mAP": 60.0}, "val": {"R1": 71.0}}, 1: {"test": {"R1": 72.0, "mAP": 62.0},
                                                                           "val": {"R1": 73.0}}}
    agg = aggregate(runs)
    assert agg["test"]["R1"]["mean"] == 71.0 and agg["val"]["R1"]["values"] == [71.0, 73.0]
    text = markdown(agg, "t")
    assert "| R1 | 71.00 ± 1.41 | [58.29, 83.71] | 70.00, 72.00 |" in text
    assert "failed" not in text and "failed" not in agg
    # a seed that failed (diverged, crashed) is not averaged in, and the summary says so: without it the mean of
    # the seeds that trained through reads better than the configuration is
    agg = aggregate(runs, {2: "training diverged: step 12"})
    assert agg["failed"] == {2: "training diverged: step 12"} and agg["test"]["R1"]["n"] == 2
    assert ("1 more seed(s) failed and are not in these numbers**: seed 2: training diverged: step 12. The "
            "configuration did not train through with 1 of 3 seeds.") in markdown(agg, "t")


@pytest.mark.slow
def test_seeds_train_concurrently_and_are_summarised(synth_tiny, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "tbps.train", "--config", "clip_tiny", f"data.url={synth_tiny}",
           f"train.storage_path={tmp_path}", "train.run_name=s", "train.seeds=[3,7]", "train.epochs=1",
           "train.num_workers=1", "data.batch_size=8", "train.max_steps_per_epoch=2", "train.ray_num_cpus=4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    summary = json.loads((tmp_path / "s" / "seeds.json").read_text())
    runs = [json.loads((tmp_path / f"s-seed{s}" / "metrics.json").read_text()) for s in (3, 7)]
    assert summary["seeds"] == [3, 7]
    assert summary["test"]["R1"]["values"] == [r["test"]["R1"] for r in runs]
    assert summary["test"]["mAP"]["n"] == 2 and runs[0]["test"]["mAP"] != runs[1]["test"]["mAP"]  # seeds differ
    assert all(r["history"][0]["world_size"] == 1 for r in runs)
    assert (tmp_path / "s" / "seeds.md").read_text() in out.stdout
    assert "[tbps seed 7] epoch 1 val" in out.stdout  # each run's lines are named
