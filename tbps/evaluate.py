"""Evaluate a saved checkpoint on a split and print R1/R5/R10/mAP/mINP.

    python -m tbps.evaluate --checkpoint runs/irra/best --data s3://bucket/cuhk-pedes --split test
    python -m tbps.evaluate --checkpoint runs/irra/best --checkpoint runs/pcc/best --out reports/cmp   # compare

With --out it writes metrics.md (one row per checkpoint), metrics.json and cmc.png (R@k against k, one curve each).

A checkpoint directory is any of a run's ``best/`` or Ray ``checkpoint_*`` directories (model.pt + config.yaml +
meta.json), local or on object storage.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def load_checkpoint_model(checkpoint: str, data_url: str | None = None, device: str = "cpu"):
    """(method, cfg, tokenizer) rebuilt from a checkpoint directory."""
    from shards.storage import join
    from tbps.config import Config, from_dict
    from tbps.data import load_tokenizer
    from tbps.engine.checkpoint import load_model_state, read_text
    from tbps.methods import TextSpec, build_method

    try:
        cfg = from_dict(Config, yaml.safe_load(read_text(join(checkpoint, "config.yaml"))))
        meta = json.loads(read_text(join(checkpoint, "meta.json")))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{checkpoint} is not a tbps checkpoint (config.yaml/meta.json missing): {e}") from None
    if data_url:
        cfg.data.url = data_url
    tok = load_tokenizer(cfg.data.tokenizer)
    # the checkpoint holds every weight (cfg.model is already fitted to model.pretrained): nothing else is read
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), meta["num_classes"])
    method.load_state_dict(load_model_state(checkpoint))
    return method.to(device).eval(), cfg, tok


def evaluate_checkpoint(checkpoint: str, data_url: str | None = None, split: str = "test", batch_size: int = 256,
                        device: str = "cpu", cmc: int = 0) -> dict:
    from tbps.data import build_eval_loader
    from tbps.eval import evaluate

    method, cfg, tok = load_checkpoint_model(checkpoint, data_url, device)
    loader = build_eval_loader(cfg.data, tok, split, batch_size)
    out = evaluate(method, loader, device, cfg.eval.query_chunk, cmc=cmc)
    out["method"] = cfg.method.name
    return out


def markdown_table(rows: dict[str, dict]) -> str:
    head = ["model", "method", "R1", "R5", "R10", "mAP", "mINP", "chance R1", "queries", "gallery"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        lines.append("| " + " | ".join([name, m.get("method", "")] +
                                       [f"{m[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "mINP", "chance_R1")] +
                                       [str(m.get("queries", "")), str(m.get("gallery", ""))]) + " |")
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


def main(argv=None) -> int:
    from tbps.eval import format_table

    ap = argparse.ArgumentParser(prog="python -m tbps.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="checkpoint directory (local or s3://...); repeat to compare several")
    ap.add_argument("--name", action="append", help="label per --checkpoint (default: its last path parts)")
    ap.add_argument("--data", help="dataset URL (default: the one each checkpoint was trained on)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cmc", type=int, default=20, help="CMC curve up to this rank (default 20)")
    ap.add_argument("--out", help="write metrics.md, metrics.json and cmc.png here")
    ap.add_argument("--json", help="also write the metrics to this JSON file")
    args = ap.parse_args(argv)
    rows = {}
    try:
        for name, ckpt in zip(_names(args.checkpoint, args.name), args.checkpoint):
            rows[name] = evaluate_checkpoint(ckpt, args.data, args.split, args.batch_size, args.device, args.cmc)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table({f"{name} ({args.split})": m for name, m in rows.items()}))
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
        print(f"\nwrote {args.out}/metrics.md, metrics.json" + (", cmc.png" if args.cmc else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
