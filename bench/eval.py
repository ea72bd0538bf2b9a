"""Retrieval-metric speed and memory: ``tbps.eval.retrieval_metrics`` against the public repos' way (a full argsort of
the Q x G score matrix, then a Python loop over queries), on the same random scores, side by side.

    python bench/eval.py            # CUHK-PEDES scale (6,156 x 3,074) and ICFG-PEDES scale (19,848 x 19,848)
    python bench/eval.py --quick    # small shapes: checks the two agree (CI)

Each implementation runs in its own subprocess; its peak memory is the peak RSS (Linux VmHWM, reset just before the
run) above the RSS with the score matrix loaded. Goal at ICFG scale: >= 5x faster and <= 1/4 of the peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

SCALES = {  # queries, gallery, identities (test split sizes, REFERENCE.md)
    "CUHK-PEDES": (6156, 3074, 1000),
    "ICFG-PEDES": (19848, 19848, 1000),
}
QUICK = {"quick-a": (700, 300, 60), "quick-b": (1200, 1100, 90)}


def make_case(queries: int, gallery: int, ids: int, seed: int = 0):
    """Random but learnable-looking scores: correct pairs score higher on average; a few exact ties."""
    rng = np.random.default_rng(seed)
    gallery_pids = rng.integers(0, ids, gallery)
    query_pids = gallery_pids[rng.integers(0, gallery, queries)]  # every query has at least one correct image
    sim = rng.standard_normal((queries, gallery), dtype=np.float32) * 0.1
    sim += 0.15 * (query_pids[:, None] == gallery_pids[None, :])
    sim = np.round(sim, 5)  # quantised: some exact ties occur, exercising the tie-break order
    return sim, query_pids, gallery_pids


def naive_metrics(sim: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray) -> dict:
    """The public repos' evaluation: argsort everything, then per query in Python."""
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = gallery_pids[order] == query_pids[:, None]
    hits = {1: 0, 5: 0, 10: 0}
    aps, inps = [], []
    for q in range(len(sim)):
        m = matches[q]
        if not m.any():
            continue
        for k in hits:
            hits[k] += bool(m[:k].any())
        pos = np.flatnonzero(m) + 1
        aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
        inps.append(len(pos) / pos[-1])
    n = len(sim)
    return {"R1": 100 * hits[1] / n, "R5": 100 * hits[5] / n, "R10": 100 * hits[10] / n,
            "mAP": 100 * float(np.mean(aps)), "mINP": 100 * float(np.mean(inps))}


def ours(sim: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray) -> dict:
    import torch

    from tbps.eval import retrieval_metrics

    return retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(query_pids), torch.from_numpy(gallery_pids))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(impl: str, shape: tuple[int, int, int]) -> dict:
    """In a fresh process: build the case, note the RSS, run once, report time and the peak RSS increase."""
    if impl == "ours":
        import torch  # noqa: F401  (imported before the baseline is taken, like numpy)

        import tbps.eval  # noqa: F401
    sim, qp, gp = make_case(*shape)
    _reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    metrics = (ours if impl == "ours" else naive_metrics)(sim, qp, gp)
    seconds = time.perf_counter() - t0
    return {"impl": impl, "seconds": seconds, "peak_mb": max(_status_mb("VmHWM") - base, 0.0), "metrics": metrics}


def measure(impl: str, shape) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, json.dumps(list(shape))],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _root()})
    if out.returncode != 0:
        raise RuntimeError(f"{impl} on {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def agree(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return all(abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])) for k in ("R1", "R5", "R10", "mAP", "mINP"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes; checks agreement (CI)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child[0], tuple(json.loads(args.child[1])))))
        return 0
    scales = QUICK if args.quick else SCALES
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print("| scale | Q x G | naive s | ours s | speed-up | naive peak MB | ours peak MB | memory ratio | agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name, shape in scales.items():
        base = measure("naive", shape)
        mine = measure("ours", shape)
        same = agree(base["metrics"], mine["metrics"])
        ok &= same
        print(f"| {name} | {shape[0]} x {shape[1]} | {base['seconds']:.2f} | {mine['seconds']:.2f} | "
              f"{base['seconds'] / max(mine['seconds'], 1e-9):.1f}x | {base['peak_mb']:.0f} | {mine['peak_mb']:.0f} | "
              f"{mine['peak_mb'] / max(base['peak_mb'], 1e-9):.2f} | {'yes' if same else 'NO'} |")
        if not same:
            print(f"  naive {base['metrics']}\n  ours  {mine['metrics']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
