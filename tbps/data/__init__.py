"""Streaming data pipeline and text side. Imports no Ray, DeepSpeed or argparse."""

from .stream import (DataNeeds, EvalStream, ShardStream, TrainLoader, assign_shards, batches_per_epoch,
                     build_eval_loader, build_train_loader, load_manifest)
from .text import build_tokenizer, load_tokenizer, mask_tokens, mla_texts

__all__ = ["DataNeeds", "EvalStream", "ShardStream", "TrainLoader", "assign_shards", "batches_per_epoch",
           "build_eval_loader", "build_train_loader", "load_manifest", "build_tokenizer", "load_tokenizer",
           "mask_tokens", "mla_texts"]
