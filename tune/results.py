"""What a sweep leaves behind: trials sorted by the metric (Markdown + CSV), the best trial's full config as a YAML
that ``python -m tbps.train --config`` runs as is, and the metric against each method's parameters (PNG)."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from dataclasses import dataclass, field

from shards.cli import error_line
from tbps.config import dump_yaml
from tbps.eval.metrics import METRICS
from tune.space import SweepSpec

STOPPED = "stopped early (ASHA)"


@dataclass
class Trial:
    trial_id: str
    method: str
    params: dict
    status: str  # completed | stopped early (ASHA) | error | unfinished
    epochs_run: int
    epochs: int
    metric: float  # best val value of the sweep metric (nan when none)
    val: dict = field(default_factory=dict)  # val metrics of the best epoch
    test: dict = field(default_factory=dict)  # test metrics (completed trials)
    error: str = ""


@dataclass
class Report:
    trials: list[Trial]
    table: str
    best: Trial | None
    best_line: str
    outputs: str
    best_yaml: str
    unfinished: int


def trial_statuses(spec: SweepSpec) -> dict[str, str]:
    """Tune's saved status of each trial (TERMINATED, ERROR, RUNNING, PENDING, ...), read back from the experiment
    state on storage: after an interruption it still says RUNNING/PENDING for the trials a resume continues."""
    from ray.tune import ExperimentAnalysis

    from tune.sweep import experiment_path

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path(spec)).trials}
    except Exception:  # no state written yet
        return {}


def collect(spec: SweepSpec, results) -> list[Trial]:
    """One Trial per Tune result, read from its reported metrics (every report = one epoch + the final test)."""
    metric = f"val_{spec.metric}"
    statuses = trial_statuses(spec)
    trials = []
    for r in results:
        if not r.config or "method" not in r.config:
            continue
        method, params = SweepSpec.split(r.config)
        epochs = spec.base_config(method, params).train.epochs
        df = r.metrics_dataframe
        rows = df.to_dict("records") if df is not None and len(df) else []
        # the final report carries test_* (absent = NaN in the other rows of the dataframe)
        final = next((x for x in rows if _number(x.get("test_R1"))), None)
        epoch_rows = [x for x in rows if x is not final]
        epochs_run = int(max((x.get("epoch", 0) or 0 for x in epoch_rows), default=0))
        scored = [x for x in epoch_rows if _number(x.get(metric))]
        best = max(scored, key=lambda x: x[metric]) if scored else {}
        trial_id = _trial_id(r)
        if r.error:
            status = "error"
        elif final is not None:
            status = "completed"
        elif statuses.get(trial_id) == "TERMINATED":  # ended without its final test: ASHA stopped it
            status = STOPPED
        else:
            status = "unfinished"
        trials.append(Trial(
            trial_id=trial_id,
            method=method, params=params, status=status, epochs_run=epochs_run, epochs=epochs,
            metric=float(best.get(metric, math.nan)) if best else math.nan,
            val={k[4:]: float(v) for k, v in best.items() if str(k).startswith("val_")},
            test={k[5:]: float(v) for k, v in (final or {}).items() if str(k).startswith("test_")},
            error=error_line(r.error) if r.error else ""))
    trials.sort(key=lambda t: (-(t.metric if t.metric == t.metric else -math.inf), t.trial_id))
    return trials


def selectable(t: Trial) -> bool:
    """A trial that may be a sweep's (or a method's) best: it has a val value, and it did not fail -- a trial that
    failed (diverged, crashed) after good epochs has a real val value, but its configuration does not train through:
    best.yaml and the seeds' runs would repeat the failure."""
    return t.metric == t.metric and t.status != "error"


def best_per_method(trials: list[Trial]) -> dict[str, Trial]:
    """Each method's best selectable trial, from trials sorted by the metric (``collect``)."""
    best: dict[str, Trial] = {}
    for t in trials:
        if selectable(t) and t.method not in best:
            best[t.method] = t
    return best


def _number(v) -> bool:
    """A reported value that is there: not None and not NaN (Tune's dataframe fills missing keys with NaN)."""
    return isinstance(v, (int, float)) and v == v


def _trial_id(result) -> str:
    m = result.metrics or {}
    if m.get("trial_id"):
        return str(m["trial_id"])
    name = os.path.basename(str(result.path or "").rstrip("/"))
    return name[len("trial_"):] if name.startswith("trial_") else name


def _fmt(v) -> str:
    if isinstance(v, float):
        return "—" if v != v else (f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip("."))
    return str(v)


def table(spec: SweepSpec, trials: list[Trial]) -> str:
    m = spec.metric
    extra = [k for k in ("R1", "mAP") if k != m]
    head = ["#", "trial", "method", "params", f"val {m}"] + [f"val {k}" for k in extra] + \
        ["test R1", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(trials, 1):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items())) or "(preset)"
        status = t.status + (f": {t.error}" if t.error else "")
        row = [str(i), t.trial_id, t.method, params, _fmt(t.metric)] + \
            [_fmt(t.val.get(k, math.nan)) for k in extra] + \
            [_fmt(t.test.get("R1", math.nan)), f"{t.epochs_run}/{t.epochs}", status]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seeds_table(spec: SweepSpec, seeds: dict) -> str:
    """Each method's best configuration over ``spec.seeds`` seeds: mean ± std and the 95 % interval of the mean."""
    m = spec.metric
    lines = [f"## Seeds: each method's best configuration trained again with {spec.seeds} seeds",
             "", "Mean ± sample std; [95 % interval of the mean] (Student's t).", "",
             f"| method | trial | params | val {m} | test R1 | test mAP | seeds |", "|---|---|---|---|---|---|---|"]
    for method, entry in _by_mean(spec, seeds):
        t, summary = entry["trial"], entry["summary"]
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items())) or "(preset)"

        def cell(part, key):
            x = (summary or {}).get(part, {}).get(key)
            if not x:
                return "—"
            return f"{x['mean']:.2f} ± {x['std']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]"
        n = len(summary["seeds"]) if summary else 0
        failed = f", {len(entry['errors'])} failed" if entry["errors"] else ""
        lines.append(f"| {method} | {t.trial_id} | {params} | {cell('val', m)} | {cell('test', 'R1')} | "
                     f"{cell('test', 'mAP')} | {n}{failed} |")
    reused = {m: e["reused"] for m, e in seeds.items() if e.get("reused")}
    if reused:
        which = "; ".join(f"{m} seed {', '.join(map(str, r))} (trial {seeds[m]['trial'].trial_id})"
                          for m, r in reused.items())
        lines += ["", f"Not trained again: {which}. A trial that completed with one of these seeds is that seed's "
                      "run (same configuration and seed); its value also chose the configuration, so the mean "
                      "leans as optimistic as a retrained copy of it would."]
    return "\n".join(lines)


def _by_mean(spec: SweepSpec, seeds: dict) -> list:
    """Methods by the mean val metric of their seeds, best first: those whose every seed trained through before
    those with a failed seed (their mean is over the seeds that survived, and their configuration does not train
    through with every seed -- as a failed trial is never the best), methods without a mean last."""
    def key(entry):
        x = (entry["summary"] or {}).get("val", {}).get(spec.metric)
        return (bool(entry["errors"]), -x["mean"] if x else math.inf)
    return sorted(seeds.items(), key=lambda kv: key(kv[1]))


def csv_text(trials: list[Trial]) -> str:
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "method", "status", "epochs_run", "epochs", "metric"] + keys +
               [f"val_{k}" for k in METRICS] + [f"test_{k}" for k in ("R1", "mAP")])
    for t in trials:
        w.writerow([t.trial_id, t.method, t.status, t.epochs_run, t.epochs, t.metric] +
                   [t.params.get(k, "") for k in keys] +
                   [t.val.get(k, "") for k in METRICS] +
                   [t.test.get(k, "") for k in ("R1", "mAP")])
    return buf.getvalue()


def best_config_yaml(spec: SweepSpec, best: Trial, seeds: dict | None = None) -> str:
    cfg = spec.base_config(best.method, best.params)
    cfg.train.run_name = f"{spec.name}-best"
    cfg.train.storage_path = spec.storage_path
    chosen = ""
    if seeds and seeds.get(best.method, {}).get("summary"):
        x = seeds[best.method]["summary"]["val"].get(spec.metric)
        if x:
            chosen = (f"# Chosen by the mean over {len(x['values'])} seeds: val {spec.metric} {x['mean']:.2f} ± "
                      f"{x['std']:.2f}, 95 % interval [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}].\n")
        failed = seeds[best.method]["errors"]
        if failed:  # chosen so only when no method with a mean had all its seeds train through
            chosen += (f"# Warning: {len(failed)} seed(s) of it failed and are not in that mean ("
                       + "; ".join(f"seed {s}: {e}" for s, e in failed.items()) + ").\n")
    head = (f"# Best trial of sweep {spec.name!r} ({best.trial_id}): {best.method}, val {spec.metric} "
            f"{_fmt(best.metric)} after {best.epochs_run} epochs.\n" + chosen +
            f"# Sampled: {', '.join(f'{k}={_fmt(v)}' for k, v in sorted(best.params.items())) or '(preset)'}\n"
            f"# Run it: python -m tbps.train --config best.yaml   (train.epochs etc. may be raised for a full run)\n")
    return head + dump_yaml(cfg)


def plot(spec: SweepSpec, trials: list[Trial], path: str, seeds: dict | None = None) -> None:
    """Metric against each sampled parameter, one row per method; stopped trials hollow; with ``seeds``, each
    method's best configuration as its seeds' mean with the 95 % interval (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    methods = [m for m in spec.methods if any(t.method == m for t in trials)] or list(spec.methods)
    cols = max([len(spec.methods[m].space) for m in methods] + [1])
    fig, axes = plt.subplots(len(methods), cols, figsize=(3.2 * cols, 2.6 * len(methods)), squeeze=False)
    for r, m in enumerate(methods):
        keys = list(spec.methods[m].space)
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(keys):
                ax.axis("off")
                continue
            key = keys[c]
            dist = spec.methods[m].space[key]
            for stopped in (False, True):
                pts = [(t.params.get(key), t.metric) for t in trials
                       if t.method == m and (t.status == STOPPED) == stopped and t.metric == t.metric
                       and isinstance(t.params.get(key), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.scatter(xs, ys, s=28, facecolors="none" if stopped else "C0", edgecolors="C0",
                               label="stopped early" if stopped else "completed")
            confirmed = (seeds or {}).get(m)
            x = (confirmed["summary"] or {}).get("val", {}).get(spec.metric) if confirmed else None
            if x and isinstance(confirmed["trial"].params.get(key), (int, float)) and x["n"] > 1:
                ax.errorbar([confirmed["trial"].params[key]], [x["mean"]], yerr=[[x["mean"] - x["ci95"][0]],
                                                                                  [x["ci95"][1] - x["mean"]]],
                            fmt="D", color="C3", capsize=3, label=f"{x['n']} seeds: mean, 95 % interval")
            if isinstance(dist, dict) and set(dist) & {"uniform", "loguniform", "int"}:
                (kind, (lo, hi)), = dist.items()
                if kind == "loguniform":
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    ax.set_xlim(lo / 1.15, hi * 1.15)
                else:
                    pad = (hi - lo) * 0.05
                    ax.set_xlim(lo - pad, hi + pad)  # the whole search range, so coverage shows
            ax.set_xlabel(key, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{m}\nval {spec.metric}", fontsize=8)
            ax.tick_params(labelsize=7)
        if not keys:
            axes[r][0].set_title(f"{m}: no sampled parameters", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(f"sweep {spec.name}: val {spec.metric} per trial (best epoch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_line(spec: SweepSpec) -> str:
    """Which data each method trained on: the sweep's data_url, or a method's own copy (``methods.<name>.data_url``)."""
    by_url: dict[str, list[str]] = {}
    for name, m in spec.methods.items():
        by_url.setdefault(m.data_url or spec.data_url, []).append(name)
    if len(by_url) == 1:
        return f"Data: {next(iter(by_url))}"
    return "Data: " + "; ".join(f"{', '.join(names)}: {url}" for url, names in by_url.items())


def summarize(spec: SweepSpec, results, seeds: dict | None = None) -> Report:
    """Write results.md, results.csv, best.yaml and metric_vs_params.png under <storage>/<name>/. ``seeds``
    (``tune.sweep.confirm_with_seeds``): the seeds section, error bars, and best.yaml chosen by the seeds' mean."""
    from shards.storage import filesystem, join

    from tune.sweep import experiment_path

    trials = collect(spec, results)
    text = table(spec, trials)
    best = next(iter(best_per_method(trials).values()), None)  # trials are sorted: the first method's is the best
    if seeds:
        text += "\n\n" + seeds_table(spec, seeds)
        ranked = [e for _, e in _by_mean(spec, seeds) if e["summary"]]
        if ranked:
            best = ranked[0]["trial"]
    out = experiment_path(spec)
    fs, root = filesystem(out)
    files = {"results.md": f"# Sweep {spec.name}\n\n{data_line(spec)}\n\n{text}\n", "results.csv": csv_text(trials)}
    if best:
        files["best.yaml"] = best_config_yaml(spec, best, seeds)
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(body)
        if trials:
            plot(spec, trials, os.path.join(tmp, "metric_vs_params.png"), seeds)
        fs.makedirs(root, exist_ok=True)
        for name in os.listdir(tmp):
            fs.put(os.path.join(tmp, name), f"{root}/{name}")
    best_line = (f"{best.trial_id} {best.method} val {spec.metric} {_fmt(best.metric)} "
                 f"({', '.join(f'{k}={_fmt(v)}' for k, v in sorted(best.params.items())) or 'preset'})"
                 if best else "no trial that did not fail reported a val metric")
    x = ((seeds or {}).get(best.method, {}).get("summary") or {}).get("val", {}).get(spec.metric) if best else None
    if x:
        best_line += f"; over {x['n']} seeds val {spec.metric} {x['mean']:.2f} ± {x['std']:.2f}"
    return Report(trials, text, best, best_line, out, join(out, "best.yaml") if best else "",
                  sum(t.status == "unfinished" for t in trials))
