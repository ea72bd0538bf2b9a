"""The embedded demo's data: a ToyPEDES demo set (+ tokenizer) generated once into a local cache.

``python -m tbps.train`` with no arguments uses it; ``python -m tbps.demo`` only prepares and summarises it.
"""

from __future__ import annotations

import os
import sys

from shards.build import summarize


def demo_dataset(size: str = "demo", seed: int = 0) -> str:
    """Path of the cached ToyPEDES demo shards (+ tokenizer), generated on first use."""
    from shards.synth import generate
    from tbps.data import build_tokenizer, split_captions

    cache = os.path.expanduser(os.environ.get("TBPS_CACHE", "~/.cache/tbps"))
    out = os.path.join(cache, f"toypedes-{size}-seed{seed}")
    manifest_path = os.path.join(out, "manifest.json")
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.exists(manifest_path):
        print(f"[demo] generating ToyPEDES ({size}) into {out}", file=sys.stderr)
        generate(out=out, size=size, seed=seed, workers=min(4, os.cpu_count() or 1))
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        build_tokenizer(split_captions(out, "train"), tok_dir)
    return out


def main(argv=None) -> int:
    from tbps.data import load_manifest

    url = demo_dataset()
    print(summarize(load_manifest(url)))
    print(f"dataset: {url}\ntokenizer: {os.path.join(url, 'tokenizer')}")
    print("train on it with: python -m tbps.train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
