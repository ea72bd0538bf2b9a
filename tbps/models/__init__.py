"""Encoders only: timm image towers, transformers text towers, IVT's shared tower, weight loading (no hub)."""

from .image import ImageTower
from .shared import SharedTower, bmm_keep
from .text import TextTower
from .weights import WeightLoadError, load_into, read_state_dict

__all__ = ["ImageTower", "SharedTower", "TextTower", "WeightLoadError", "bmm_keep", "load_into", "read_state_dict"]
