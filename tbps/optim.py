"""Optimizer and per-iteration schedule, built from config; parameter groups come from the method."""

from __future__ import annotations

import math

import torch

from tbps.config import ConfigError


def build_optimizer(method, optim) -> torch.optim.Optimizer:
    groups = method.param_groups(optim)
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    raise ConfigError(f"optim.name: unknown optimizer {optim.name!r}; valid: adam, adamw, sgd")


def lr_factor(step: int, total_steps: int, warmup_steps: int, start_factor: float, min_factor: float) -> float:
    """Linear warm-up from ``start_factor`` to 1 over ``warmup_steps``, then cosine down to ``min_factor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1 - start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, optim, steps_per_epoch: int, epochs: int):
    """Stepped every optimizer step. ``optim.schedule_per: epoch`` holds the factor of the epoch's index for the whole
    epoch, as IRRA's and IVT's per-epoch schedulers do (epoch e of E: warm-up factor start + (1 - start) e / W, then
    cosine over (e - W) / (E - W))."""
    min_factor = optim.min_lr / optim.lr if optim.lr > 0 else 0.0
    start = optim.warmup_start_factor
    if optim.schedule_per == "epoch":
        spe = max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s // spe, epochs, optim.warmup_epochs, start, min_factor))
    if optim.schedule_per != "iteration":
        raise ConfigError(f"optim.schedule_per must be iteration or epoch, got {optim.schedule_per!r}")
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, start, min_factor))
