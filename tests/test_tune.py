"""Sweeps: the conditional space, resource arithmetic, and the smoke sweep end to end on a real local Ray cluster
(Optuna + ASHA, interrupted and resumed with the same command, its best.yaml the config its best trial trained with)."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import SECRET, files_holding
from tbps.config import ConfigError, load_config, saved_config, to_dict
from tbps.engine.loop import as_saved
from tune.space import SweepSpec, load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_TMP = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray")  # where local Ray sessions keep their logs
PRESETS = ("smoke", "cuhk-pedes", "icfg-pedes", "rstpreid")


def _write(tmp_path, tree) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_conditional_space_gives_each_method_only_its_parameters(preset):
    import optuna

    from tbps.methods import METHODS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_sweep(preset)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1))
    seen = set()
    for i in range(60):
        trial = study.ask()
        spec.define_by_run(trial)
        method, params = SweepSpec.split(dict(trial.params))
        seen.add(method)
        base = spec.base_config(method)
        has = {f"method.{f}" for f in METHODS[method].hyperparameters(base.method.losses)}
        losses = {f"loss.{t.name}" for t in base.method.losses}
        for key in params:
            if key.startswith("method."):
                assert key in has, f"{preset}: {method} was given {key}, which it does not read"
            elif key.startswith("loss."):
                assert key in losses, f"{preset}: {method} was given {key}, not one of its loss terms"
        # every sampled parameter really lands in the trial's config
        cfg = spec.base_config(method, params)
        for key, value in params.items():
            if key.startswith("loss."):
                assert next(t.weight for t in cfg.method.losses if t.name == key[5:]) == pytest.approx(value)
            else:
                section, field = key.split(".")
                assert getattr(getattr(cfg, section), field) == value
        assert cfg.train.select_metric == spec.metric
        study.tell(trial, float(i % 7))
    assert seen == set(spec.methods), f"{preset}: 60 samples never chose {set(spec.methods) - seen}"


def test_shared_parameters_skip_methods_without_them():
    spec = load_sweep("cuhk-pedes")
    # IVT trains with CMPM only: no contrastive temperature, so the shared temperature is not its parameter
    assert "method.temperature" not in spec.methods["ivt"].space
    assert "method.temperature" in spec.methods["irra"].space
    assert "method.margin" in spec.methods["pcc"].space and "method.margin" not in spec.methods["irra"].space


@pytest.mark.parametrize("method,space,message", [
    ("irra", {"method.num_parts": {"choice": [4, 8]}}, "method.num_parts is not a parameter of irra"),
    ("irra", {"loss.cmr": {"uniform": [0.5, 1.0]}}, "loss.cmr is not a parameter of irra"),
    ("ivt", {"method.temperature": {"loguniform": [0.01, 0.1]}}, "method.temperature is not a parameter of ivt"),
    ("irra", {"method.tempreature": {"uniform": [0.01, 0.1]}}, "'method.tempreature' is not a tbps config key"),
    ("irra", {"method.temperature": {"loguniform": [0.0, 0.1]}}, "loguniform needs low > 0"),
    ("irra", {"method.temperature": {"normal": [0.0, 0.1]}}, "expected one of"),
    ("irra", {"data.image_size": {"uniform": [1, 2]}}, "data.image_size=1.0 does not make a valid config"),
    # every value the space can give must be a valid value of its field: a temperature of 0 or a weight below 0
    ("irra", {"method.temperature": {"uniform": [0.0, 0.05]}}, "method.temperature must be > 0, got 0.0"),
    ("irra", {"loss.id": {"uniform": [-0.5, 1.0]}}, "method.losses[2].weight must be >= 0, got -0.5"),
])
def test_bad_space_is_rejected_naming_the_key(tmp_path, method, space, message):
    config = {"irra": "irra_tiny", "ivt": "ivt_tiny"}[method]
    path = _write(tmp_path, {"name": "bad", "methods": {method: {"config": config, "space": space}}})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert message in str(e.value)
    assert f"methods.{method}" in str(e.value) or "space" in str(e.value)


def test_a_shared_parameter_no_method_has_is_an_error_not_a_sweep_that_varies_nothing(tmp_path, capsys):
    """A shared space key goes to the methods that have it; one that none of the listed methods has was dropped, and
    the sweep trained one configuration num_samples times while its file said it searched the margin."""
    tree = {"name": "t", "num_samples": 3, "methods": {"irra": {"config": "irra_tiny"}},
            "space": {"method.margin": {"uniform": [0.1, 0.4]}}}
    with pytest.raises(ConfigError, match="space.method.margin is not a parameter of any method of this sweep"):
        load_sweep(_write(tmp_path, tree))
    tree["methods"]["pcc"] = {"config": "pcc_tiny"}  # a listed method has it: fine
    assert "method.margin" in load_sweep(_write(tmp_path, tree)).methods["pcc"].space
    assert "warning" not in capsys.readouterr().err
    del tree["space"], tree["methods"]["pcc"]  # nothing to sample: 3 trials of one configuration
    load_sweep(_write(tmp_path, tree))
    assert "no search space, so its 3 trials train the same 1 configuration(s) again" in capsys.readouterr().err


def test_a_sweep_can_select_by_ivt_s_criterion(tmp_path):
    """metric: R1_mAP, (R1 + mAP) / 2 (IVT's acc_test, which every evaluation reports): trials select their best epoch
    by it, and a seeds summary has it."""
    from tbps.seeds import aggregate

    spec = load_sweep(_write(tmp_path, {"name": "t", "metric": "R1_mAP", "methods": {"ivt": {"config": "ivt_tiny"}}}))
    assert spec.base_config("ivt").train.select_metric == "R1_mAP"
    summary = aggregate({s: {"val": {"R1": 10.0 + s, "mAP": 20.0, "R1_mAP": 15.0 + s / 2}, "test": {}} for s in (0, 1)})
    assert summary["val"]["R1_mAP"]["mean"] == pytest.approx(15.25)


def test_bad_sweep_fields(tmp_path):
    for tree, message in [({"methods": {}}, "methods is empty"),
                          ({"metric": "top1", "methods": {"clip": {"config": "clip_tiny"}}}, "metric must be one of"),
                          ({"methods": {"nope": {"config": "clip_tiny"}}}, "unknown method 'nope'"),
                          ({"methods": {"clip": {"config": "irra_tiny"}}}, "is a 'irra' preset"),
                          ({"sceduler": {}, "methods": {"clip": {}}}, "unknown sweep key 'sceduler'"),
                          # typed by tbps.config's machinery, as a training config is (#16 item 4)
                          ({"num_samples": "many", "methods": {"clip": {}}}, "num_samples: expected an integer"),
                          ({"scheduler": {"grace": 1}, "methods": {"clip": {}}}, "unknown config key scheduler.grace"),
                          ({"methods": {"clip": {"confg": "clip_tiny"}}}, "unknown config key methods.clip.confg"),
                          ({"seed": -1, "methods": {"clip": {}}}, "seed must be non-negative")]:
        with pytest.raises(ConfigError, match=message):
            load_sweep(_write(tmp_path, tree))
    with pytest.raises(ConfigError, match="not found"):
        load_sweep("no-such-sweep")


def test_max_concurrent_follows_the_budget():
    from tune.sweep import max_concurrent, trial_resources

    spec = load_sweep("smoke", ["num_samples=8"])
    assert trial_resources(spec) == (3.0, 0.0)  # driver + 2 workers
    assert max_concurrent(spec, {"CPU": 4}) == 1
    assert max_concurrent(spec, {"CPU": 9}) == 3
    spec = load_sweep("cuhk-pedes", ["num_samples=8"])
    cpu, gpu = trial_resources(spec)
    assert gpu == 4.0 and cpu == 33.0  # IVT's recipe: 4 GPU workers x 8 CPUs (loader processes) + the driver
    assert max_concurrent(spec, {"CPU": 96, "GPU": 8}) == 2
    assert max_concurrent(spec, {"CPU": 64, "GPU": 8}) == 1  # CPU-bound: the loaders need their cores
    with pytest.raises(ConfigError, match="one trial needs"):
        max_concurrent(spec, {"CPU": 64, "GPU": 2})


def test_check_prints_the_sweep_s_plan_and_starts_nothing(synth_tiny, tmp_path, capsys):
    """python -m tune.sweep --check: the sweep validated as a sweep start validates it (every method's config through
    pre-flight), then its plan -- trials, search, what one trial holds and how many run at once, each method's space
    and run plan (steps per epoch as for tbps.train --check) and the outputs; no Ray, nothing written."""
    import ray

    from tune.sweep import describe_distribution, main

    args = ["--config", "smoke", f"data_url={synth_tiny}", f"storage_path={tmp_path / 'sweeps'}", "resources.cpus=9",
            "--check"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "sweep smoke: 4 trials over irra, pcc, Optuna + ASHA on val mAP (grace period 1, reduction factor 2)" in out
    assert "one trial holds 3 CPUs and 0 GPUs (its driver and workers): 3 at a time within resources" in out
    assert "irra (irra_tiny): searches method.mask_ratio uniform(0.1, 0.3); loss.mlm uniform(0.25, 2.0); " in out
    assert "pcc (pcc_tiny): searches method.margin uniform(0.1, 0.4)" in out
    assert out.count("2 worker(s) x batch 32 = global batch 64, 1 loader worker(s) each: 1 step an epoch, 3 in 3 "
                     "epochs") == 2
    assert f"outputs: {tmp_path / 'sweeps' / 'smoke'} (a new sweep)" in out
    assert "the sweep is valid; nothing was started" in err
    assert not ray.is_initialized() and not os.path.exists(tmp_path / "sweeps")
    assert describe_distribution({"choice": [16, 32]}) == "choice(16, 32)"
    assert main(["--config", "smoke", f"data_url={synth_tiny}", "data.batch_size=0", "--check"]) == 2
    assert "config error: data.batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_a_completed_best_trial_stands_for_its_own_seed(synth_tiny, tmp_path):
    """seeds=N after a search: the best trial's own run is that seed's run when it completed with the same
    configuration and seed (no retraining); a stopped trial, another seed, a changed key or a missing config.yaml
    are trained."""
    from tbps.config import dump_yaml
    from tbps.engine.launcher import seed_configs
    from tune.results import Trial
    from tune.sweep import finished_trial_run, runs_path

    spec = load_sweep("smoke", [f"data_url={synth_tiny}", f"storage_path={tmp_path}", "name=s", "seeds=2"])
    params = {"method.mask_ratio": 0.2, "optim.lr": 1e-3}
    trained = spec.base_config("irra", params)  # as run_trial trains it, and TrainRun saves it
    trained.train.run_name, trained.train.storage_path = "t1", runs_path(spec)
    as_saved(trained)
    run = os.path.join(runs_path(spec), "t1")
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(dump_yaml(trained))
    trial = Trial(trial_id="t1", method="irra", params=params, status="completed", epochs_run=3, epochs=3,
                  metric=1.0)
    base = spec.base_config("irra", params)
    base.train.run_name, base.train.storage_path, base.train.seeds = "irra", str(tmp_path / "seeds"), [0, 1]
    runs = seed_configs(base)
    assert finished_trial_run(spec, trial, runs[0]) == run
    assert finished_trial_run(spec, trial, runs[1]) is None  # another seed
    stopped = Trial(**{**trial.__dict__, "status": "stopped early (ASHA)"})
    assert finished_trial_run(spec, stopped, runs[0]) is None  # never tested, maybe fewer epochs
    runs[0].optim.lr = 2e-3
    assert finished_trial_run(spec, trial, runs[0]) is None  # not the configuration that trained
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("not: [a, config\n")  # torn or foreign: train the seed
    assert finished_trial_run(spec, trial, seed_configs(base)[0]) is None
    os.remove(os.path.join(run, "config.yaml"))
    assert finished_trial_run(spec, trial, seed_configs(base)[0]) is None


# ------------------------------------------------------------------------------------------------ end to end
def _sweep_cmd(synth_tiny, storage):
    return [sys.executable, "-m", "tune.sweep", "--config", "smoke", f"data_url={synth_tiny}",
            f"storage_path={storage}", "name=smoke-test", "num_samples=3", "train.max_steps_per_epoch=4",
            "train.epochs=3"]


def _env():
    # a distinctive secret in the environment: nothing the sweep, its trials or Ray write may hold it (#18 item 7)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT, "AWS_SECRET_ACCESS_KEY": SECRET}


def _run_states(runs_dir):
    """trial id -> metrics.json of its Ray Train run."""
    out = {}
    for path in glob.glob(os.path.join(runs_dir, "*", "metrics.json")):
        try:
            with open(path) as f:
                out[os.path.basename(os.path.dirname(path))] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


def test_a_failed_trial_is_never_the_best():
    """A trial that failed after good epochs (a divergence in its last epoch) has a real best val value, but its
    configuration does not train through: it is not the sweep's best (best.yaml) nor its method's best (the seeds'
    runs); stopped and completed trials are."""
    from tune.results import Trial, best_per_method

    def trial(tid, method, metric, status):
        return Trial(trial_id=tid, method=method, params={}, status=status, epochs_run=2, epochs=3, metric=metric)

    trials = [trial("a", "irra", 40.0, "error"), trial("b", "pcc", 35.0, "stopped early (ASHA)"),
              trial("c", "irra", 30.0, "completed"), trial("d", "pcc", float("nan"), "completed")]
    assert {m: t.trial_id for m, t in best_per_method(trials).items()} == {"irra": "c", "pcc": "b"}
    assert best_per_method([trials[0]]) == {}


def test_a_method_with_a_failed_seed_is_not_chosen_over_one_whose_seeds_all_trained():
    """After the search each method's best configuration trains with N seeds, and best.yaml is the method with the
    best mean. A seed that failed (diverged) is left out of its method's mean, so that mean was of the survivors
    only: a configuration that diverges on one seed in three could be chosen over one that trains with all."""
    from tbps.seeds import aggregate
    from tune.results import Trial, _by_mean, best_config_yaml, seeds_table

    spec = load_sweep("smoke")

    def entry(method, vals, errors):
        runs = {s: {"val": {spec.metric: v}, "test": {"R1": v}} for s, v in enumerate(vals)}
        trial = Trial(trial_id=f"t-{method}", method=method, params={}, status="completed", epochs_run=3, epochs=3,
                      metric=max(vals))
        return {"trial": trial, "summary": aggregate(runs, errors), "errors": errors, "reused": {}}

    seeds = {"irra": entry("irra", [50.0, 52.0], {2: "training diverged: step 9"}),
             "pcc": entry("pcc", [40.0, 41.0, 42.0], {})}
    assert [m for m, _ in _by_mean(spec, seeds)] == ["pcc", "irra"]
    table = seeds_table(spec, seeds)
    assert table.index("| pcc |") < table.index("| irra |") and "| 2, 1 failed |" in table
    seeds["pcc"]["errors"] = {0: "worker died"}  # both failed a seed: the higher mean, with the failure named
    assert [m for m, _ in _by_mean(spec, seeds)] == ["irra", "pcc"]
    head = best_config_yaml(spec, seeds["irra"]["trial"], seeds)
    assert "# Warning: 1 seed(s) of it failed and are not in that mean (seed 2: training diverged: step 9)" in head


def test_a_failed_trial_s_error_is_the_worker_s_own_message():
    """results.md's status column of a failed trial: the worker's message (a diverged run's, a bug's last line), not
    the first line of Ray's wrapper ("ray::ImplicitFunc.train() (pid=..., ip=..., actor_id=...)", in colour codes),
    which was all it showed. Built with Ray's own exception classes, as a Tune result holds them."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from shards.cli import error_line
    from tbps.engine.loop import DivergedError

    def failed(worker_error):
        group = WorkerGroupError(f"Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most "
                                 f"recent call last):\n  ...\n{type(worker_error).__name__}: {worker_error}",
                                 {0: worker_error})
        return RayTaskError("ImplicitFunc.train", "Traceback (most recent call last):\n  ...", group)

    diverged = DivergedError("training diverged: after step 3 (the end of epoch 1) 110 of 111 weight tensors ...")
    for error in (failed(diverged), failed(diverged).as_instanceof_cause()):
        assert str(error).startswith("\x1b[36m") and "(pid=" in str(error).splitlines()[0]  # what it showed
        assert error_line(error) == str(diverged)
        assert error_line(failed(ZeroDivisionError("division by zero"))) == "ZeroDivisionError: division by zero"
    assert error_line(failed(RuntimeError("x" * 400))).endswith("x...") and len(error_line(failed(
        RuntimeError("x" * 400)))) == 300


def test_a_resumed_sweep_refuses_a_changed_spec(synth_tiny, tmp_path, capsys):
    """Re-running a sweep's command resumes it, and Tune restores the num_samples, searcher and scheduler it started
    with: a larger num_samples was silently ignored while the new overrides and spaces reached the trials still to
    run and best.yaml. The spec is recorded when the sweep starts; a resume with a changed field is an error naming
    it (the end-to-end test below runs it through the command), one with other resources goes on, and moved data
    is named."""
    from tune.sweep import SPEC_FILE, check_resumed_spec, record_spec

    def spec(*extra):
        return load_sweep("smoke", [f"data_url={synth_tiny}", f"storage_path={tmp_path}", "name=s", *extra])

    check_resumed_spec(spec())  # a sweep from before the record: recorded now
    assert json.load(open(tmp_path / "s" / SPEC_FILE))["num_samples"] == 4
    record_spec(spec())
    check_resumed_spec(spec("resources.cpus=8", "seeds=3"))
    for extra, message in ((["num_samples=8"], "num_samples: 4 -> 8"),
                           (["train.epochs=5"], "overrides.train.epochs: 3 -> 5"),
                           (["scheduler.grace_period=2"], "grace_period: 1 -> 2"),
                           (["metric=R1"], "metric: 'mAP' -> 'R1'"),
                           (["train.seed=1"], "overrides.train.seed: (not set) -> 1")):
        with pytest.raises(ConfigError, match=r"sweep 's' resumes the interrupted sweep at .*, which was started "
                                              r"with another spec: " + re.escape(message) + ".*choose a new name="):
            check_resumed_spec(spec(*extra))
    moved = tmp_path / "moved"
    os.symlink(synth_tiny, moved)
    check_resumed_spec(spec(f"data_url={moved}"))
    assert f"[sweep] resuming 's' with data_url: '{synth_tiny}' -> '{moved}'" in capsys.readouterr().err
    changed_space = tmp_path / "space.yaml"
    tree = yaml.safe_load(open(os.path.join(ROOT, "tune", "configs", "smoke.yaml")))
    tree["methods"]["irra"]["space"]["loss.mlm"] = {"uniform": [0.5, 2.0]}
    changed_space.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=re.escape("methods.irra.space.loss.mlm.uniform: [0.25, 2.0] -> [0.5, 2.0]")):
        check_resumed_spec(load_sweep(str(changed_space), [f"data_url={synth_tiny}", f"storage_path={tmp_path}",
                                                           "name=s"]))


def test_smoke_sweep_end_to_end_with_resume(synth_tiny, tmp_path):
    sessions_before = set(glob.glob(os.path.join(RAY_TMP, "session_2*")))
    storage = str(tmp_path / "sweeps")
    exp = os.path.join(storage, "smoke-test")
    runs = os.path.join(exp, "runs")
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_sweep_cmd(synth_tiny, storage), cwd=ROOT, env=_env(), stdout=log1,
                            stderr=subprocess.STDOUT, start_new_session=True)
    # interrupt (Ctrl-C) once one trial has finished and the next has reported a checkpointed epoch
    deadline = time.time() + 480
    interrupted_at = None
    while time.time() < deadline and proc.poll() is None:
        states = _run_states(runs)
        done = {k for k, v in states.items() if "test" in v}
        partial = {k: len(v["history"]) for k, v in states.items() if "test" not in v and v.get("history")}
        if done and partial:
            interrupted_at = (done, partial)
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.5)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    log1.close()
    first = (tmp_path / "first.log").read_text()
    assert interrupted_at, f"no trial finished in time; sweep output:\n{first[-5000:]}"
    done_before, partial = interrupted_at
    snapshot = {k: os.path.getmtime(os.path.join(runs, k, "metrics.json")) for k in done_before}

    # the same command with more trials: refused before Ray starts (Tune's restore keeps the old num_samples)
    changed = subprocess.run(_sweep_cmd(synth_tiny, storage) + ["num_samples=4"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "which was started with another spec: num_samples: 3 -> 4" in changed.stderr, changed.stderr[-3000:]

    second = subprocess.run(_sweep_cmd(synth_tiny, storage), cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "resuming the interrupted sweep" in out

    # finished trials were not re-run; a trial cut mid-run continued from its checkpoint
    for k, mtime in snapshot.items():
        assert os.path.getmtime(os.path.join(runs, k, "metrics.json")) == mtime, f"trial {k} was re-run"
    states = _run_states(runs)
    continued = [k for k, n in partial.items() if len(states.get(k, {}).get("history", [])) > n]
    for k in continued:
        assert "resumed from checkpoint" in out, f"trial {k} restarted from scratch"
        epochs = [h["epoch"] for h in states[k]["history"]]
        assert epochs == sorted(set(epochs)), f"trial {k} repeated epochs: {epochs}"

    # the table: 3 trials, both methods, ASHA stopped at least one early
    table = open(os.path.join(exp, "results.md")).read()
    assert f"\nData: {synth_tiny}\n" in table  # both methods on the sweep's data_url
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 3, table
    assert any("| irra |" in r for r in rows) and any("| pcc |" in r for r in rows), table
    assert sum("stopped early (ASHA)" in r for r in rows) >= 1, table
    assert sum("completed" in r for r in rows) >= 1, table
    metric_col = [float(r.split("|")[5]) for r in rows]
    assert metric_col == sorted(metric_col, reverse=True), "trials not sorted by the metric"
    for r in rows:  # a method never shows another method's parameter
        params = r.split("|")[4]
        if "| irra |" in r:
            assert "margin" not in params and "loss.cmr" not in params
        else:
            assert "mask_ratio" not in params and "loss.mlm" not in params
    from PIL import Image

    with Image.open(os.path.join(exp, "metric_vs_params.png")) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    assert open(os.path.join(exp, "results.csv")).read().count("\n") == 4

    # the best trial's YAML trains as is: tbps.train's loader reads it, and it is the configuration the best trial
    # trained with (its run's saved config.yaml), but for the run's name and place
    best_id = rows[0].split("|")[2].strip()
    best = load_config(os.path.join(exp, "best.yaml"))
    assert best.data.url == synth_tiny and best.train.select_metric == "mAP"
    assert (best.train.run_name, best.train.storage_path) == ("smoke-test-best", storage)
    trained = saved_config(yaml.safe_load(open(os.path.join(runs, best_id, "config.yaml"))))
    as_saved(best)
    for cfg in (best, trained):
        cfg.train.run_name = cfg.train.storage_path = ""
    assert to_dict(best) == to_dict(trained)
    # the default console (tbps.engine.console): none of Ray's per-report lines or worker prefixes in the sweep's
    # output; the workers' log files keep them
    for noise in ("Reporting training result", "(RayTrainWorker pid=", "Setting accelerator to CPU"):
        assert noise not in out, noise

    # no credential written: sweep outputs, trial runs (configs, metrics, checkpoints, TensorBoard) and the logs of
    # the Ray sessions the two sweep commands started
    sessions = sorted(set(glob.glob(os.path.join(RAY_TMP, "session_2*"))) - sessions_before)
    assert len(sessions) >= 2, sessions
    assert files_holding(SECRET, str(tmp_path)) == []  # nothing tbps or Tune writes as results
    # Ray Tune would copy AWS_* credentials into each trainable's runtime env, which Ray's runtime-env agent logs
    # (ray/tune/execution/class_cache.py); tune.sweep keeps them out (tune.sweep.keep_credentials_out_of_runtime_envs)
    assert files_holding(SECRET, *sessions) == []
    assert files_holding("Reporting training result", sessions[-1]), "a worker log file lost a line"


def test_a_method_reads_its_own_copy_of_the_dataset(synth_tiny, tmp_path, capsys):
    """IVT's identity sampler needs the train split written by identity, which the other methods' random batches do
    not want: a paper sweep could not hold IVT next to them (its trials were refused by pre-flight, and a data.url
    in a method's overrides was replaced by the sweep's, silently). ``methods.<name>.data_url`` gives one method the
    same dataset converted for it; copies of different datasets are an error, val splits that differ are named."""
    from conftest import renamed_dataset
    from shards.synth import generate
    from tune.sweep import SPEC_FILE, check_resumed_spec, prepare, record_spec

    grouped = str(tmp_path / "grouped")
    generate(out=grouped, size="tiny", seed=0, min_shards=4, group_ids=True, progress=False)
    tree = yaml.safe_load(open(os.path.join(ROOT, "tune", "configs", "smoke.yaml")))
    tree["methods"]["ivt"] = {"config": "ivt_tiny", "overrides": {"data.sampler": "identity",
                                                                  "data.tokenizer": f"{synth_tiny}/tokenizer"}}
    path = _write(tmp_path, tree)
    base = [f"data_url={synth_tiny}", "train.num_workers=1", f"storage_path={tmp_path / 'sweeps'}", "name=s"]
    with pytest.raises(ConfigError, match=r"^methods\.ivt: data\.sampler=identity needs the 'train' split of "):
        prepare(load_sweep(path, base))
    spec = prepare(load_sweep(path, base + [f"methods.ivt.data_url={grouped}", "methods.ivt.optim.lr=0.002"]))
    assert spec.base_config("ivt").data.url == grouped and spec.base_config("ivt").optim.lr == 0.002
    assert spec.base_config("irra").data.url == spec.base_config("pcc").data.url == synth_tiny
    assert spec.base_config("irra").optim.lr != 0.002
    from tune.results import data_line

    assert data_line(spec) == f"Data: irra, pcc: {synth_tiny}; ivt: {grouped}"  # results.md says which data
    assert "val splits differ" not in capsys.readouterr().err  # the same ToyPEDES, its train split regrouped
    # the --check plan shows each method's train split
    from tune.sweep import main

    assert main(["--config", path, *base, f"methods.ivt.data_url={grouped}", "--check"]) == 0
    out = capsys.readouterr().out
    assert f"train split 'train' of {grouped}" in out and f"train split 'train' of {synth_tiny}" in out
    # a resumed sweep: a method's moved copy is named; a sweep recorded before the field existed resumes
    record_spec(load_sweep(path, base))
    started = json.load(open(tmp_path / "sweeps" / "s" / SPEC_FILE))
    for m in started["methods"].values():
        del m["data_url"]
    (tmp_path / "sweeps" / "s" / SPEC_FILE).write_text(json.dumps(started))
    check_resumed_spec(load_sweep(path, base))
    assert "resuming" not in capsys.readouterr().err
    check_resumed_spec(load_sweep(path, base + [f"methods.ivt.data_url={grouped}"]))
    assert f"[sweep] resuming 's' with methods.ivt.data_url: (not set) -> '{grouped}'" in capsys.readouterr().err

    # another dataset, a val split of other pairs, a data.url among a method's overrides, an unlisted method
    other = renamed_dataset(grouped, tmp_path / "icfg", "icfg-pedes")
    with pytest.raises(ConfigError, match="compare on one dataset, and their data URLs hold different ones: irra: "
                                          "toypedes"):
        prepare(load_sweep(path, base + [f"methods.ivt.data_url={other}"]))
    fewer = str(tmp_path / "fewer")
    generate(out=fewer, size="tiny", seed=0, val=4, min_shards=4, group_ids=True, progress=False)
    prepare(load_sweep(path, base + [f"methods.ivt.data_url={fewer}"]))
    assert "the methods' val splits differ" in capsys.readouterr().err
    tree["methods"]["ivt"]["overrides"]["data.url"] = grouped
    with pytest.raises(ConfigError, match=r"methods\.ivt\.overrides: data\.url: a method's copy of the dataset is "
                                          r"its data_url field"):
        load_sweep(_write(tmp_path, tree), base)
    with pytest.raises(ConfigError, match=r"'clip' is not a method of .* \(it lists irra, pcc\)"):
        load_sweep("smoke", ["methods.clip.data_url=x"])
    with pytest.raises(ConfigError, match="is not a tbps config key"):
        load_sweep("smoke", ["methods.irra.nothing=1"])
