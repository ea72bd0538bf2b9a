"""Activation checkpointing (``train.activation_checkpointing``): blocks keep only their inputs in the forward and
recompute their activations in the backward, trading compute for activation memory.

timm towers use their own ``set_grad_checkpointing``, transformers towers ``gradient_checkpointing_enable``; our own
block stacks (IVT's shared tower, IRRA's cross-modal encoder, PCC's part decoder) subclass ``BlockStack`` and run
each block through :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, random state replayed, so dropout and
drop path draw the same masks in the recomputation)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class BlockStack(nn.Module):
    """A module whose blocks can run checkpointed: call ``self.run_block(block, *args)`` in the forward."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def set_activation_checkpointing(root: nn.Module, enable: bool = True) -> list[str]:
    """Switch checkpointing on (or off) in every tower and block stack under ``root``; returns what was switched."""
    from transformers import PreTrainedModel

    done = []
    for name, m in root.named_modules():
        if isinstance(m, PreTrainedModel):
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2 (the older name is deprecated)
                on, off, key = m.activation_checkpointing_enable, m.activation_checkpointing_disable, \
                    "activation_checkpointing_kwargs"
            else:
                on, off, key = m.gradient_checkpointing_enable, m.gradient_checkpointing_disable, \
                    "gradient_checkpointing_kwargs"
            if enable:
                on(**{key: {"use_reentrant": False}})
            else:
                off()
        elif hasattr(m, "set_grad_checkpointing"):  # timm models and our BlockStacks
            m.set_grad_checkpointing(enable)
        else:
            continue
        done.append(name or type(m).__name__)
    return done
