"""Hyperparameter sweeps across alignment methods: Optuna search + ASHA early stopping on a val metric, each trial a
full multi-worker Ray Train (DeepSpeed) run of tbps.

    python -m tune.sweep --config smoke                               # 2 CPU cores, a few minutes, synthetic data
    python -m tune.sweep --config cuhk-pedes data_url=s3://bucket/cuhk-pedes num_samples=32
    ray job submit --working-dir . -- python -m tune.sweep --config rstpreid data_url=s3://...
    python -m tune.sweep --config cuhk-pedes data_url=s3://... --check  # validate, print the plan, start nothing

``key=value`` overrides set sweep fields (num_samples, data_url, metric, storage_path, name, seed, max_concurrent,
resources.cpus, resources.gpus, scheduler.grace_period, ...) or, for any tbps config key, that key in every trial
(train.num_workers=4). Re-running the same command resumes an interrupted sweep. Results land in
<storage_path>/<name>/: results.md (trials sorted by the metric), results.csv, best.yaml (runs as is with
``python -m tbps.train --config best.yaml``) and metric_vs_params.png. ``seeds=N`` trains each method's best
configuration again with N seeds after the search (``confirm_with_seeds``): results.md then reports mean ± std and
the 95 % interval per method and configuration, the plot marks them, and best.yaml takes the best mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from shards.cli import add_verbose, run_command
from tbps.config import ConfigError
from tune.space import SweepSpec, load_sweep


# ------------------------------------------------------------------------------------------------- the trial
def run_trial(config: dict, spec: dict, progress: str = "lines") -> None:
    """A Tune trial = the driver of one Ray Train run. Its run name is the trial id, so a trial restarted by a resumed
    sweep continues from its own latest checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tbps.engine.launcher import build_trainer

    sweep = SweepSpec.from_dict(spec)
    method, params = SweepSpec.split(config)
    cfg = sweep.base_config(method, params)
    cfg.train.run_name = ray.tune.get_context().get_trial_id()
    cfg.train.storage_path = runs_path(sweep)
    trainer = build_trainer(cfg, callbacks=[TuneReportCallback()], progress=progress)
    trainer.fit()  # raises on failure: Tune marks the trial ERROR


# ------------------------------------------------------------------------------------------------- seeds
def confirm_with_seeds(spec: SweepSpec, trials, verbose: bool = False) -> dict:
    """``seeds`` > 1: each method's best trial's configuration trained again with seeds 0..seeds-1, all runs at once
    (runs ``<storage>/<name>/seeds/<method>-seed<s>``; a re-run of the command resumes them). The best trial itself is
    already one of these runs when it completed with a seed among them (``train.seed`` and ``data.seed`` = s, every
    other key the same; ``finished_trial_run``): its own run stands for that seed instead of training it again. Returns
    method -> {"trial": Trial, "summary": tbps.seeds.aggregate of the runs, "errors": {seed: error},
    "reused": {seed: the trial run's directory}}."""
    from shards.storage import join, read_json
    from tbps.engine.launcher import fit_concurrently, seed_configs
    from tbps.seeds import aggregate
    from tune.results import best_per_method

    best = best_per_method(trials)
    runs, reused = {}, {}
    for method, t in best.items():
        cfg = spec.base_config(method, t.params)
        cfg.train.run_name = method
        cfg.train.storage_path = join(experiment_path(spec), "seeds")
        cfg.train.seeds = list(range(spec.seeds))
        for seed, c in seed_configs(cfg).items():
            own = finished_trial_run(spec, t, c)
            if own:
                reused.setdefault(method, {})[seed] = own
                continue
            runs[f"{method} seed {seed}"] = c
    also = "; ".join(f"{m} seed {', '.join(map(str, r))}: its search trial's own finished run"
                     for m, r in reused.items())
    print(f"[sweep] seeds: the best configuration of {', '.join(best)} with {spec.seeds} seeds each "
          f"({len(runs)} runs{'; ' + also if also else ''})", file=sys.stderr)
    errors = fit_concurrently(runs, verbose) if runs else {}
    out = {}
    for method, t in best.items():
        metrics, failed = {}, {}
        for seed in range(spec.seeds):
            label = f"{method} seed {seed}"
            if seed in reused.get(method, {}):
                metrics[seed] = read_json(join(reused[method][seed], "metrics.json"))
            elif errors[label]:
                failed[seed] = errors[label].splitlines()[0]
            else:
                c = runs[label]
                metrics[seed] = read_json(join(c.train.storage_path, c.train.run_name, "metrics.json"))
        out[method] = {"trial": t, "summary": aggregate(metrics, failed) if metrics else None, "errors": failed,
                       "reused": reused.get(method, {})}
    return out


def finished_trial_run(spec: SweepSpec, trial, seed_cfg) -> str | None:
    """The directory of ``trial``'s own Ray Train run when that run is the one ``seed_cfg`` asks for: the trial
    completed (its final test evaluated, not stopped by ASHA) and its saved config.yaml equals ``seed_cfg`` in every
    key but the run's name and place. Else None (that seed is trained)."""
    import copy

    import yaml

    from shards.storage import join, read_bytes
    from tbps.config import dump_yaml
    from tbps.engine.loop import as_saved

    if trial.status != "completed":
        return None
    run = join(runs_path(spec), trial.trial_id)
    try:
        trained = yaml.safe_load(read_bytes(join(run, "config.yaml")))
    except (OSError, ValueError, yaml.YAMLError):  # gone or unreadable: train the seed
        return None
    if not isinstance(trained, dict) or not isinstance(trained.get("train"), dict):
        return None
    wanted = yaml.safe_load(dump_yaml(as_saved(copy.deepcopy(seed_cfg))))  # credentials redacted alike
    for tree in (trained, wanted):
        for key in ("run_name", "storage_path", "seeds"):
            tree["train"].pop(key, None)
    return run if trained == wanted else None


# ------------------------------------------------------------------------------------------------- helpers
def trial_dirname(trial) -> str:
    """Short trial directories (Tune's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def experiment_path(spec: SweepSpec) -> str:
    from shards.storage import join

    return join(spec.storage_path, spec.name)


SPEC_FILE = "sweep.json"  # the spec a sweep started with, beside Tune's experiment state
# spec fields a resumed sweep may change: where and how wide it runs, and the seeds confirmation after the search
SPEC_MAY_CHANGE = {"name", "storage_path", "source", "cpus", "gpus", "max_concurrent", "driver_cpus", "seeds"}
SPEC_NAMED = {"data_url"}  # allowed and named in a line: the same data at another place


def record_spec(spec: SweepSpec) -> None:
    """Write the spec a new sweep starts with (``<storage>/<name>/sweep.json``): ``check_resumed_spec`` compares a
    resumed sweep's against it."""
    from shards.storage import filesystem, join, write_bytes_atomic

    fs, path = filesystem(join(experiment_path(spec), SPEC_FILE))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_bytes_atomic(fs, path, json.dumps(spec.to_dict(), indent=1, sort_keys=True).encode())


def check_resumed_spec(spec: SweepSpec) -> None:
    """The same command resumes an interrupted sweep, and Tune restores it with what it started with: its
    num_samples, searcher and scheduler. A changed spec used to be half taken: a larger num_samples was ignored (and
    the sweep reported itself interrupted on every re-run), while the trials still to run or resume -- and best.yaml
    -- took the new overrides and spaces, one sweep of two configurations. Such a change is now an error naming the
    fields; where and how wide it runs (``SPEC_MAY_CHANGE``) may change, the data may move (named in a line)."""
    from shards.storage import join, read_json

    try:
        started = read_json(join(experiment_path(spec), SPEC_FILE))
    except FileNotFoundError:  # a sweep started before the spec was recorded: it is recorded now
        record_spec(spec)
        return
    from tbps.config import flatten

    old = flatten(started)
    new = flatten(json.loads(json.dumps(spec.to_dict())))
    changed = sorted(k for k in old.keys() | new.keys()
                     if k.split(".")[0] not in SPEC_MAY_CHANGE and old.get(k) != new.get(k))

    def moved_data(key: str) -> bool:  # the data_url of the sweep or of one method
        return key in SPEC_NAMED or (key.startswith("methods.") and key.endswith(".data_url"))

    named = [k for k in changed if moved_data(k) and (old.get(k) or new.get(k))]  # (not a field added since, empty)
    changed = [k for k in changed if not moved_data(k)]
    if changed:
        diffs = "; ".join(f"{k}: {_absent(old, k)} -> {_absent(new, k)}" for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(f"sweep {spec.name!r} resumes the interrupted sweep at {experiment_path(spec)}, which was "
                          f"started with another spec: {diffs}{more}. A resumed sweep goes on with the trials, "
                          "search and schedule it started with; give these fields their old values, or choose a new "
                          "name=... for a new sweep")
    if named:
        print(f"[sweep] resuming {spec.name!r} with " + "; ".join(f"{k}: {_absent(old, k)} -> {_absent(new, k)}"
                                                                for k in named), file=sys.stderr)


def _absent(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else "(not set)"


def runs_path(spec: SweepSpec) -> str:
    from shards.storage import join

    return join(experiment_path(spec), "runs")


def absolute_storage(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def trial_resources(spec: SweepSpec) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds at once: its driver plus its Ray Train workers (the largest method)."""
    cpus = gpus = 0.0
    for m in spec.methods:
        t = spec.base_config(m).train
        workers = t.worker_range()[1]
        cpus = max(cpus, spec.driver_cpus + workers * t.cpus_per_worker)
        gpus = max(gpus, workers * t.gpus_per_worker if t.use_gpu else 0.0)
    return cpus, gpus


def max_concurrent(spec: SweepSpec, cluster: dict) -> int:
    """How many trials fit the budget at once (resources: from the sweep, 0 = the cluster's)."""
    if spec.max_concurrent:
        return spec.max_concurrent
    need_cpu, need_gpu = trial_resources(spec)
    have_cpu = spec.cpus or cluster.get("CPU", 0)
    have_gpu = spec.gpus or cluster.get("GPU", 0)
    fits = math.floor(have_cpu / need_cpu) if need_cpu else spec.num_samples
    if need_gpu:
        fits = min(fits, math.floor(have_gpu / need_gpu))
    if fits < 1:
        raise ConfigError(f"one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs (driver + workers) but the "
                          f"budget is {have_cpu:g} CPUs and {have_gpu:g} GPUs: lower train.num_workers or raise "
                          f"resources")
    return max(1, min(fits, spec.num_samples))


def prepare(spec: SweepSpec) -> SweepSpec:
    """Resolve the data URL (the demo set when empty) and storage, and pre-flight every method's config."""
    from tbps.engine.launcher import preflight

    if not spec.data_url:
        from tbps.demo import demo_dataset

        spec.data_url = demo_dataset()
    spec.storage_path = absolute_storage(spec.storage_path)
    manifests = {}
    for m in spec.methods:
        cfg = spec.base_config(m)
        if cfg.train.eval_every != 1:
            raise ConfigError(f"{spec.source}: methods.{m}: a sweep evaluates val every epoch (ASHA compares trials "
                              f"per epoch); remove train.eval_every={cfg.train.eval_every}")
        try:
            manifests[m] = (cfg.data.url, cfg.data.val_split, preflight(cfg))
        except ConfigError as e:  # (a method's own data_url is named in the message as data.url)
            raise ConfigError(f"methods.{m}: {e}") from None
    check_same_dataset(manifests)
    return spec


def check_same_dataset(manifests: dict[str, tuple[str, str, dict]]) -> None:
    """The methods of a sweep compare on one dataset, which a method may read from its own copy (``methods.<name>.
    data_url``: the dataset converted as its preset needs). Copies of different datasets are an error; val splits
    that differ (IVT's caption rule leaves RSTPReid pairs out, another seed of --val-from-train) are named, as the
    methods' val metrics -- what the search and ASHA compare -- are then measured on different pairs."""
    urls = {url for url, _, _ in manifests.values()}
    if len(urls) < 2:
        return
    names = {m: manifest.get("dataset", "?") for m, (_, _, manifest) in manifests.items()}
    if len(set(names.values())) > 1:
        raise ConfigError("the methods of a sweep compare on one dataset, and their data URLs hold different ones: " +
                          ", ".join(f"{m}: {names[m]} ({manifests[m][0]})" for m in manifests) +
                          "; a method's data_url is the same dataset converted as its preset needs")
    vals = {}
    for m, (url, split, manifest) in manifests.items():
        info = manifest["splits"][split]
        vals[m] = (split, info.get("images"), info.get("captions"), info.get("ids"))
    if len(set(vals.values())) > 1:
        print("[sweep] warning: the methods' val splits differ, so their val metrics (what the search and ASHA "
              "compare) are measured on different pairs: " +
              "; ".join(f"{m}: {split!r} of {manifests[m][0]}, {images} images, {captions} captions, {ids} ids"
                        for m, (split, images, captions, ids) in vals.items()), file=sys.stderr)


SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune copies AWS credentials from the driver's environment into every trainable's runtime env
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime-env agent writes runtime envs into
    its log: the secret key ended up in ``runtime_env_agent.log``. Trials get credentials the way training runs do
    (docs/reliability.md): from the process that started a local Ray, or from the nodes' own environment or instance
    role on a cluster. Ray reads the set when a trainable's actor class is made, so this holds for the whole sweep."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(SECRET_ENV)


def resumable(spec: SweepSpec) -> bool:
    """Whether ``<storage>/<name>`` holds an interrupted sweep that the same command resumes."""
    import ray.tune

    return ray.tune.Tuner.can_restore(experiment_path(spec))


def build_tuner(spec: SweepSpec, concurrent: int, progress: str = "lines"):
    """A new Tuner, or the interrupted one restored from <storage>/<name> (same command = resume). ``progress``:
    the trials' (``tbps.engine.launcher.build_trainer``)."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    keep_credentials_out_of_runtime_envs()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, spec=spec.to_dict(), progress=progress),
                                        {"CPU": spec.driver_cpus})
    path = experiment_path(spec)
    if ray.tune.Tuner.can_restore(path):
        print(f"[sweep] resuming the interrupted sweep at {path}", file=sys.stderr)
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    record_spec(spec)
    metric = f"val_{spec.metric}"
    # every method's first trial comes first (the rest of its parameters sampled), so each method gets a run
    search = OptunaSearch(space=spec.define_by_run, metric=metric, mode="max",
                          points_to_evaluate=[{"method": m} for m in sorted(spec.methods)][:spec.num_samples],
                          sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, spec.num_samples)))
    scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode="max", max_t=spec.epochs() + 1,
                              grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=spec.num_samples,
                                        max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname),
        run_config=ray.tune.RunConfig(name=spec.name, storage_path=spec.storage_path,
                                      failure_config=ray.tune.FailureConfig(max_failures=1)),
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tune.sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="sweep preset (tune/configs: smoke, cuhk-pedes, icfg-pedes, "
                                                     "rstpreid) or a sweep YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value: sweep fields or tbps config keys for every trial")
    ap.add_argument("--check", action="store_true",
                    help="check the sweep (its spec, every method's config, a resumed sweep's spec), print its plan "
                         "and start nothing")
    add_verbose(ap)
    args = ap.parse_args(argv)
    return run_command("python -m tune.sweep", lambda: _sweep(args), args.verbose)


def _sweep(args) -> int:
    from tbps.extras import require

    require("optuna", "tune.sweep (its search)")
    require("matplotlib", "tune.sweep (its metric-against-parameter plot)")
    try:
        spec = prepare(load_sweep(args.config, args.overrides))
        resumes = resumable(spec)
        if resumes:
            check_resumed_spec(spec)
        if args.check:
            return _check(spec, resumes)
        from tbps.engine.launcher import ensure_ray

        ensure_ray(spec.base_config(next(iter(spec.methods))), console=None if args.verbose else "none")
        import ray

        concurrent = max_concurrent(spec, ray.cluster_resources())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from tune.results import summarize

    print(f"[sweep] {spec.name}: {spec.num_samples} trials over {', '.join(spec.methods)}, "
          f"{concurrent} at a time, Optuna + ASHA on val {spec.metric}; outputs under {experiment_path(spec)}",
          file=sys.stderr)
    results = build_tuner(spec, concurrent, "lines" if args.verbose else "events").fit()
    report = summarize(spec, results)
    finished = len(report.trials) - report.unfinished
    if finished < spec.num_samples:
        print("\n" + report.table)
        print(f"\n[sweep] interrupted with {finished} of {spec.num_samples} trials finished: run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    if spec.seeds > 1:
        report = summarize(spec, results, seeds=confirm_with_seeds(spec, report.trials, args.verbose))
    print("\n" + report.table)
    print(f"\nbest: {report.best_line}\nresults: {report.outputs}\nrun the best config: "
          f"python -m tbps.train --config {report.best_yaml}")
    return 0


def describe_distribution(dist) -> str:
    """A search distribution as the sweep YAML gives it, ``{loguniform: [0.01, 0.1]}``, as ``loguniform(0.01, 0.1)``."""
    if isinstance(dist, dict) and len(dist) == 1:
        ((kind, args),) = dist.items()
        return f"{kind}({', '.join(map(str, args)) if isinstance(args, (list, tuple)) else args})"
    return str(dist)


def _check(spec: SweepSpec, resumes: bool) -> int:
    """--check: the sweep's plan on stdout -- trials, search, what one trial holds and how many run at once, each
    method's space and run plan, outputs; no Ray started, nothing written."""
    from tbps.data import load_manifest
    from tbps.engine.launcher import run_plan

    need_cpu, need_gpu = trial_resources(spec)
    at_once = f"{max_concurrent(spec, {})} at a time within resources" if spec.max_concurrent or spec.cpus else \
        "as many at a time as the cluster holds"
    print(f"sweep {spec.name}: {spec.num_samples} trials over {', '.join(spec.methods)}, Optuna + ASHA on val "
          f"{spec.metric} (grace period {spec.grace_period}, reduction factor {spec.reduction_factor})" +
          (f", then {spec.seeds} seeds of each method's best" if spec.seeds > 1 else ""))
    print(f"one trial holds {need_cpu:g} CPUs and {need_gpu:g} GPUs (its driver and workers): {at_once}")
    for method, m in spec.methods.items():
        cfg = spec.base_config(method)
        space = "; ".join(f"{k} {describe_distribution(v)}" for k, v in spec.params_for(method).items()) or \
            "nothing (fixed)"
        print(f"{method} ({m.config}): searches {space}")
        for line in run_plan(cfg, load_manifest(cfg.data.url)):
            print(f"  {line}")
    path = experiment_path(spec)
    print(f"outputs: {path} ({'resumes the interrupted sweep' if resumes else 'a new sweep'})")
    print("[sweep] --check: the sweep is valid; nothing was started", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
