"""The driver's console (tbps.engine.console): Ray, DeepSpeed and torch noise out, tbps's lines without Ray's
prefixes, rank 0's progress events as a progress bar on a terminal and as plain lines elsewhere. (The real runs'
output is checked in tests/test_submit.py and tests/test_tune.py.)"""

from __future__ import annotations

import io
import re

from tbps.engine.console import Console, format_event, progress_line

EVENT = {"epoch": 1, "epochs": 2, "step": 3, "steps": 5, "loss": 41.5, "lr": 1e-4, "samples_per_s": 96.0,
         "parts": {"sdm": 30.0, "mlm": 4.5, "id": 7.0}}
NOISE = [
    "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/r/c), metrics={})",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/checkpoint_1)",
    "Requesting resources: {'CPU': 1} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=24053) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "[2026-11-24 07:46:48,271 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: ...",
    "[2026-11-24 07:46:52,795] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If "
    "you have GPU or other accelerator, we were unable to detect it.",
    "[rank0]:W1124 07:46:53.267000 24053 torch/utils/cpp_extension.py:183] No CUDA runtime is found, using "
    "CUDA_HOME='/usr/local'",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
]


def _console(tty: bool):
    out, err = io.StringIO(), io.StringIO()
    return Console("bar", out=out, err=err, tty=tty), out, err


def test_noise_is_dropped_and_other_lines_pass_without_prefix():
    c, out, err = _console(tty=False)
    c.handle({"pid": 24053, "actor_name": "RayTrainWorker", "is_err": True, "lines": NOISE + ["Traceback (most "
                                                                                             "recent call last):"]})
    c.handle({"pid": 24053, "is_err": False, "lines": ["[tbps] epoch 1 val (val): R1 2.92", progress_line(EVENT)]})
    assert err.getvalue() == "Traceback (most recent call last):\n"  # an error is never hidden
    assert out.getvalue() == "[tbps] epoch 1 val (val): R1 2.92\n" + format_event(EVENT) + "\n"
    assert format_event(EVENT) == ("[tbps] epoch 1/2 step 3/5 loss 41.5000 (sdm 30.000 mlm 4.500 id 7.000) lr "
                                   "1.00e-04 96 samples/s")


def test_progress_events_draw_one_bar_per_epoch_on_a_terminal():
    c, out, err = _console(tty=True)
    for step in range(1, 6):
        c.handle({"lines": [progress_line({**EVENT, "step": step})]})
        if step == 2:
            c.handle({"lines": ["[tbps] a line while the bar runs"]})
    c.handle({"lines": [progress_line({**EVENT, "epoch": 2, "step": 1})]})
    c.close()
    bars = err.getvalue()
    assert re.search(r"epoch 1/2: 100%\|[^\n]*\| 5/5 \[[^\n]*loss 41\.5000 \(sdm 30\.000 mlm 4\.500 id 7\.000\) lr "
                     r"1\.00e-04 96 sample", bars), bars  # (cut at the width)
    assert "epoch 2/2:  20%" in bars
    assert out.getvalue() == "[tbps] a line while the bar runs\n"  # printed above the bar, once


def test_sweeps_drop_progress_events():
    c = Console("none", out=io.StringIO(), err=io.StringIO(), tty=True)
    c.handle({"lines": [progress_line(EVENT), "[tbps] resumed from checkpoint of epoch 1 (step 5)"]})
    assert c.out.getvalue() == "[tbps] resumed from checkpoint of epoch 1 (step 5)\n" and c.err.getvalue() == ""
    assert c.bar is None
