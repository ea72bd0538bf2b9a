"""Image towers from timm: any timm ViT, at the person-crop input size, with a configurable patch stride."""

from __future__ import annotations

import sys

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .weights import WeightLoadError, load_into, read_state_dict


class ImageTower(nn.Module):
    """A timm ViT returning all tokens ``[B, prefix + N, width]`` (CLS first)."""

    def __init__(self, name: str, image_size: tuple[int, int], patch_stride: int = 0, drop_path: float = 0.0,
                 overrides: dict | None = None):
        super().__init__()
        try:
            self.vit = timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                                         img_size=tuple(image_size), drop_path_rate=drop_path, **(overrides or {}))
        except RuntimeError as e:
            raise ValueError(f"model.image_tower {name!r}: {e}") from None
        patch = self.vit.patch_embed.patch_size[0]
        if patch_stride and patch_stride != patch:
            set_patch_stride(self.vit, patch_stride, image_size)
        self.width = self.vit.num_features
        self.num_prefix_tokens = self.vit.num_prefix_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)

    def load_pretrained(self, url: str) -> None:
        """Load timm or foreign (e.g. OpenAI CLIP) weights: the model module's ``checkpoint_filter_fn`` converts keys
        and resizes position embeddings to this tower's grid (e.g. 14x14 -> 24x8)."""
        sd = read_state_dict(url, "model.image_pretrained")
        if "visual.proj" in sd and "text_projection" in sd:
            raise WeightLoadError(f"model.image_pretrained: {url} is a whole CLIP checkpoint; give it as "
                                  "model.pretrained (both towers and CLIP's projections, QuickGELU, IRRA's grid resize)")
        filter_fn = getattr(sys.modules[type(self.vit).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, self.vit)
        load_into(self.vit, sd, url, "model.image_pretrained")


def set_patch_stride(vit: nn.Module, stride: int, image_size: tuple[int, int]) -> None:
    """Overlapping patches (IVT uses stride 12 with 16x16 patches): new conv stride, grid and position embeddings."""
    pe = vit.patch_embed
    patch = pe.patch_size[0]
    grid = ((image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1)
    old = list(pe.grid_size)
    pe.proj.stride = (stride, stride)
    pe.grid_size = grid
    pe.num_patches = grid[0] * grid[1]
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    vit.pos_embed = nn.Parameter(resample_abs_pos_embed(vit.pos_embed.data, new_size=list(grid),
                                                        old_size=old, num_prefix_tokens=prefix))
