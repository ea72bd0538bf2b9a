"""Image transforms (torchvision): resize to the configured (height, width), flip, pad + random crop, normalise,
random erasing. Evaluation uses resize + normalise only."""

from __future__ import annotations

from torchvision import transforms as T


def build_transform(cfg, train: bool):
    size = tuple(cfg.image_size)
    if len(size) != 2:
        raise ValueError(f"data.image_size must be [height, width], got {cfg.image_size}")
    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        if cfg.flip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.flip))
        if cfg.pad > 0:
            steps += [T.Pad(cfg.pad), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if train and cfg.random_erasing > 0:
        steps.append(T.RandomErasing(cfg.random_erasing, scale=tuple(cfg.erasing_scale), value=0))
    return T.Compose(steps)
