"""The batch keys, documented once. A training batch (``TrainLoader``, ``ShardStream._collate``) is what
``Method.features`` reads; an evaluation batch (``EvalStream``) is what ``tbps.retrieval.embed`` reads. Tensors are
on the CPU as the loader yields them; the engine moves them to the device."""

from __future__ import annotations

from typing import TypedDict

import torch


class TrainBatch(TypedDict, total=False):
    """B (image, caption) pairs of one rank and step."""

    images: torch.Tensor  # float [B, 3, H, W] normalised; [B, V, 3, H, W] with V augmented views (IVT: V = 3)
    text_ids: torch.Tensor  # long [B, L] token ids of the caption ([CLS]/[SEP] or <|startoftext|>/<|endoftext|> included)
    text_mask: torch.Tensor  # long [B, L] 1 = real token, 0 = padding
    pids: torch.Tensor  # long [B] person ids (as in the raw dataset): positives of the contrastive losses
    train_ids: torch.Tensor  # long [B] 0..num_train_ids-1: the ID classifier's targets (-1 outside train)
    keys: list[str]  # the samples' keys in their shards
    caption_index: list[int]  # which caption of the image (with ``keys``: which pair)
    shards: list[str]  # the shard each sample came from (placement records, debugging)
    # DataNeeds.mlm_ratio > 0 (IRRA): the masked caption and its targets (-100 = not masked)
    mlm_ids: torch.Tensor  # long [B, L]
    mlm_labels: torch.Tensor  # long [B, L]
    mlm_rows: int  # at least the number of masked tokens: the rows the MLM head computes (tbps.data.text.mlm_rows)
    # DataNeeds.mla (IVT): the caption at three levels, sentence / phrase / word
    mla_ids: torch.Tensor  # long [B, 3, L]
    mla_mask: torch.Tensor  # long [B, 3, L]
    mla_length: int  # the longest real length over the levels (padding beyond it can be cut without a sync)
    # loader bookkeeping, removed or ignored before the model sees the batch
    worker: int  # the loader worker that built it (TrainLoader's round-robin)
    skipped_shards: list[str]  # bad shards skipped since the previous batch (data.on_bad_shard=skip)


class EvalBatch(TypedDict, total=False):
    """Gallery images of one split, each once, with their captions flattened into queries."""

    images: torch.Tensor  # float [N, 3, H, W] normalised, no augmentation
    image_pids: torch.Tensor  # long [N]
    image_index: torch.Tensor  # long [N] position in the split: the tie-break order of ranking
    image_path: list[str]  # the raw annotation's relative path (the sample key when it has none)
    image_key: list[str]  # the sample's key in its shard
    image_shard: list[str]  # the shard's file name (to fetch the original bytes again)
    text_ids: torch.Tensor  # long [Q, L] every caption of the N images
    text_mask: torch.Tensor  # long [Q, L]
    text_pids: torch.Tensor  # long [Q]
    text_index: torch.Tensor  # long [Q] unique per caption, in split order
    text_image: torch.Tensor  # long [Q] the image_index of each caption's image
    captions: list[str]  # the raw caption strings
    skipped_shards: list[str]  # a marker item alone: a shard skipped with data.on_bad_shard=skip
