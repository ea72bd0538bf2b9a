"""Image transforms: resize to the configured (height, width), flip, pad + random crop, normalise, random erasing.
Evaluation uses resize + normalise only.

Two implementations of the same operations:
- ``build_transform``: torchvision on one PIL image at a time (the public TBPS repos' way; the reference that
  ``bench/data.py`` compares against and the tests check ``BatchAugment`` with).
- ``BatchAugment``: what the pipeline uses. Each image is decoded and resized once to uint8 (``resize_uint8``); flip,
  pad + crop, normalisation and erasing then run as tensor ops in the loader worker, written straight into the
  float batch (in shared memory in a loader process, see ``batch_tensor``), which costs a fraction of per-image
  PIL + ToTensor + Normalize.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
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


def erasing_ratio(mode: str) -> tuple[float, float]:
    """The aspect ratios (h / w) an erased box is drawn from, log-uniformly, by the library each ``data.erasing_mode``
    follows: ``constant``, torchvision's ``RandomErasing`` default (0.3, 3.3), IRRA's; ``pixel``, timm's
    ``RandomErasing(min_aspect=0.3)``, (0.3, 1 / 0.3), IVT's."""
    return (0.3, 1 / 0.3) if mode == "pixel" else (0.3, 3.3)


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
                                     ratio=erasing_ratio(cfg.erasing_mode),
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


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor for a batch. In a DataLoader worker process it is made in shared memory, as torch's
    ``default_collate`` makes its batches: a tensor in ordinary memory is copied into shared memory when the worker
    hands it to the training process (38 MB per batch of 64 at 384x128)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class BatchAugment:
    """``build_transform``'s operations on a batch of resized images, ``uint8 [B, H, W, 3]`` -> ``float [B, 3, H, W]``:
    the numbers of torchvision's per-image transforms (tests/test_data.py)."""

    def __init__(self, cfg, train: bool):
        self.size = _size(cfg)
        self.train = train
        self.flip, self.pad = (cfg.flip, cfg.pad) if train else (0.0, 0)
        self.erasing = cfg.random_erasing if train else 0.0
        self.scale = tuple(cfg.erasing_scale)
        if cfg.erasing_mode not in ("constant", "pixel"):
            raise ValueError(f"data.erasing_mode must be constant or pixel, got {cfg.erasing_mode!r}")
        self.pixel = cfg.erasing_mode == "pixel"
        self.ratio = erasing_ratio(cfg.erasing_mode)
        self.fill = torch.tensor(cfg.erasing_value, dtype=torch.float32).view(3, 1, 1)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1) * 255.0  # per image, on uint8 values
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.black = (torch.zeros(3, 1, 1) - self.mean) / self.std  # the padding, normalised

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a float ``[B, 3, H, W]`` tensor (or view) to write into, e.g. one view of a multi-view batch made
        with :func:`batch_tensor`; a new one by default."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        B, H, W = len(images), *self.size
        if tuple(images.shape[1:3]) != (H, W):
            raise ValueError(f"expected images of {H}x{W} (data.image_size), got {tuple(images.shape[1:3])}")
        if out is None:
            out = batch_tensor((B, 3, H, W))
        elif out.dtype != torch.float32 or tuple(out.shape) != (B, 3, H, W):
            raise ValueError(f"out must be float32 {(B, 3, H, W)}, got {out.dtype} {tuple(out.shape)}")
        # the random draws, in this order: flips, crop rows, crop columns, erasing, each erased box
        flips = (torch.rand(B, generator=gen) < self.flip).tolist() if self.flip > 0 else [False] * B
        p = self.pad
        if p > 0:  # pad with black, then a random (H, W) window per image: its row k is source row k + rows[b] - p
            rows = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
            cols = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
        else:
            rows = cols = [0] * B
        # One image at a time, so each image's float pixels stay in the CPU cache between the subtraction and the
        # division: on the whole batch (38 MB at 384x128) every operation was a pass through memory
        # (docs/benchmarks.md). The numbers are those of (float(x) - 255 mean) / (255 std) on the padded batch.
        for b in range(B):
            src = images[b].flip(1) if flips[b] else images[b]
            src = src.permute(2, 0, 1)  # [3, H, W], strided
            o = out[b]
            r, c = rows[b] - p, cols[b] - p  # the window's origin in source coordinates
            top, bottom, left, right = max(0, -r), min(H, H - r), max(0, -c), min(W, W - c)
            if top > 0:
                o[:, :top] = self.black
            if bottom < H:
                o[:, bottom:] = self.black
            if left > 0:
                o[:, top:bottom, :left] = self.black
            if right < W:
                o[:, top:bottom, right:] = self.black
            inner = o[:, top:bottom, left:right]
            torch.sub(src[:, top + r:bottom + r, left + c:right + c], self.mean, out=inner)
            inner.div_(self.std)
        if self.erasing > 0:
            for b in (torch.rand(B, generator=gen) < self.erasing).nonzero().flatten().tolist():
                self._erase(out[b], gen)
        return out

    def _erase(self, img: torch.Tensor, gen) -> None:
        """torchvision's RandomErasing (IRRA): a box of area ~ U(scale) and aspect ~ logU(0.3, 3.3), 10 tries, filled
        with ``data.erasing_value``; or, ``erasing_mode: pixel``, timm's (IVT): aspect ~ logU(0.3, 1 / 0.3), filled
        with per-pixel N(0, 1) noise."""
        _, H, W = img.shape
        area = H * W
        lo, hi = (math.log(r) for r in self.ratio)
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
