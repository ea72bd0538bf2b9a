"""Seeds with confidence: the same configuration trained with several seeds, summarised as mean ± sample standard
deviation and a 95 % confidence interval of the mean (Student's t with n - 1 degrees of freedom).

Published TBPS numbers move by about 2 R1 points between seeds; one run says little. ``python -m tbps.train …
train.seeds=[0,1,2]`` trains the seeds concurrently on the cluster (one run each, ``<run>-seed<s>``) and writes
``<run>/seeds.json`` and ``seeds.md`` with this summary of each run's test metrics (at its best val epoch) and best
val metrics.
"""

from __future__ import annotations

import math

from tbps.eval.metrics import SELECT_METRICS

# two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30); beyond, the Cornish-Fisher expansion
# around the normal's quantile (equal to the tables to 3 decimals from 10 degrees of freedom on). The normal's 1.96
# itself, used beyond 30 until 2026-11-25, is 4 % below t at 31 (an interval 4 % too narrow).
_Z975 = 1.959963984540054
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def summarize(values: list[float]) -> dict:
    """``{n, mean, std, ci95: [low, high], values}``; std and the interval need two values or more (NaN below)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": list(values)}


def aggregate(runs: dict[str, dict], failed: dict | None = None) -> dict:
    """``runs``: seed label -> that run's metrics.json. Returns ``{"seeds": [...], "test": {metric: summary},
    "val": {metric: summary}}`` (val: the best val epoch's metrics of each run); with ``failed`` (seed label -> its
    error), also ``"failed"``: those seeds are not in the summary, and the summary says so."""
    out: dict = {"seeds": list(runs), "test": {}, "val": {}}
    if failed:
        out["failed"] = dict(failed)
    for part in ("test", "val"):
        for metric in SELECT_METRICS:  # R1_mAP too: what a sweep or the ivt preset may select on
            values = [float(r[part][metric]) for r in runs.values() if metric in (r.get(part) or {})]
            if values:
                out[part][metric] = summarize(values)
    return out


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", "", f"{len(summary['seeds'])} seeds: {', '.join(map(str, summary['seeds']))}. Mean ± "
             "sample std; 95 % interval of the mean (Student's t).", ""]
    failed = summary.get("failed") or {}
    if failed:  # a seed that diverged or crashed is left out of the mean, which then reads better than the config is
        lines += [f"**{len(failed)} more seed(s) failed and are not in these numbers**: "
                  + "; ".join(f"seed {s}: {e}" for s, e in failed.items())
                  + f". The configuration did not train through with {len(failed)} of "
                  f"{len(failed) + len(summary['seeds'])} seeds.", ""]
    for part, label in (("test", "test (at each run's best val epoch)"), ("val", "best val")):
        if not summary[part]:
            continue
        lines += [f"## {label}", "", "| metric | mean ± std | 95 % interval | per seed |", "|---|---|---|---|"]
        for metric, s in summary[part].items():
            lo, hi = s["ci95"]
            lines.append(f"| {metric} | {s['mean']:.2f} ± {s['std']:.2f} | [{lo:.2f}, {hi:.2f}] | "
                         f"{', '.join(f'{v:.2f}' for v in s['values'])} |")
        lines.append("")
    return "\n".join(lines)
