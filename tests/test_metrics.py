"""retrieval_metrics against a hand-computed example with ties and several correct images per query."""

from __future__ import annotations

import pytest
import torch

from tbps.eval import chance_level, retrieval_metrics

# 3 queries x 5 gallery images. Gallery pids: [1, 2, 1, 3, 1]
GALLERY = torch.tensor([1, 2, 1, 3, 1])
QUERIES = torch.tensor([1, 2, 4])  # query 2 (pid 4) has no correct image
SIM = torch.tensor([
    # ranking for q0: ties between g1 and g2 (0.9) -> g1 first (lower index); order g0(0.95) g1 g2 g3(0.5) g4(0.1)
    [0.95, 0.9, 0.9, 0.5, 0.1],
    # q1 (pid 2): g3 0.8, g4 0.7, g1 0.6 ... -> correct g1 at rank 3
    [0.1, 0.6, 0.2, 0.8, 0.7],
    [0.3, 0.2, 0.1, 0.0, 0.5],
])


def test_hand_computed_example():
    m = retrieval_metrics(SIM, QUERIES, GALLERY, chunk=2)
    # q0: correct at ranks 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3, INP = 3/5
    # q1: correct at rank 3 -> AP = 1/3, INP = 1/3
    # q2: no correct image -> a miss in R@K, skipped in mAP/mINP
    ap = ((1 + 2 / 3 + 3 / 5) / 3 + 1 / 3) / 2
    inp = (3 / 5 + 1 / 3) / 2
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == pytest.approx(200 / 3)
    assert m["R10"] == pytest.approx(200 / 3)
    assert m["mAP"] == pytest.approx(100 * ap)
    assert m["mINP"] == pytest.approx(100 * inp)


def test_ties_are_broken_by_gallery_index():
    sim = torch.zeros(1, 4)
    assert retrieval_metrics(sim, torch.tensor([7]), torch.tensor([1, 7, 1, 1]))["R1"] == 0.0
    assert retrieval_metrics(sim, torch.tensor([7]), torch.tensor([7, 1, 1, 1]))["R1"] == 100.0


def test_chunking_does_not_change_results():
    torch.manual_seed(0)
    sim = torch.randn(37, 23).round(decimals=1)  # many ties
    q = torch.randint(0, 6, (37,))
    g = torch.randint(0, 6, (23,))
    full = retrieval_metrics(sim, q, g, chunk=1000)
    for chunk in (1, 5, 16):
        assert retrieval_metrics(sim, q, g, chunk=chunk) == pytest.approx(full)


def test_chance_level():
    assert chance_level(torch.tensor([1, 2]), torch.tensor([1, 1, 2, 3])) == pytest.approx(100 * (0.5 + 0.25) / 2)
