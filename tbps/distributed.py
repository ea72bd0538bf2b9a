"""Global negatives: gather features (with gradient) from every rank, open_clip style.

Each rank scores its *local* rows against the *gathered* columns; ``all_gather`` with autograd returns every
rank's gradient contribution to its owner, so summed over ranks this is the loss of the whole global batch.
Uses torch.distributed only (no Ray/DeepSpeed): a no-op when not initialised or world size 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably (all ranks must pass the same shape)."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def row_offset(n_local: int) -> int:
    """Index of this rank's first row in the gathered tensor (equal local sizes)."""
    return world()[0] * n_local
