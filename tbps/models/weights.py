"""Loading pretrained weights from a local file/directory or an s3:// URL — never from a model hub."""

from __future__ import annotations

import os

import torch
from torch import nn

from shards.storage import local_copy

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth", "model.pt")


class WeightLoadError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message lists the offending keys."""

    is_user_error = True  # shards.cli: one message and exit code 2, no traceback


def read_state_dict(url: str, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors / .bin / .pth (``weights_only``), a directory holding one, or a URL."""
    try:
        path = local_copy(url)
    except FileNotFoundError:
        raise WeightLoadError(f"{what}: checkpoint not found at {url}") from None
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
        if not found:
            raise WeightLoadError(f"{what}: no weight file ({', '.join(WEIGHT_FILES)}) in {url}")
        path = found[0]
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a checkpoint
        raise WeightLoadError(f"{what}: cannot read checkpoint {url}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightLoadError(f"{what}: {url} does not hold a state dict of tensors")
    return sd


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, what: str = "weights",
              allow_missing: tuple[str, ...] = ()) -> None:
    """Strict load with a readable error: shape mismatches, missing and unexpected keys are all listed."""
    own = module.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    if shapes or missing or unexpected:
        def show(keys):
            return ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {show(shapes)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise WeightLoadError(f"{what}: checkpoint {source} does not fit the model; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=not allow_missing)
