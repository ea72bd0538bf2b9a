"""Alignment methods, one file each, registered by name. ``create_method(cfg, text_spec, num_classes)`` builds one and
loads its configured weights (``tbps.methods.pretrained``); ``build_method`` builds it with fresh weights."""

from .base import METHODS, Method, TextSpec, build_method
from . import clip, irra, ivt, pcc  # noqa: E402,F401  (register every method)
from .pretrained import create_method, read_pretrained  # noqa: E402

__all__ = ["METHODS", "Method", "TextSpec", "build_method", "create_method", "read_pretrained"]
