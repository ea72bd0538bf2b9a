"""Run every benchmark, one after another, and print their tables (the numbers in docs/benchmarks.md).

    python bench/run_all.py            # full runs (tens of minutes on 2 cores; ICFG-scale eval needs ~8 GB RAM)
    python bench/run_all.py --quick    # each in its --quick mode (a couple of minutes): checks they all run
    python bench/run_all.py --only eval train_step

On a GPU machine add `python bench/train_step.py --paper` for the paper configs' samples/s and MFU (bench/gpu_15.sh
runs the whole GPU set).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "data": "data.py",  # issue #2: shards vs folder dataset, S3 vs local
    "overhead": "overhead.py",  # issue #4: Ray Train + DeepSpeed vs a plain loop
    "eval": "eval.py",  # issue #7: retrieval_metrics vs full argsort + Python loop
    "train_step": "train_step.py",  # issue #7: samples/s per method (MFU on GPU)
    "engine": "train_step.py --engine",  # issue #15: the step through DeepSpeed's engine vs the plain step
    "batch_mix": "batch_mix.py",  # issue #13: same-identity pairs per batch vs a global shuffle
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(SCRIPTS), help="a subset")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    failed = []
    for name in args.only or SCRIPTS:
        script, *extra = SCRIPTS[name].split()
        cmd = [sys.executable, os.path.join(HERE, script), *extra] + (["--quick"] if args.quick else [])
        print(f"\n## {name}: {' '.join(os.path.relpath(c) if c.endswith('.py') else c for c in cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, env=env)
        print(f"({time.time() - t0:.0f} s{'' if rc == 0 else f', exit {rc}'})", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
