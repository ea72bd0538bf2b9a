"""tbps: distributed training for text-based person search (text -> image person retrieval)."""

__version__ = "0.1.0"
