"""Retrieval metrics and the evaluation pass. Imports no Ray, DeepSpeed or argparse."""

from .ranking import embed, evaluate, format_table
from .metrics import chance_level, retrieval_metrics

__all__ = ["chance_level", "embed", "evaluate", "format_table", "retrieval_metrics"]
