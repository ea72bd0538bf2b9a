"""Image transforms: resize to the configured (height, width), flip, pad + random crop, normalise, random erasing.
Evaluation uses resize + normalise only.

Two implementations of the same operations:
- ``build_transform``: torchvision on one PIL image at a time (the public TBPS repos' way; the reference that
  ``bench/data.py`` compares against and the tests check ``BatchAugment`` with).
- ``BatchAugment``: what the pipeline uses. Each image is decoded and resized once to uint8 (``resize_uint8``); flip,
  pad + crop, normalisation and erasing then run as tensor ops on the whole batch in the loader worker, which costs
  a fraction of per-image PIL + ToTensor + Normalize.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def _size(cfg) -> tuple[int, int]:
    size = tuple(cfg.image_size)
    if len(size) != 2:
        raise ValueError(f"data.image_size must be [height, width], got {cfg.image_size}")
    return size


def resize_mode(cfg, train: bool) -> str:
    """The resize interpolation of training images (``data.interpolation``) or of evaluation images
    (``data.eval_interpolation``, null = the training one). IVT's loaders resize training crops bicubically
    (``T.Resize(SIZE_TRAIN, interpolation=3)``) and val/test images with ``T.Resize(SIZE_TEST)``: bilinear."""
    return cfg.interpolation if train or cfg.eval_interpolation is None else cfg.eval_interpolation


def build_transform(cfg, train: bool):
    size = _size(cfg)
    steps = [T.Resize(size, interpolation=T.InterpolationMode(resize_mode(cfg, train)))]
    if train:
        if cfg.flip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.flip))
        if cfg.pad > 0:
            steps += [T.Pad(cfg.pad), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if train and cfg.random_erasing > 0:
        steps.append(T.RandomErasing(cfg.random_erasing, scale=tuple(cfg.erasing_scale),
                                     value="random" if cfg.erasing_mode == "pixel" else list(cfg.erasing_value)))
    return T.Compose(steps)


RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_uint8(img: Image.Image, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """RGB image -> uint8 [H, W, 3] at (height, width) = size (bicubic or bilinear with antialiasing, as T.Resize on
    PIL)."""
    h, w = size
    if interpolation not in RESAMPLE:
        raise ValueError(f"data.interpolation must be one of {', '.join(RESAMPLE)}, got {interpolation!r}")
    if img.size != (w, h):
        img = img.resize((w, h), RESAMPLE[interpolation])
    return np.asarray(img, dtype=np.uint8)


class BatchAugment:
    """``build_transform``'s operations on a batch ``uint8 [B, H, W, 3]`` (already resized) -> ``float [B, 3, H, W]``."""

    def __init__(self, cfg, train: bool):
        self.size = _size(cfg)
        self.train = train
        self.flip, self.pad = (cfg.flip, cfg.pad) if train else (0.0, 0)
        self.erasing = cfg.random_erasing if train else 0.0
        self.scale = tuple(cfg.erasing_scale)
        if cfg.erasing_mode not in ("constant", "pixel"):
            raise ValueError(f"data.erasing_mode must be constant or pixel, got {cfg.erasing_mode!r}")
        self.pixel = cfg.erasing_mode == "pixel"
        self.fill = torch.tensor(cfg.erasing_value, dtype=torch.float32).view(3, 1, 1)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        # channels first while still uint8 (a 1-byte copy), so every float operation below runs on contiguous
        # memory: on 384x128 crops the strided float arithmetic was most of the cost (docs/benchmarks.md)
        x = images.permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]
        B, H, W = len(x), *self.size
        if self.flip > 0:
            flip = (torch.rand(B, generator=gen) < self.flip).nonzero().flatten()
            if len(flip):
                x[flip] = x[flip].flip(-1)
        if self.pad > 0:  # pad with black, then a random (H, W) window per image
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            ii = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
            jj = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
            x = torch.stack([padded[b, :, i:i + H, j:j + W] for b, (i, j) in enumerate(zip(ii, jj))])
        out = x.float().sub_(self.mean).div_(self.std)
        if self.erasing > 0:
            for b in (torch.rand(B, generator=gen) < self.erasing).nonzero().flatten().tolist():
                self._erase(out[b], gen)
        return out.contiguous()

    def _erase(self, img: torch.Tensor, gen) -> None:
        """torchvision RandomErasing: a box of area ~ U(scale) and aspect ~ logU(0.3, 3.3), 10 tries, filled with
        ``data.erasing_value`` or, ``erasing_mode: pixel``, per-pixel N(0, 1) noise (timm's mode 'pixel', IVT)."""
        _, H, W = img.shape
        area = H * W
        lo, hi = math.log(0.3), math.log(1 / 0.3)
        for _ in range(10):
            u = torch.rand(2, generator=gen).tolist()
            erase = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ratio = math.exp(lo + (hi - lo) * u[1])
            h, w = int(round(math.sqrt(erase * ratio))), int(round(math.sqrt(erase / ratio)))
            if h < H and w < W:
                i = int(torch.randint(0, H - h + 1, (1,), generator=gen))
                j = int(torch.randint(0, W - w + 1, (1,), generator=gen))
                img[:, i:i + h, j:j + w] = torch.randn((3, h, w), generator=gen) if self.pixel else self.fill
                return
