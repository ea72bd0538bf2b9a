"""Alignment methods, one file each, registered by name. ``build_method(cfg, text_spec, num_classes)``."""

from .base import METHODS, Method, TextSpec, build_method
from . import clip, irra, ivt, pcc  # noqa: E402,F401  (register every method)

__all__ = ["METHODS", "Method", "TextSpec", "build_method"]
