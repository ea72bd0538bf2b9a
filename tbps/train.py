"""Train a text-based person search method on Ray Train + DeepSpeed.

    python -m tbps.train                                   # the embedded demo (ToyPEDES, local Ray, CPU)
    python -m tbps.train --config irra data.url=s3://bucket/cuhk-pedes train.num_workers=8 train.use_gpu=true
    ray job submit --working-dir . -- python -m tbps.train --config irra_tiny data.url=...
    python -m tbps.train --config irra data.url=... --check   # check the config, print the plan; start nothing

Overrides are dotted ``key=value`` pairs (YAML values). Re-running with the same train.run_name and
train.storage_path resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from shards.cli import add_verbose, describe, run_command
from tbps.config import ConfigError, load_config


def demo_overrides() -> list[str]:
    from tbps.demo import demo_dataset

    url = demo_dataset()
    return [f"data.url={url}", f"train.run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}"]


def read_run_metrics(cfg) -> dict:
    """The run's metrics.json (history, best val, final test), from local or remote storage."""
    from shards.storage import join, read_json

    return read_json(join(cfg.train.storage_path, cfg.train.run_name, "metrics.json"))


def final_table(run: dict) -> str:
    from tbps.eval import format_table

    rows = {}
    if run.get("val"):
        rows[f"val (ep {run['best_val']['epoch']})"] = run["val"]
    if run.get("test"):
        rows[f"test (at best val, ep {run['best_val']['epoch']})" if run.get("test_selected") else "test"] = run["test"]
    selected = run.get("test_selected")
    if selected:  # eval.test_every_epoch: the papers' protocol, beside ours and labelled
        rows[f"{selected['label']}, ep {selected['epoch']}"] = selected["metrics"]
    table = format_table(rows)
    test = rows.get("test", {})
    if test.get("chance_R1"):
        table += f"\n\ntest R1 is {test['R1'] / test['chance_R1']:.1f}x chance."
    return table


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tbps.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="preset name (tbps/configs) or YAML file; default: the demo (irra_tiny)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.temperature=0.03")
    ap.add_argument("--check", action="store_true",
                    help="check the config as a run would (data, tokenizer, weights, model, resume), print the plan "
                         "(steps per epoch, global batch, outputs) and the resolved config, and start nothing")
    add_verbose(ap)
    args = ap.parse_args(argv)
    return run_command("python -m tbps.train", lambda: _train(args), args.verbose)


def _train(args) -> int:
    try:
        overrides = list(args.overrides)
        config = args.config
        if config is None:
            config = "irra_tiny"
            if not any(o.startswith("data.url=") for o in overrides):
                print("[tbps] no --config and no data.url: running the embedded demo", file=sys.stderr)
                overrides = demo_overrides() + overrides
        cfg = load_config(config, overrides)
        if args.check:
            return _check(cfg)
        if cfg.train.seeds:
            return _train_seeds(cfg, args.verbose)
        from tbps.engine.launcher import fit

        result = fit(cfg, verbose=args.verbose)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if result.error:
        message = describe(result.error)  # a bad shard, storage or checkpoint met inside a Train worker
        if message is not None:
            print(f"error: training failed: {message}", file=sys.stderr)
            return 2
        print(f"[tbps] training failed: {result.error}", file=sys.stderr)
        return 1
    print("\n" + final_table(read_run_metrics(cfg)))
    print(f"\nrun outputs: {cfg.train.storage_path}/{cfg.train.run_name} (metrics.json, best/, tensorboard/)")
    return 0


def _check(cfg) -> int:
    """--check: pre-flight, then the plan and the resolved config on stdout; no Ray, no lease, nothing written."""
    from tbps.config import dump_yaml
    from tbps.engine.launcher import preflight, run_outputs, run_plan, seed_configs, storage_path

    cfg.train.storage_path = storage_path(cfg)
    runs = seed_configs(cfg) if cfg.train.seeds else {None: cfg}
    for seed, c in runs.items():
        manifest = preflight(c)
        print(f"plan{'' if seed is None else f' (seed {seed})'}:")
        for line in run_plan(c, manifest) + [run_outputs(c)]:
            print(f"  {line}")
    print("\nconfig (as resolved; model.pretrained's architecture keys are read when a worker loads it):\n")
    print(dump_yaml(cfg), end="")
    print("\n[tbps] --check: the config is valid; nothing was started", file=sys.stderr)
    return 0


def _train_seeds(cfg, verbose: bool) -> int:
    """train.seeds: the runs concurrently, then their summary (tbps/seeds.py) in <run>/seeds.json and seeds.md."""
    import json

    from shards.storage import filesystem, join, read_json, write_bytes_atomic
    from tbps.engine.launcher import fit_seeds, seed_configs
    from tbps.seeds import aggregate, markdown

    errors = fit_seeds(cfg, verbose=verbose)
    failed = {s: e for s, e in errors.items() if e}
    for seed, error in failed.items():
        print(f"error: seed {seed} failed: {error.splitlines()[0] if error else error}", file=sys.stderr)
    runs = {}
    for seed, c in seed_configs(cfg).items():
        if seed not in failed:
            runs[seed] = read_json(join(c.train.storage_path, c.train.run_name, "metrics.json"))
    if not runs:
        return 1
    summary = aggregate(runs, {s: (e.splitlines() or [e])[0] for s, e in failed.items()})
    text = markdown(summary, f"{cfg.train.run_name}: {cfg.method.name}, seeds {', '.join(map(str, runs))}")
    out = join(cfg.train.storage_path, cfg.train.run_name)
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(fs, f"{root}/seeds.json", json.dumps(summary, indent=1).encode())
    write_bytes_atomic(fs, f"{root}/seeds.md", text.encode())
    print("\n" + text)
    print(f"summary: {out}/seeds.md, seeds.json; runs: {', '.join(f'{out}-seed{s}' for s in runs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
