"""Streaming data pipeline and text side. Imports no Ray, DeepSpeed or argparse; the pipeline (webdataset) is
imported on first use of its names, so methods and models import without it (a GPU box with torch alone)."""

from .batch import EvalBatch, TrainBatch
from .needs import DataNeeds
from .text import build_tokenizer, load_tokenizer, mask_tokens, mla_texts

_STREAM = ("EvalStream", "ShardStream", "TrainLoader", "assign_shards", "batches_per_epoch", "build_eval_loader",
           "build_train_loader", "load_manifest", "split_captions")

__all__ = ["DataNeeds", "EvalBatch", "TrainBatch", *_STREAM, "build_tokenizer", "load_tokenizer", "mask_tokens", "mla_texts"]


def __getattr__(name):
    if name in _STREAM:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
