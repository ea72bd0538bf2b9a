"""Evaluate a saved checkpoint on a split and print R1/R5/R10/mAP/mINP.

    python -m tbps.evaluate --checkpoint runs/irra/best --data s3://bucket/cuhk-pedes --split test

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
    cfg.model.image_pretrained = cfg.model.text_pretrained = ""  # the checkpoint holds every weight
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), meta["num_classes"])
    method.load_state_dict(load_model_state(checkpoint))
    return method.to(device).eval(), cfg, tok


def evaluate_checkpoint(checkpoint: str, data_url: str | None = None, split: str = "test", batch_size: int = 256,
                        device: str = "cpu") -> dict:
    from tbps.data import build_eval_loader
    from tbps.eval import evaluate

    method, cfg, tok = load_checkpoint_model(checkpoint, data_url, device)
    loader = build_eval_loader(cfg.data, tok, split, batch_size)
    return evaluate(method, loader, device, cfg.eval.query_chunk)


def main(argv=None) -> int:
    from tbps.eval import format_table

    ap = argparse.ArgumentParser(prog="python -m tbps.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://...)")
    ap.add_argument("--data", help="dataset URL (default: the one the checkpoint was trained on)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the metrics to this JSON file")
    args = ap.parse_args(argv)
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table({args.split: metrics}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
