"""The training loop in-process (tbps/engine/loop.py ``TrainRun``, on a 1-rank gloo group, no Ray): two epochs with
mid-epoch checkpoints (``train.checkpoint_every_steps``), a run killed after one of them and resumed from it.
The resumed run trains on exactly the batches of the uninterrupted one -- none repeated, none skipped, in the same
order, two loader workers interleaved -- and ends with the same metrics."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from ranks import run_ranks

EVERY = 3  # train.checkpoint_every_steps
STEPS = 8  # train.max_steps_per_epoch


class Killed(Exception):
    """Stands for the worker's death (SIGKILL) a few batches after a checkpoint was persisted."""


def _config(url: str, storage: str, epochs: int = 2, extra: list[str] | None = None):
    from tbps.config import load_config

    return load_config("irra_tiny", [f"data.url={url}", "data.batch_size=8", "data.loader_workers=2",
                                     f"train.epochs={epochs}", f"train.checkpoint_every_steps={EVERY}",
                                     f"train.max_steps_per_epoch={STEPS}", "train.eval_every=0",
                                     f"train.storage_path={storage}", "train.run_name=loop", "train.log_every=100", *(extra or [])])


def _loop_main(rank, url, out_dir):
    import multiprocessing

    from tbps.engine.loop import TrainRun

    # loader workers fork, as in a Ray worker (a process started by spawn makes spawn its default: seconds a worker)
    multiprocessing.set_start_method("fork", force=True)

    results = {}

    def make(name, reports, seen, kill_after=None, storage=None):
        state = {"checkpoints": 0, "kill_at": None}

        def report(metrics, checkpoint_dir):
            reports.append(dict(metrics))
            if checkpoint_dir is not None:
                state["checkpoints"] += 1
                keep = os.path.join(out_dir, name, f"checkpoint{state['checkpoints']}")
                shutil.copytree(checkpoint_dir, keep)  # what Ray persists of the reported directory
                if state["checkpoints"] == kill_after:
                    state["kill_at"] = len(seen) + 2  # dies 2 batches later: work after the checkpoint is lost

        def on_batch(epoch, index, batch):
            if state["kill_at"] is not None and len(seen) == state["kill_at"]:
                raise Killed()
            seen.append((epoch, index, [f"{k}#{c}" for k, c in zip(batch["keys"], batch["caption_index"])]))

        return TrainRun(_config(url, os.path.join(out_dir, storage or name)), rank, 1, torch.device("cpu"), report,
                        on_batch=on_batch)

    # uninterrupted
    reports, seen = [], []
    final = make("whole", reports, seen).run()
    results["whole"] = {"reports": reports, "seen": seen, "final": final}

    # killed 2 batches after its 4th checkpoint (epoch 2 after batch 3), then resumed from that checkpoint
    reports, seen = [], []
    run = make("killed", reports, seen, kill_after=4)
    with pytest.raises(Killed):
        run.run()
    checkpoint = reports[-1]
    killed_seen = list(seen)
    resumed_reports, resumed_seen = [], []
    run = make("resumed", resumed_reports, resumed_seen, storage="killed")  # a re-run: the same run outputs
    run.resume(os.path.join(out_dir, "killed", "checkpoint4"))
    final = run.run()
    results["killed"] = {"checkpoint": checkpoint, "seen_before": killed_seen, "reports": resumed_reports,
                         "seen_after": resumed_seen, "final": final, "before_reports": reports,
                         "batches": run.batches, "start_epoch": run.start_epoch}

    # eval.test_every_epoch: the papers' test-selected protocol beside ours
    cfg = _config(url, os.path.join(out_dir, "protocols"), 3, ["train.checkpoint_every_steps=0", "train.eval_every=1",
                                                                 "eval.test_every_epoch=true", "data.loader_workers=0",
                                                                 "train.select_metric=mAP"])
    run = TrainRun(cfg, rank, 1, torch.device("cpu"), lambda metrics, checkpoint_dir: None)
    results["protocols"] = {"final": run.run()}
    with open(os.path.join(out_dir, "loop.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def loop_results(synth_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    run_ranks(_loop_main, 1, synth_tiny, str(out))
    return json.load(open(out / "loop.json")), out


def test_mid_epoch_resume_trains_on_the_same_batches_and_ends_with_the_same_metrics(loop_results):
    results, _ = loop_results
    whole, killed = results["whole"], results["killed"]
    batches = killed["batches"]
    assert batches == STEPS
    # every mid-epoch checkpoint is reported, with where it stands
    mid = [r for r in whole["reports"] if "mid_epoch" in r]
    per_epoch = (batches - 1) // EVERY
    assert len(mid) == 2 * per_epoch and [r["batches_done"] for r in mid[:per_epoch]] == \
        [EVERY * k for k in range(1, per_epoch + 1)]
    # the checkpoint the run died after: mid-epoch 2
    ckpt = killed["checkpoint"]
    assert ckpt["mid_epoch"] == 2 and killed["start_epoch"] == 1
    done = ckpt["batches_done"]
    # what reached the final model: the batches up to the checkpoint, then those after it, as uninterrupted
    before = [s for s in killed["seen_before"] if s[0] == 0 or s[1] < done]
    assert len(killed["seen_before"]) == len(before) + 2  # two batches were lost with the worker
    trained = before + killed["seen_after"]
    assert [tuple(s[:2]) for s in trained] == [tuple(s[:2]) for s in whole["seen"]]
    assert trained == whole["seen"]
    epoch2 = [k for s in trained if s[0] == 1 for k in s[2]]
    assert len(epoch2) == len(set(epoch2)) == batches * 8  # no (image, caption) pair twice, none lost
    # the same metrics: the epoch's loss means (sums carried across the resume), val, test
    timing = ("samples_per_s", "val_eval_seconds", "test_eval_seconds")
    assert {k: v for k, v in killed["final"].items() if k not in timing} == \
        pytest.approx({k: v for k, v in whole["final"].items() if k not in timing}, rel=1e-6)
    w_epochs = [r for r in whole["reports"] if "mid_epoch" not in r and "test_R1" not in r]
    k_epochs = [r for r in killed["before_reports"] + killed["reports"] if "mid_epoch" not in r and
                "test_R1" not in r]
    for w, k in zip(w_epochs, k_epochs, strict=True):
        for key in w:
            if key not in timing:
                assert k[key] == pytest.approx(w[key], rel=1e-6), key


def test_run_outputs_after_a_mid_epoch_resume(loop_results):
    """metrics.json of the resumed run: both epochs once each; every checkpoint directory can be evaluated."""
    results, out = loop_results
    metrics = json.load(open(out / "killed" / "loop" / "metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    whole = json.load(open(out / "whole" / "loop" / "metrics.json"))
    assert {k: v for k, v in metrics["test"].items() if k != "eval_seconds"} == \
        pytest.approx({k: v for k, v in whole["test"].items() if k != "eval_seconds"}, rel=1e-6)
    meta = json.load(open(out / "killed" / "checkpoint4" / "meta.json"))
    assert meta["mid_epoch"] == 2 and meta["batches_done"] == results["killed"]["checkpoint"]["batches_done"]


def test_test_selected_protocol_is_reported_beside_ours(loop_results):
    """#17 item 5: eval.test_every_epoch adds the best *test* epoch, labelled as the papers' protocol; ours stays the
    test of the best val epoch (equal to that epoch's per-epoch test), and the final table shows both rows."""
    from tbps.engine.loop import TEST_SELECTED
    from tbps.train import final_table

    _, out = loop_results
    metrics = json.load(open(out / "protocols" / "loop" / "metrics.json"))
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all("test_mAP" in h and "val_mAP" in h for h in history)
    best_test = max(history, key=lambda h: h["test_mAP"])
    selected = metrics["test_selected"]
    assert selected["label"] == TEST_SELECTED and selected["epoch"] == best_test["epoch"]
    assert selected["metrics"]["mAP"] == best_test["test_mAP"]
    best_val = max(history, key=lambda h: h["val_mAP"])
    assert metrics["best_val"]["epoch"] == best_val["epoch"]
    for k in ("R1", "R5", "R10", "mAP", "mINP"):  # ours: test with the best val epoch's weights
        assert metrics["test"][k] == pytest.approx(best_val[f"test_{k}"], abs=1e-9), k
    assert best_val["epoch"] != best_test["epoch"]  # this run's two protocols pick different epochs (3 vs 1)
    table = final_table(metrics)
    assert f"test-selected (the papers' protocol), ep {best_test['epoch']}" in table
    assert f"test (at best val, ep {best_val['epoch']})" in table


def test_mid_epoch_checkpoint_settings_are_checked(synth_tiny):
    """A negative interval, a sweep asking for mid-epoch checkpoints, and a data position from another world size
    each stop with a message naming the problem."""
    from tbps.config import ConfigError, load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.engine.launcher import preflight
    from tune.space import load_sweep

    with pytest.raises(ConfigError, match=r"train.checkpoint_every_steps must be >= 0 \(0 = at epoch ends only\)"):
        load_config("clip_tiny", [f"data.url={synth_tiny}", "train.checkpoint_every_steps=-1"])
    cfg = load_config("clip_tiny", [f"data.url={synth_tiny}"])
    cfg.train.checkpoint_every_steps = -1  # changed in code: pre-flight checks again
    with pytest.raises(ConfigError, match="train.checkpoint_every_steps must be >= 0"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="checkpoint_every_steps is for training runs, not sweeps"):
        load_sweep("smoke", [f"data_url={synth_tiny}", "train.checkpoint_every_steps=2"])
    cfg = load_config("clip_tiny", [f"data.url={synth_tiny}", "data.loader_workers=0", "data.batch_size=8"])
    tok = load_tokenizer(f"{synth_tiny}/tokenizer")
    two_ranks = build_train_loader(cfg.data, tok, rank=0, world_size=2)
    batches = iter(two_ranks)
    next(batches)
    position = two_ranks.position()
    assert position["count"] == 1 and position["taken"] == [1] and position["world_size"] == 2
    one_rank = build_train_loader(cfg.data, tok)
    with pytest.raises(ValueError, match="cannot continue the epoch from data position.*same number of workers"):
        one_rank.set_epoch(0, position)


def _elastic_first(rank, url, out_dir, stage):
    """2 ranks: epoch 1, then into epoch 2 until one mid-epoch checkpoint is reported; each rank's checkpoint files
    merged into one directory, as Ray merges what the workers report."""
    import multiprocessing

    from tbps.engine.loop import TrainRun

    multiprocessing.set_start_method("fork", force=True)
    cfg = _config(url, os.path.join(out_dir, "runs"), 2, [f"train.zero_stage={stage}", "train.num_workers=[1, 2]",
                                                          "data.loader_workers=0", "train.checkpoint_every_steps=2"])
    state = {"n": 0, "stop": False}

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            state["n"] += 1
            shutil.copytree(checkpoint_dir, os.path.join(out_dir, f"ckpt{state['n']}"), dirs_exist_ok=True)
            if metrics.get("mid_epoch") == 2:
                state["stop"] = True

    def on_batch(epoch, index, batch):
        if state["stop"]:
            raise Killed()

    run = TrainRun(cfg, rank, 2, torch.device("cpu"), report, on_batch=on_batch)
    try:
        run.run()
    except Killed:
        pass
    with open(os.path.join(out_dir, f"first{rank}.json"), "w") as f:
        json.dump({"checkpoints": state["n"], "steps_per_epoch": run.steps_per_epoch}, f)


def _elastic_rest(rank, url, out_dir, stage):
    """1 rank (a node was lost): resumes the 2-rank mid-epoch checkpoint and finishes the run."""
    from tbps.engine.loop import TrainRun

    cfg = _config(url, os.path.join(out_dir, "runs"), 2, [f"train.zero_stage={stage}", "train.num_workers=[1, 2]",
                                                          "data.loader_workers=0", "train.checkpoint_every_steps=2"])
    first = json.load(open(os.path.join(out_dir, "first0.json")))
    run = TrainRun(cfg, rank, 1, torch.device("cpu"), lambda metrics, checkpoint_dir: None)
    checkpoint = os.path.join(out_dir, f"ckpt{first['checkpoints']}")
    run.resume(checkpoint)
    from tbps.checkpoint import load_model_state
    from tbps.engine.checkpoint import full_state_dict

    saved, now = load_model_state(checkpoint), full_state_dict(run.engine, stage)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    lr_at_resume = run.scheduler.get_last_lr()[0]
    expected_lr = run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](run.start_epoch * run.steps_per_epoch)
    final = run.run()
    with open(os.path.join(out_dir, "rest.json"), "w") as f:
        json.dump({"start_epoch": run.start_epoch, "lr_at_resume": lr_at_resume, "expected_lr": expected_lr,
                   "steps_per_epoch": run.steps_per_epoch, "final": final}, f)


@pytest.mark.parametrize("stage", [2])  # ZeRO-0's direct load is every other resume test's path
def test_elastic_resume_on_fewer_workers(synth_tiny, tmp_path, stage):
    """#18 item 5 (the worker side): a mid-epoch checkpoint of 2 ranks resumes on 1 rank: the epoch restarts on the
    new world, the lr schedule is rebased to the new steps per epoch, the run finishes and metrics.json records the
    world size of each epoch. ZeRO-2's optimizer state, partitioned over 2 ranks, is resharded for 1 (DeepSpeed's
    universal checkpoint): the resumed weights are the checkpoint's. ZeRO-3 with elastic workers is refused."""
    from tbps.config import ConfigError, load_config
    from tbps.engine.launcher import preflight

    with pytest.raises(ConfigError, match=r"elastic workers \(train.num_workers=\[min, max\]\) support ZeRO stages "
                                          r"0-2"):
        preflight(load_config("clip_tiny", [f"data.url={synth_tiny}", "train.num_workers=[1, 2]",
                                            "train.zero_stage=3"]))
    with pytest.raises(ConfigError, match="train.num_workers must be >= 1"):
        load_config("clip_tiny", ["train.num_workers=[2, 1]"]).train.worker_range()
    with pytest.raises(ConfigError, match="train.elastic_resize_interval_s must be > 0"):
        load_config("clip_tiny", ["train.num_workers=[1, 2]", "train.elastic_resize_interval_s=0"]).train.worker_range()
    run_ranks(_elastic_first, 2, synth_tiny, str(tmp_path), stage)
    first = json.load(open(tmp_path / "first0.json"))
    run_ranks(_elastic_rest, 1, synth_tiny, str(tmp_path), stage)
    rest = json.load(open(tmp_path / "rest.json"))
    assert rest["start_epoch"] == 1  # epoch 2 again from its start: positions are per rank
    assert rest["steps_per_epoch"] == 2 * first["steps_per_epoch"] or rest["steps_per_epoch"] == STEPS
    assert rest["lr_at_resume"] == pytest.approx(rest["expected_lr"], rel=1e-9)
    metrics = json.load(open(tmp_path / "runs" / "loop" / "metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert [h["world_size"] for h in metrics["history"]] == [2, 1]
    assert all(h["train_loss"] == h["train_loss"] for h in metrics["history"])  # finite
    assert set(metrics["test"]) >= {"R1", "mAP"}


def test_a_lock_file_left_by_a_killed_op_build_is_cleared(tmp_path, monkeypatch):
    """Before torch 2.14 a just-in-time extension build holds a lock file whose existence blocks every later build:
    one left by a worker killed while building DeepSpeed's CPU communication op would hang every later run. tbps
    removes such a file once it is older than any build takes (and says so), leaves a recent one (a build in
    progress on another rank), and leaves everything alone where torch holds an OS lock instead (torch >= 2.14)."""
    import time

    import torch.utils.cpp_extension as extension

    from tbps.engine.loop import STALE_BUILD_LOCK_S, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"  # the default root's <python>_<cuda> layout
    recent = tmp_path / "deepspeed_shm_comm" / "lock"  # TORCH_EXTENSIONS_DIR's own layout
    for lock in (old, recent):
        lock.parent.mkdir(parents=True)
        lock.touch()
    then = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(old, (then, then))
    assert clear_stale_build_lock(blocking=False) is None and old.exists()  # an OS lock: nothing to clear
    if not hasattr(extension, "FileBaton"):  # torch >= 2.14 (what ./run.sh installs) holds an OS lock
        assert clear_stale_build_lock() is None and old.exists()
    lines = []
    assert clear_stale_build_lock(blocking=True, log=lines.append) == str(old)
    assert not old.exists() and recent.exists()
    assert len(lines) == 1 and str(old) in lines[0] and "killed" in lines[0]
    assert clear_stale_build_lock(blocking=True, log=lines.append) is None and recent.exists() and len(lines) == 1


def test_deepspeeds_op_is_built_with_the_environments_ninja(tmp_path):
    """Two ninja releases on one machine (the system's, the environment's pip wheel) each take the other's build of
    DeepSpeed's CPU op for stale: every switch rebuilt it (~30 s). The environment's bin directory goes first on PATH
    when PATH would find another ninja; nothing changes when it finds the environment's, or there is none."""
    from tbps.engine.loop import prefer_environment_ninja

    env_bin, system_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for d in (env_bin, system_bin):
        d.mkdir(parents=True)
        (d / "ninja").write_text("#!/bin/sh\n")
        (d / "ninja").chmod(0o755)
    environ = {"PATH": f"{system_bin}{os.pathsep}/bin"}
    assert prefer_environment_ninja(str(env_bin), environ) == str(env_bin)
    assert environ["PATH"] == f"{env_bin}{os.pathsep}{system_bin}{os.pathsep}/bin"
    assert prefer_environment_ninja(str(env_bin), environ) is None  # found first now: PATH left as it is
    assert environ["PATH"].count(str(env_bin)) == 1
    bare = {"PATH": str(system_bin)}
    assert prefer_environment_ninja(str(tmp_path / "no-ninja"), bare) is None and bare["PATH"] == str(system_bin)
    alone = {"PATH": "/nonexistent"}  # no ninja on PATH at all: the environment's is the one torch will find
    assert prefer_environment_ninja(str(env_bin), alone) == str(env_bin)
    assert alone["PATH"].split(os.pathsep)[0] == str(env_bin)


def _diverging(rank, url, out_dir):
    """A run that really diverges (lr 1e36), the same config again, and a run whose weights turn NaN in epoch 2
    (a parameter filled with NaN after its first mid-epoch checkpoint, as an overflowing step leaves it)."""
    from tbps.config import ConfigError
    from tbps.engine.checkpoint import full_state_dict
    from tbps.engine.launcher import preflight
    from tbps.engine.loop import DIVERGED, DivergedError, TrainRun
    from tbps.retrieval import NonFiniteEmbeddingsError

    results = {}
    storage = os.path.join(out_dir, "runs")
    extra = ["train.checkpoint_every_steps=0", "train.eval_every=1", "data.loader_workers=0"]
    cfg = _config(url, storage, 2, extra + ["optim.lr=1e36"])
    reports, seen = [], []
    run = TrainRun(cfg, rank, 1, torch.device("cpu"), lambda m, c: reports.append((dict(m), c is not None)),
                   on_batch=lambda e, i, b: seen.append((e, i)))
    with pytest.raises(DivergedError) as e:
        run.run()
    results["real"] = {"message": str(e.value), "reports": reports, "batches": len(seen), "steps": run.batches}
    with pytest.raises(NonFiniteEmbeddingsError) as e:  # what val would have met: the NaN model's embeddings
        run.run_eval("val", full_state_dict(run.engine, 0))
    results["eval"] = str(e.value)
    from tbps.data import build_eval_loader
    from tbps.eval import evaluate

    npz = os.path.join(out_dir, "embeddings.npz")  # the NaN model (run_eval loaded it): nothing is written
    with pytest.raises(NonFiniteEmbeddingsError):
        evaluate(run.eval_model, build_eval_loader(cfg.data, run.tok, "val", 16), embeddings_path=npz)
    results["npz_written"] = os.path.exists(npz)

    seen.clear()  # the same config again (Ray's retry, or a re-run): stops before its first batch
    again = TrainRun(_config(url, storage, 2, extra + ["optim.lr=1e36"]), rank, 1, torch.device("cpu"),
                     lambda m, c: None, on_batch=lambda e, i, b: seen.append((e, i)))
    with pytest.raises(DivergedError) as e:
        again.run()
    results["again"] = {"message": str(e.value), "batches": len(seen)}
    shutil.copy(os.path.join(storage, "loop", DIVERGED), os.path.join(out_dir, "diverged-record.json"))
    # pre-flight: the same config is refused before Ray starts (a changed operational key does not count); another
    # lr is a new attempt, and its worker drops the record
    with pytest.raises(ConfigError) as e:
        preflight(_config(url, storage, 2, extra + ["optim.lr=1e36", "train.log_every=7"]))
    results["preflight"] = str(e.value)
    lower = _config(url, storage, 2, extra + ["optim.lr=1e-4"])
    preflight(lower)
    results["record_before"] = os.path.exists(os.path.join(storage, "loop", DIVERGED))
    TrainRun(lower, rank, 1, torch.device("cpu"), lambda m, c: None).refuse_a_diverged_config()
    results["record_after"] = os.path.exists(os.path.join(storage, "loop", DIVERGED))

    reports = []
    cfg = _config(url, os.path.join(out_dir, "poisoned"), 2, ["data.loader_workers=0"])
    holder = {}

    def poison(epoch, index, batch):
        if (epoch, index) == (1, EVERY + 1):
            with torch.no_grad():
                next(holder["run"].method.parameters()).fill_(float("nan"))

    holder["run"] = run = TrainRun(cfg, rank, 1, torch.device("cpu"),
                                   lambda m, c: reports.append((dict(m), c is not None)), on_batch=poison)
    with pytest.raises(DivergedError) as e:
        run.run()
    results["poisoned"] = {"message": str(e.value), "reports": reports}
    with open(os.path.join(out_dir, "diverging.json"), "w") as f:
        json.dump(results, f)


def test_a_diverged_run_stops_saves_nothing_of_it_and_is_not_retried(synth_tiny, tmp_path):
    """Weights that turn NaN or inf stop the run with one message, before anything of that point is saved: such a
    model scored R1 100, mAP 200 and mINP 300 (a NaN similarity compares false with everything, so every correct
    image ranked first), became the best epoch and would have been a sweep's best trial. The divergence is recorded
    with its config (diverged.json): the same config again stops at once, in the worker (Ray Train's retry) and in
    pre-flight (a re-run); another config goes on and drops the record."""
    from tbps.engine.loop import DIVERGED

    run_ranks(_diverging, 1, synth_tiny, str(tmp_path))
    results = json.load(open(tmp_path / "diverging.json"))
    real = results["real"]
    assert real["reports"] == [] and real["batches"] == real["steps"]  # epoch 1 trained, nothing reported
    assert re.match(r"training diverged: after step 8 \(the end of epoch 1\) \d+ of \d+ weight tensors hold NaN "
                    r"or inf values \(.+\); the epoch's mean loss so far is nan\. The run stops: nothing from this "
                    r"point on is saved \(no checkpoint was saved before it\)\. To go on, lower optim\.lr \(now "
                    r"1e\+36\)", real["message"]), real
    assert "the model's embeddings are not finite: 36 of 36 gallery images and 72 of 72 captions" in results["eval"]
    assert results["npz_written"] is False
    run_dir = tmp_path / "runs" / "loop"
    record = json.load(open(tmp_path / "diverged-record.json"))
    assert record["message"] == real["message"] and record["step"] == 8 and record["tensors"]
    assert not (run_dir / "best").exists()
    again = results["again"]
    assert again["batches"] == 0 and again["message"].startswith(real["message"])
    assert f"recorded in {run_dir}/{DIVERGED}" in again["message"]
    assert re.match(r"train.run_name 'loop': training diverged: after step 8 .*delete that file to train this "
                    r"config again anyway", results["preflight"]), results["preflight"]
    assert results["record_before"] and not results["record_after"]
    # weights NaN in epoch 2, after its first mid-epoch checkpoint: that checkpoint is the run's last one
    poisoned = results["poisoned"]
    saved = [(m.get("epoch"), m.get("mid_epoch"), m.get("batches_done")) for m, checkpoint in poisoned["reports"]]
    assert saved == [(0, 1, EVERY), (0, 1, 2 * EVERY), (1, None, None), (1, 2, EVERY)], saved
    assert all(checkpoint for _, checkpoint in poisoned["reports"])
    assert re.match(rf"training diverged: after step {STEPS + 2 * EVERY} \(epoch 2, batch {2 * EVERY} of {STEPS}\) \d+ "
                    rf"of \d+ weight tensors hold NaN or inf values \(.+\); .* \(its last checkpoint is the "
                    rf"checkpoint in epoch 2 after batch {EVERY} \(step {STEPS + EVERY}\)\)", poisoned["message"])


def _fp16_main(rank, url, out_dir, precision, step_options):
    from tbps.engine.loop import TrainRun

    extra = [f"train.precision={precision}", "optim.eps=1e-3", "train.checkpoint_every_steps=0",
             "data.loader_workers=0", "train.eval_every=1", *step_options]
    results, kept = {}, {}

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir is not None and metrics.get("epoch") == 1 and "dir" not in kept:
            kept["dir"] = os.path.join(out_dir, "epoch1")
            shutil.copytree(checkpoint_dir, kept["dir"])
            kept["scaler"] = run.scaler_state()
            # the run's outputs as a run killed here would leave them (best/ of epoch 1), for the resumed run
            shutil.copytree(os.path.join(out_dir, "whole"), os.path.join(out_dir, "resumed"))

    def set_scale(epoch, index, batch):  # a scale the loss scaler would not start from (fp16-autocast)
        scaler = getattr(run.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None and (epoch, index) == (0, 2):  # after the first step (of 2 micro-batches)
            scaler.update(new_scale=512.0)

    run = TrainRun(_config(url, os.path.join(out_dir, "whole"), 2, extra), rank, 1, torch.device("cpu"), keep,
                   on_batch=set_scale)
    half = [n for n, p in run.engine.module.named_parameters() if p.dtype == torch.float16]
    final = run.run()
    results["whole"] = {"final": final, "half": half, "scaler": kept["scaler"],
                        "moments": sorted({str(s["exp_avg"].dtype) for s in run.optimizer.state.values()})}
    again = TrainRun(_config(url, os.path.join(out_dir, "resumed"), 2, extra), rank, 1, torch.device("cpu"),
                     lambda metrics, checkpoint_dir: None)
    again.resume(kept["dir"])
    results["resumed"] = {"scaler": again.scaler_state(), "start_epoch": again.start_epoch,
                          "half": [n for n, p in again.engine.module.named_parameters() if p.dtype == torch.float16]}
    results["resumed"]["final"] = again.run()
    with open(os.path.join(out_dir, "fp16.json"), "w") as f:
        json.dump(results, f, default=str)


@pytest.mark.parametrize("precision,step_options", [
    ("fp16-weights", []), ("fp16-autocast", []),
    ("fp16-autocast", ["train.grad_accum=2", "train.grad_cache=true", "optim.grad_clip=1.0"])],
    ids=["fp16-weights", "fp16-autocast", "fp16-autocast-grad-cache-clip"])
def test_fp16_precisions_train_evaluate_and_resume(synth_tiny, tmp_path, precision, step_options):
    """The official codes' precisions through the worker's loop. fp16-weights (IRRA's): the linear, conv and attention
    weights are fp16 and stay so (their Adam moments too). fp16-autocast (IVT's torch AMP): fp32 weights and a loss
    scaler, whose state -- which DeepSpeed leaves out of its ZeRO-0 checkpoints -- a resumed run takes from tbps's
    checkpoint; also with grad_cache over 2 micro-batches and tbps's clipping after the scaler unscales. Val and test
    run (on CPU in fp32), and a run resumed from its epoch-1 checkpoint ends with the uninterrupted run's metrics."""
    run_ranks(_fp16_main, 1, synth_tiny, str(tmp_path), precision, step_options)
    res = json.load(open(tmp_path / "fp16.json"))
    whole, resumed = res["whole"], res["resumed"]
    if precision == "fp16-weights":
        assert whole["half"] and resumed["half"] == whole["half"]
        assert whole["moments"] == ["torch.float16", "torch.float32"]
        assert whole["scaler"] == resumed["scaler"] == {}
    else:
        assert whole["half"] == resumed["half"] == [] and whole["moments"] == ["torch.float32"]
        assert whole["scaler"]["grad_scaler"]["scale"] == 512.0  # saved with the checkpoint
        assert resumed["scaler"] == whole["scaler"]  # and restored: not DeepSpeed's fresh 65536
    assert resumed["start_epoch"] == 1
    metrics = {k: v for k, v in whole["final"].items() if isinstance(v, float) and "seconds" not in k}
    assert metrics and all(v == v for v in metrics.values())  # finite, not NaN
    assert {k: resumed["final"][k] for k in metrics} == metrics


def _last_batch_main(rank, url, out_dir):
    import multiprocessing

    from torch._dynamo.utils import counters

    from tbps.config import load_config
    from tbps.engine.loop import TrainRun

    multiprocessing.set_start_method("fork", force=True)
    compile_ = torch.compile  # dynamo's graphs without inductor's code generation (what is counted here, in seconds)
    torch.compile = lambda fn, **kwargs: compile_(fn, **{**kwargs, "backend": "eager"})
    cfg = load_config("clip_tiny", [f"data.url={url}", "data.last_batch=keep", "data.batch_size=16",  # small graphs
                                    "data.loader_workers=2", "train.epochs=1", "train.compile=true",
                                    f"train.storage_path={out_dir}", "train.run_name=last", "train.log_every=100"])
    seen = []

    def on_batch(epoch, index, batch):  # before each step: the batch's size and the graphs compiled so far
        seen.append([len(batch["pids"]), counters["stats"]["unique_graphs"]])

    run = TrainRun(cfg, rank, 1, torch.device("cpu"), lambda metrics, checkpoint_dir: None, on_batch=on_batch)
    metrics = run.train_one_epoch(0)
    graphs = counters["stats"]["unique_graphs"]
    with open(os.path.join(out_dir, "last_batch.json"), "w") as f:
        json.dump({"seen": seen, "graphs": graphs, "steps": run.steps_per_epoch, "loss": metrics["train_loss"],
                   "compiled_after": "features" in run.method.__dict__}, f)  # the graphs kept for the next epoch


def test_the_last_partial_batch_is_kept_on_one_rank_as_irra_keeps_it(synth_tiny, tmp_path):
    """data.last_batch=keep (the irra preset's: IRRA's DataLoader has drop_last=False): on one rank an epoch of 120
    images at batch 16 is 7 full steps and one of 8; compiled, the short step runs eagerly (no graph for its size,
    which would make the batch dimension dynamic in every later step's). Several ranks, micro-batches or the
    identity sampler drop it (keeps_last_batch says why, and the run logs it)."""
    from tbps.config import load_config
    from tbps.data.stream import keeps_last_batch

    run_ranks(_last_batch_main, 1, synth_tiny, str(tmp_path))
    res = json.load(open(tmp_path / "last_batch.json"))
    assert res["steps"] == 8 and [size for size, _ in res["seen"]] == [16] * 7 + [8]
    assert res["seen"][1][1] == res["seen"][-1][1] == res["graphs"] >= 1  # graphs of the first step only
    assert res["loss"] == res["loss"] and res["compiled_after"]  # finite; the next epoch compiled again
    assert load_config("irra").data.last_batch == "keep" and load_config("irra_tiny").data.last_batch == "drop"
    cfg = load_config("irra")
    assert keeps_last_batch(cfg, 1) == (True, "")
    cfg.train.grad_accum = 2
    assert keeps_last_batch(cfg, 4) == (False, "4 ranks, train.grad_accum=2")
    cfg.train.grad_accum, cfg.data.sampler = 1, "identity"
    assert keeps_last_batch(cfg, 1) == (False, "data.sampler=identity")
    cfg.data.last_batch = "drop"
    assert keeps_last_batch(cfg, 1) == (False, "")


def test_ties_keep_the_first_or_the_last_epoch_as_the_official_loops():
    """IRRA's loop keeps the first of equal best values (``best_top1 < top1``), IVT's the last (``acc_test >=
    last_acc_val``): train.select_ties, for val selection and the test-selected row alike."""
    from tbps.config import load_config
    from tbps.engine.loop import improves, test_selected

    assert improves(5.0, 4.0) and not improves(5.0, 5.0) and not improves(4.0, 5.0)
    assert improves(5.0, 5.0, "last") and not improves(4.0, 5.0, "last")
    history = [{"epoch": e, "test_R1": r} for e, r in ((1, 3.0), (2, 5.0), (3, 5.0), (4, 4.0))]
    assert test_selected(history, "R1")["epoch"] == 2
    assert test_selected(history, "R1", "last")["epoch"] == 3
    assert load_config("irra").train.select_ties == "first" and load_config("ivt").train.select_ties == "last"
