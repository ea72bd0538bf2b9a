"""Optimizer and per-iteration schedule, built from config; parameter groups come from the method."""

from __future__ import annotations

import math

import torch

from tbps.config import ConfigError


def build_optimizer(method, optim, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer over ``method.param_groups``; ``fused``: torch's single-kernel implementation (the worker asks
    for it on GPUs: one kernel per step instead of one per parameter group and operation)."""
    groups = method.param_groups(optim)
    extra = {"fused": True} if fused else {}
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **extra)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **extra)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, **extra)
    raise ConfigError(f"optim.name: unknown optimizer {optim.name!r}; valid: adam, adamw, sgd")


def lr_factor(step: int, total_steps: int, warmup_steps: int, start_factor: float, min_factor: float) -> float:
    """Linear warm-up from ``start_factor`` to 1 over ``warmup_steps``, then cosine down to ``min_factor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1 - start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def timm_cosine_lr(t: float, group_lr: float, base_lr: float, epochs: int, warmup_epochs: float,
                   start_factor: float, min_lr: float) -> float:
    """timm's ``CosineLRScheduler`` as IVT configures it (solver/scheduler_factory.py: t_initial = epochs, cycle_limit
    1, warmup_prefix off) at time ``t`` in epochs. The warm-up start (base_lr x start_factor) and the floor (min_lr)
    are absolute, the same for every group; a group's own lr (e.g. biases at 2x) is the peak."""
    start = base_lr * start_factor
    if t < warmup_epochs:
        return start + t * (group_lr - start) / warmup_epochs
    if t >= epochs:  # the cycle is over
        return min_lr
    return min_lr + 0.5 * (group_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def build_scheduler(optimizer, optim, steps_per_epoch: int, epochs: int):
    """Stepped every optimizer step. ``optim.schedule_per: epoch`` holds the lr of the epoch's index for the whole
    epoch, as IRRA's and IVT's per-epoch schedulers do. ``optim.scheduler``: ``cosine`` (IRRA: epoch e of E at warm-up
    factor start + (1 - start) e / W, then cosine over (e - W) / (E - W)) or ``timm_cosine`` (``timm_cosine_lr``)."""
    min_factor = optim.min_lr / optim.lr if optim.lr > 0 else 0.0
    start = optim.warmup_start_factor
    spe = max(1, steps_per_epoch)
    if optim.schedule_per not in ("iteration", "epoch"):
        raise ConfigError(f"optim.schedule_per must be iteration or epoch, got {optim.schedule_per!r}")
    if optim.scheduler == "timm_cosine":
        # IVT's loop calls scheduler.step(epoch) with epoch = 1, 2, ...: epoch e (0-based here) runs at t = e + 1
        def at(step: int) -> float:
            return (step // spe if optim.schedule_per == "epoch" else step / spe) + 1

        def factor(group_lr):
            return lambda s: timm_cosine_lr(at(s), group_lr, optim.lr, epochs, optim.warmup_epochs, start,
                                            optim.min_lr) / group_lr if group_lr > 0 else 0.0
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])
    if optim.scheduler != "cosine":
        raise ConfigError(f"optim.scheduler must be cosine or timm_cosine, got {optim.scheduler!r}")
    if optim.schedule_per == "epoch":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s // spe, epochs, optim.warmup_epochs, start, min_factor))
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, start, min_factor))
