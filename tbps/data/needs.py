"""What a method asks of the data pipeline (kept apart from the pipeline so methods import without webdataset)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataNeeds:
    """What a method asks of the pipeline beyond one image and one tokenised caption."""

    views: int = 1  # augmented views per image (IVT: 3)
    mlm_ratio: float = 0.0  # > 0: add BERT-style masked captions (IRRA's IRR)
    mla: bool = False  # IVT: sentence / phrase / word texts per caption (word: the caption's attribute phrases)
