"""Losses against hand computations from the formulas in REFERENCE.md, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from tbps import losses as L

V = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]  # image features (unnormalised)
T = [[0.8, 0.6], [1.0, 1.0], [-1.0, 0.5]]  # text features
PIDS = [7, 7, 3]  # items 0 and 1 share an identity


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _kl_rows(rows, cols, pids, score, eps=1e-8, norm="sum"):
    total = 0.0
    for i, r in enumerate(rows):
        logits = [score(r, c) for c in cols]
        z = sum(math.exp(x) for x in logits)
        p = [math.exp(x) / z for x in logits]
        y = [1.0 if pids[i] == pids[j] else 0.0 for j in range(len(cols))]
        q = [v / (sum(y) if norm == "sum" else math.sqrt(sum(v * v for v in y))) for v in y]
        total += sum(p[j] * (math.log(p[j]) - math.log(q[j] + eps)) for j in range(len(cols)))
    return total / len(rows)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_sdm_matches_hand_computation():
    s = 1 / 0.02
    expected = (_kl_rows(V, T, PIDS, lambda a, b: s * _cos(a, b))
                + _kl_rows(T, V, PIDS, lambda a, b: s * _cos(a, b)))
    got = L.sdm_loss(_t(V), _t(T), torch.tensor(PIDS), s)
    assert abs(got.item() - expected) < 1e-6


# several positives per row, as in every IVT batch (identity-sampled, 3 views x 3 text levels)
V4 = [[1.0, 0.0, 0.5], [0.6, 0.8, -0.2], [0.0, 2.0, 1.0], [0.3, -0.4, 0.9], [-1.0, 0.2, 0.1]]
T4 = [[0.8, 0.6, 0.0], [1.0, 1.0, -1.0], [-1.0, 0.5, 0.3], [0.2, 0.2, 0.7], [0.5, -0.9, 0.4]]
PIDS4 = [4, 4, 4, 9, 9]


@pytest.mark.parametrize("norm", ["l2", "sum"])
@pytest.mark.parametrize("data", [(V, T, PIDS), (V4, T4, PIDS4)], ids=["two_positives", "three_positives"])
def test_cmpm_matches_hand_computation(norm, data):
    v, t, pids = data

    def score(a, b):  # a . b / |b|
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(y * y for y in b))
    expected = _kl_rows(v, t, pids, score, norm=norm) + _kl_rows(t, v, pids, score, norm=norm)
    got = L.cmpm_loss(_t(v), _t(t), torch.tensor(pids), norm=norm)
    assert abs(got.item() - expected) < 1e-6


def test_cmpm_default_is_the_official_l2_form_and_differs_from_sum_with_several_positives():
    v, t, pids = _t(V4), _t(T4), torch.tensor(PIDS4)
    assert L.cmpm_loss(v, t, pids).item() == L.cmpm_loss(v, t, pids, norm="l2").item()
    assert abs(L.cmpm_loss(v, t, pids, norm="l2").item() - L.cmpm_loss(v, t, pids, norm="sum").item()) > 0.1
    one = torch.tensor([0, 1, 2, 3, 4])  # one positive per row: the forms agree
    assert abs(L.cmpm_loss(v, t, one, norm="l2").item() - L.cmpm_loss(v, t, one, norm="sum").item()) < 1e-12
    with pytest.raises(ValueError, match="l2, sum"):
        L.cmpm_loss(v, t, pids, norm="max")


def test_itc_matches_hand_computation():
    s = 10.0

    def ce(rows, cols):
        out = 0.0
        for i, r in enumerate(rows):
            logits = [s * _cos(r, c) for c in cols]
            out += -logits[i] + math.log(sum(math.exp(x) for x in logits))
        return out / len(rows)
    expected = (ce(V, T) + ce(T, V)) / 2
    assert abs(L.itc_loss(_t(V), _t(T), s).item() - expected) < 1e-6


@pytest.mark.parametrize("name", ["sdm", "cmpm", "cmpm_sum", "itc"])
def test_gradients(name):
    torch.manual_seed(0)
    v = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 2, 2])
    fn = {"sdm": lambda a, b: L.sdm_loss(a, b, pids, 5.0), "cmpm": lambda a, b: L.cmpm_loss(a, b, pids),
          "cmpm_sum": lambda a, b: L.cmpm_loss(a, b, pids, norm="sum"),
          "itc": lambda a, b: L.itc_loss(a, b, 5.0)}[name]
    assert torch.autograd.gradcheck(fn, (v, t))


def test_sdm_is_zero_only_when_distribution_matches():
    # perfectly separated identities with a huge scale: p -> q, loss -> 0
    v = torch.eye(3, dtype=torch.float64)
    assert L.sdm_loss(v, v.clone(), torch.tensor([0, 1, 2]), 1000.0).item() < 1e-6
    assert L.sdm_loss(v, v.flip(0), torch.tensor([0, 1, 2]), 1000.0).item() > 10


def test_id_and_mlm_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(L.id_loss(logits, logits, labels), ce)
    mlm_logits = torch.randn(2, 3, 5)
    mlm_labels = torch.tensor([[-100, 2, -100], [4, -100, -100]])
    expected = (torch.nn.functional.cross_entropy(mlm_logits[0, 1:2], mlm_labels[0, 1:2], reduction="sum")
                + torch.nn.functional.cross_entropy(mlm_logits[1, 0:1], mlm_labels[1, 0:1], reduction="sum")) / 2
    assert torch.isclose(L.mlm_loss(mlm_logits, mlm_labels), expected)


def _parts(common_value):
    """4 people, 2 ids; part 0 looks the same for everyone (common), part 1 differs per identity (distinctive)."""
    common = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1) + common_value
    distinct = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0], [0.0, 0.1, 1.0]])
    return torch.stack([common, distinct], dim=1)  # [4, 2, 3]


def test_commonality_is_high_for_shared_parts_and_margin_shrinks():
    parts = _parts(0.0)
    pids = torch.tensor([0, 0, 1, 1])
    c = L.part_commonality(parts, pids)
    assert torch.allclose(c[:, 0], torch.ones(4))  # identical across identities
    assert (c[:, 1] < 0.2).all()  # distinctive
    # identical image/text parts: only margins matter, so with commonality the common part costs (almost) nothing
    with_c = L.cmr_loss(parts, parts.clone(), pids, margin=0.3, commonality=True)
    fixed = L.cmr_loss(parts, parts.clone(), pids, margin=0.3, commonality=False)
    assert with_c < fixed


def test_cmr_fixed_margin_matches_hand_computation():
    parts = _parts(0.0)
    pids = torch.tensor([0, 0, 1, 1])
    m = 0.3
    p = torch.nn.functional.normalize(parts, dim=-1)
    total, n = 0.0, 0
    for k in range(2):
        for i in range(4):
            sims = [float(p[i, k] @ p[j, k]) for j in range(4)]
            pos = min(sims[j] for j in range(4) if pids[j] == pids[i])
            neg = max(sims[j] for j in range(4) if pids[j] != pids[i])
            total += max(0.0, m + neg - pos)
            n += 1
    expected = 2 * total / n  # both directions are identical here
    got = L.cmr_loss(parts, parts.clone(), pids, margin=m, commonality=False)
    assert abs(got.item() - expected) < 1e-6


def test_cmr_without_negatives_is_zero_with_finite_gradients():
    """A batch of one identity has no negatives: the ranking loss is 0 (no anchor is valid), computed without reading
    the number of valid anchors back to the host, and its gradients are 0, not NaN."""
    parts = _parts(0.0).requires_grad_(True)
    texts = _parts(0.1).requires_grad_(True)
    loss = L.cmr_loss(parts, texts, torch.zeros(4, dtype=torch.long), margin=0.3)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(parts.grad, torch.zeros_like(parts)) and torch.equal(texts.grad, torch.zeros_like(texts))
