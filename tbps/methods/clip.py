"""CLIP-style baseline: two towers, global features (CLS / end-of-text), symmetric InfoNCE (ITC)."""

from __future__ import annotations

from .base import register
from .towers import TwoTower


@register("clip")
class CLIP(TwoTower):
    """Everything is the two-tower base: ITC / SDM over the global features, an optional ID loss."""

    def __init__(self, config, model, image_size, text, num_classes):
        super().__init__(config, model, image_size, text, num_classes)
        self.add_classifier(std=0.001)
