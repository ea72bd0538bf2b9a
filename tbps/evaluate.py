"""Evaluate a saved checkpoint, an official IRRA run, or a method built from pretrained weights (zero-shot) on a
split and print R1/R5/R10/mAP/mINP.

    python -m tbps.evaluate --checkpoint runs/irra/best --data s3://bucket/cuhk-pedes --split test
    python -m tbps.evaluate --checkpoint runs/irra/best --checkpoint runs/pcc/best --out reports/cmp   # compare
    python -m tbps.evaluate --checkpoint logs/CUHK-PEDES/irra --data s3://bucket/cuhk-pedes   # an IRRA output dir
    python -m tbps.evaluate --config irra model.pretrained=s3://bucket/clip/ViT-B-16.pt --data s3://bucket/cuhk-pedes
    python -m tbps.evaluate --config irra model.pretrained=... --data ... --save-embeddings --out emb/   # + npz
    python -m tbps.evaluate --checkpoint ivt/checkpoint_best.pth --data s3://bucket/cuhk-pedes \
        data.tokenizer=s3://bucket/bert-base-uncased --ap trapezoid     # an official IVT model, + IVT's protocol

Cross-domain matrix: several --data, each LABEL=URL, evaluate every model on every dataset (train on one, test on
another); the table shows each metric per (model, dataset), and --out writes matrix.json ({model: {dataset:
{R1, R5, R10, mAP, mINP, ...}}}), matrix.md and matrix.png (an R1 heatmap). Each cell is that pair's single evaluation:

    python -m tbps.evaluate --checkpoint runs/cuhk/best --name CUHK --checkpoint runs/icfg/best --name ICFG \
        --data cuhk=s3://bucket/cuhk-pedes --data icfg=s3://bucket/icfg-pedes --data rstp=s3://bucket/rstpreid --out m/

With --out it writes metrics.md (one row per model), metrics.json and cmc.png (R@k against k, one curve each);
--save-embeddings also writes embeddings.npz there (per model: image_emb, image_path, image_pid, text_emb, caption,
text_pid, in the space the method's similarity uses).

A checkpoint directory is any of a run's ``best/`` or Ray ``checkpoint_*`` directories (model.pt + config.yaml +
meta.json), an official IRRA output directory (best.pth + configs.yaml, detected) or an official IVT checkpoint
file (``{"state_dict": ...}`` with encoder_vl.* keys, detected; built from the ivt preset, key=value overrides apply),
local or on object storage.

--ap trapezoid adds a second row per model computed as IVT's tables are (trapezoid AP over a gallery of every second
caption row's image, every row's on ICFG-PEDES; docs/methods.md "Metric comparability"). Our metrics stay the first
row.
"""

from __future__ import annotations

import argparse
import json
import sys


def evaluation_autocast(cfg, device: str):
    """The dtype a model of ``cfg`` is evaluated under autocast to on ``device``: on a GPU ``eval.precision`` (auto:
    as the official code evaluates the model's ``train.precision``, and as its own run evaluated it), else fp32."""
    import torch

    from tbps.engine.loop import resolve_precision
    from tbps.methods.base import eval_dtype

    if torch.device(device).type != "cuda":
        return None
    return eval_dtype(resolve_precision(cfg), cfg.eval.precision)


def evaluate_model(method, cfg, tok, split: str = "test", batch_size: int = 256, device: str = "cpu", cmc: int = 0,
                   embeddings_path: str | None = None, ap: str = "standard", precision: str | None = None) -> dict:
    """``precision`` (``--precision``): eval.precision for this evaluation (None: the model's config's)."""
    from shards.readers import caption_rule_warning
    from tbps.data import build_eval_loader, load_manifest
    from tbps.eval import evaluate

    if precision:
        cfg.eval.precision = precision
    manifest = load_manifest(cfg.data.url)
    note = caption_rule_warning(cfg.method.name, manifest, cfg.data.url)
    if note:
        print(f"[tbps] warning: {note}", file=sys.stderr)
    loader = build_eval_loader(cfg.data, tok, split, batch_size, manifest=manifest)
    out = evaluate(method, loader, device, cfg.eval.query_chunk, autocast_dtype=evaluation_autocast(cfg, device),
                   cmc=cmc, embeddings_path=embeddings_path, ap=ap, dataset=str(manifest.get("dataset", "")))
    out["method"] = cfg.method.name
    return out


def evaluate_checkpoint(checkpoint: str, data_url: str | None = None, split: str = "test", batch_size: int = 256,
                        device: str = "cpu", cmc: int = 0, embeddings_path: str | None = None,
                        overrides: list[str] | None = None, ap: str = "standard", precision: str | None = None) -> dict:
    from tbps.checkpoint import load_method

    method, cfg, tok = load_method(checkpoint, data_url=data_url, device=device, overrides=overrides)
    return evaluate_model(method, cfg, tok, split, batch_size, device, cmc, embeddings_path, ap, precision)


def markdown_table(rows: dict[str, dict]) -> str:
    from tbps.eval.metrics import METRICS

    head = ["model", "method", *METRICS, "chance R1", "queries", "gallery"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        lines.append("| " + " | ".join([name, m.get("method", "")] +
                                       [f"{m[k]:.2f}" for k in (*METRICS, "chance_R1")] +
                                       [str(m.get("queries", "")), str(m.get("gallery", ""))]) + " |")
        if "ivt" in m:  # IVT's protocol (--ap trapezoid): no mINP or chance level
            v = m["ivt"]
            lines.append("| " + " | ".join([f"{name} (IVT protocol)", m.get("method", "")] +
                                           [f"{v[k]:.2f}" for k in ("R1", "R5", "R10", "mAP")] + ["", "",
                                           str(m.get("queries", "")), str(v["gallery"])]) + " |")
    return "\n".join(lines)


def plot_cmc(rows: dict[str, dict], path: str, title: str = "") -> None:
    """CMC curves (R@k against k) of every evaluated model, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in rows.items():
        curve = m["cmc"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o" if len(curve) <= 20 else None, markersize=3,
                label=f"{name} (R1 {m['R1']:.1f}, mAP {m['mAP']:.1f})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("R@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "CMC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _names(checkpoints: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(checkpoints):
            raise ValueError(f"--name given {len(names)} times for {len(checkpoints)} checkpoints")
        return names
    out = []
    for c in checkpoints:  # runs/<run>/best -> <run>/best, unique and readable
        parts = c.rstrip("/").split("/")
        name = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
        out.append(name if name not in out else c)
    return out


def _configured_weights(config: str, overrides: list[str], ap) -> list[str]:
    """The weight paths ``--config`` with its overrides names (none: a randomly initialised model)."""
    from tbps.config import ConfigError, load_config

    try:
        model = load_config(config, overrides).model
    except ConfigError as e:
        ap.error(str(e))
    return [p for p in (model.pretrained, model.image_pretrained, model.text_pretrained) if p]


def main(argv=None) -> int:
    from shards.cli import add_verbose, at_least, run_command
    from tbps.eval import format_table

    ap = argparse.ArgumentParser(prog="python -m tbps.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="checkpoint directory (local or s3://...; a tbps checkpoint or an IRRA output directory); "
                         "repeat to compare several")
    ap.add_argument("--config", help="evaluate a method built from this preset/YAML and its pretrained weights "
                                     "(model.pretrained=...), without training")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for --config (e.g. model.pretrained=PATH) or "
                                                  "for an official IVT checkpoint file (e.g. data.tokenizer=DIR)")
    ap.add_argument("--name", action="append", help="label per --checkpoint (default: its last path parts)")
    ap.add_argument("--data", action="append", default=[],
                    help="dataset URL (default: the one each checkpoint was trained on); repeat as LABEL=URL for a "
                         "cross-domain matrix of every model on every dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=at_least(1), default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                    help="what a GPU evaluates in (eval.precision; default: the model's config's, auto: as the official "
                         "code evaluates the model's train.precision -- IRRA's fp16 model in fp16, IVT in fp32 -- "
                         "and as its own run evaluated it); CPUs evaluate in fp32")
    ap.add_argument("--cmc", type=at_least(0), default=20, help="CMC curve up to this rank (default 20)")
    ap.add_argument("--out", help="write metrics.md, metrics.json and cmc.png here")
    ap.add_argument("--json", help="also write the metrics to this JSON file")
    ap.add_argument("--ap", choices=("standard", "trapezoid"), default="standard",
                    help="trapezoid: also report each model by IVT's protocol (trapezoid AP, gallery = every second "
                         "caption row's image, every row's on ICFG-PEDES), as a second row")
    ap.add_argument("--save-embeddings", action="store_true",
                    help="write <out>/embeddings.npz per model (gallery and query embeddings with paths, captions, ids)")
    add_verbose(ap)
    args = ap.parse_args(argv)
    if not args.checkpoint and not args.config:
        ap.error("give --checkpoint DIR (repeatable) or --config PRESET with model.pretrained=...")
    from tbps.checkpoint import is_model_file, load_method

    if args.overrides and not args.config and not all(is_model_file(c) for c in args.checkpoint):
        ap.error(f"key=value overrides ({args.overrides[0]}) go with --config or official IVT checkpoint files")
    if args.save_embeddings and not args.out:
        ap.error("--save-embeddings writes into --out DIR: give --out")
    if args.out:
        from tbps.extras import MissingExtraError, require

        try:
            require("matplotlib", "--out (its cmc.png)")
        except MissingExtraError as e:
            ap.error(str(e))
    try:
        names = _names(args.checkpoint, args.name[:len(args.checkpoint)] if args.name else None)
        datasets = parse_datasets(args.data)
    except ValueError as e:
        ap.error(str(e))
    if len(datasets) > 1 and (args.save_embeddings or args.ap != "standard"):
        ap.error("--save-embeddings and --ap trapezoid evaluate one dataset: give one --data")
    if args.config:
        weights = _configured_weights(args.config, args.overrides, ap)
        if not weights:
            print(f"[tbps] warning: --config {args.config} names no weights (model.pretrained, "
                  "model.image_pretrained, model.text_pretrained): evaluating a randomly initialised model, which "
                  "ranks at chance level", file=sys.stderr)
        label = args.name[len(args.checkpoint)] if args.name and len(args.name) > len(args.checkpoint) else \
            f"{args.config} ({'pretrained' if weights else 'random init'})"
        names.append(label)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # rows are keyed by name: a second model of one name replaced the first's row
        ap.error(f"two models are named {repeated[0]!r} (a repeated --name): give each its own --name")
    rows = {}

    def embeddings_path(i: int) -> str | None:
        if not args.save_embeddings:
            return None
        import os

        os.makedirs(args.out, exist_ok=True)
        return os.path.join(args.out, "embeddings.npz" if len(names) == 1 else f"embeddings-{i}.npz")

    if len(datasets) > 1:
        return _matrix_main(args, names, datasets)
    args.data = next(iter(datasets.values()), None)

    def evaluate_all() -> int:
        for i, (name, ckpt) in enumerate(zip(names, args.checkpoint)):
            rows[name] = evaluate_checkpoint(ckpt, args.data, args.split, args.batch_size, args.device, args.cmc,
                                             embeddings_path(i), None if args.config else args.overrides, args.ap,
                                             args.precision)
        if args.config:
            method, cfg, tok = load_method(config=args.config, overrides=args.overrides, data_url=args.data,
                                           device=args.device)
            rows[names[-1]] = evaluate_model(method, cfg, tok, args.split, args.batch_size, args.device, args.cmc,
                                             embeddings_path(len(names) - 1), args.ap, args.precision)
        return 0
    code = run_command("python -m tbps.evaluate", evaluate_all, args.verbose)
    if code:
        return code
    table = {}
    for name, m in rows.items():
        table[f"{name} ({args.split})"] = m
        if "ivt" in m:
            table[f"{name} (IVT protocol)"] = m["ivt"]
    print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if len(rows) > 1 else next(iter(rows.values())), f, indent=1)
    if args.out:
        import os

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.md"), "w") as f:
            f.write(f"# Retrieval on the {args.split} split\n\n{markdown_table(rows)}\n")
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(rows, f, indent=1)
        if args.cmc:
            plot_cmc(rows, os.path.join(args.out, "cmc.png"), f"CMC on the {args.split} split")
        print(f"\nwrote {args.out}/metrics.md, metrics.json" + (", cmc.png" if args.cmc else "") +
              (", embeddings*.npz" if args.save_embeddings else ""))
    return 0


def parse_datasets(values: list[str]) -> dict[str, str]:
    """--data values -> {label: URL}: one plain URL (label "data"), or LABEL=URL each (a matrix)."""
    out: dict[str, str] = {}
    for v in values:
        label, sep, url = v.partition("=")
        if not sep or "/" in label or ":" in label or not label:
            if len(values) > 1:
                raise ValueError(f"--data {v!r}: with several datasets give each as LABEL=URL (e.g. cuhk=s3://b/cuhk)")
            label, url = "data", v
        if label in out:
            raise ValueError(f"--data: the label {label!r} is given twice")
        out[label] = url
    return out


def evaluate_matrix(models: dict[str, tuple], datasets: dict[str, str], split: str = "test", batch_size: int = 256,
                    device: str = "cpu", cmc: int = 0, log=None, precision: str | None = None
                    ) -> dict[str, dict[str, dict]]:
    """``{model: {dataset: metrics}}``: each model (``(method, cfg, tokenizer)``, its own tokenizer and
    preprocessing) on each dataset's ``split``."""
    out: dict[str, dict[str, dict]] = {}
    for name, (method, cfg, tok) in models.items():
        out[name] = {}
        for label, url in datasets.items():
            cfg.data.url = url
            out[name][label] = evaluate_model(method, cfg, tok, split, batch_size, device, cmc, precision=precision)
            if log:
                m = out[name][label]
                log(f"[evaluate] {name} on {label}: R1 {m['R1']:.2f} mAP {m['mAP']:.2f}")
    return out


def matrix_markdown(matrix: dict[str, dict[str, dict]], split: str) -> str:
    from tbps.eval.metrics import METRICS

    datasets = list(next(iter(matrix.values())))
    parts = [f"# Cross-domain matrix ({split} split of each dataset)\n\nRows: models; columns: datasets.\n"]
    for k in METRICS:
        lines = [f"## {k}\n", "| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        lines += ["| " + " | ".join([name] + [f"{row[d][k]:.2f}" for d in datasets]) + " |"
                  for name, row in matrix.items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_matrix(matrix: dict[str, dict[str, dict]], path: str, metric: str = "R1") -> None:
    """A heatmap of ``metric``: models down, datasets across, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, datasets = list(matrix), list(next(iter(matrix.values())))
    values = np.array([[matrix[m][d][metric] for d in datasets] for m in models])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(datasets), 1.2 + 0.6 * len(models)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(100.0 if values.max() > 1 else 1.0, values.max()))
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("model")
    for i in range(len(models)):
        for j in range(len(datasets)):
            ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center",
                    color="white" if values[i, j] < 0.6 * im.norm.vmax else "black")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric}: cross-domain matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _matrix_main(args, names: list[str], datasets: dict[str, str]) -> int:
    import os

    from shards.cli import run_command
    from tbps.checkpoint import load_method
    from tbps.eval import format_table

    first = next(iter(datasets.values()))
    matrix: dict = {}

    def evaluate_all() -> int:
        models = {}
        for name, ckpt in zip(names, args.checkpoint):
            models[name] = load_method(ckpt, data_url=first, device=args.device,
                                       overrides=None if args.config else args.overrides)
        if args.config:
            models[names[-1]] = load_method(config=args.config, overrides=args.overrides, data_url=first,
                                            device=args.device)
        matrix.update(evaluate_matrix(models, datasets, args.split, args.batch_size, args.device, args.cmc,
                                      log=lambda m: print(m, file=sys.stderr), precision=args.precision))
        return 0
    code = run_command("python -m tbps.evaluate", evaluate_all, args.verbose)
    if code:
        return code
    print(format_table({f"{name} on {label}": m for name, row in matrix.items() for label, m in row.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(matrix, f, indent=1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "matrix.json"), "w") as f:
            json.dump(matrix, f, indent=1)
        with open(os.path.join(args.out, "matrix.md"), "w") as f:
            f.write(matrix_markdown(matrix, args.split))
        plot_matrix(matrix, os.path.join(args.out, "matrix.png"))
        print(f"\nwrote {args.out}/matrix.json, matrix.md, matrix.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
