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


def test_nan_or_inf_scores_are_an_error_not_a_perfect_ranking():
    """A NaN compares false with everything, so a correct image's count of better-scored images was 0: a diverged
    model's NaN scores gave R1 100, mAP 200 and mINP 300. Such scores are refused (the training loop stops a
    diverged run before it gets here, tests/test_loop.py), and a search index of NaN vectors is never built."""
    from tbps.retrieval import GalleryIndex, NonFiniteEmbeddingsError

    for bad in (float("nan"), float("inf"), -float("inf")):
        sim = SIM.clone()
        sim[1, 3] = bad
        with pytest.raises(ValueError, match=r"1 of the 15 similarity scores are NaN or inf"):
            retrieval_metrics(sim, QUERIES, GALLERY)
    vectors = torch.randn(4, 8)
    vectors[2, 5] = float("nan")
    with pytest.raises(NonFiniteEmbeddingsError, match="1 of 4 gallery images have NaN or inf values"):
        GalleryIndex(vectors, [0] * 4, list("abcd"), [""] * 4, list("abcd"), {}, "url", "test")


def test_chance_level():
    assert chance_level(torch.tensor([1, 2]), torch.tensor([1, 1, 2, 3])) == pytest.approx(100 * (0.5 + 0.25) / 2)


def test_trapezoid_ap_is_ivts_compute_map():
    """IVT's utils/metrics.py compute_mAP: sum over correct images of (1/n) (p_before + p) / 2."""
    from tbps.eval.metrics import chunk_stats, finish

    m = finish(chunk_stats(SIM, QUERIES, GALLERY, ap="trapezoid"))
    # q0: correct at ranks 1, 3, 5: (1 + 1)/2, (1/2 + 2/3)/2, (2/4 + 3/5)/2;  q1: rank 3: (0/2 + 1/3)/2
    q0 = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
    q1 = (0 + 1 / 3) / 2
    assert m["mAP"] == pytest.approx(100 * (q0 + q1) / 2)
    assert m["R1"] == pytest.approx(100 / 3)  # R@k do not depend on the AP variant
    with pytest.raises(ValueError, match="standard or trapezoid"):
        chunk_stats(SIM, QUERIES, GALLERY, ap="11-point")


def test_ivt_protocol_gallery_is_every_second_caption_row():
    """Images with 2, 3 and 1 captions: caption rows (image of each) 0 0 1 1 1 2 -> rows 0, 2, 4 -> images 0, 1, 1."""
    from tbps.eval.ranking import ivt_protocol

    class Cosine:
        def similarity(self, t, v):
            return t @ v.t()

    img = torch.eye(3)
    local = {"img": img, "img_pid": torch.tensor([5, 6, 7]), "img_idx": torch.tensor([0, 1, 2]),
             "txt": torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0]]),
             "txt_pid": torch.tensor([5, 6, 7, 5, 5, 6]),
             "txt_idx": torch.tensor([0, 1000, 2000, 1, 2, 1001]), "txt_img": torch.tensor([0, 1, 2, 0, 0, 1])}
    # split order of the rows: txt_idx 0, 1, 2 (image 0), 1000, 1001 (image 1), 2000 (image 2)
    # -> rows 0, 2, 4 = image 0, image 0, image 1 (image 2 is left out of the gallery, as IVT's [::2] would)
    out = ivt_protocol(Cosine(), local)
    assert out["gallery"] == 3
    # the pid-7 query has no correct image: a miss in R1, skipped in mAP; pid 5 queries find image 0 (twice)
    assert out["R1"] == pytest.approx(100 * 5 / 6)


def test_ivt_protocol_on_icfg_pedes_takes_every_caption_row():
    """IVT's ICFG-PEDES script evaluates with R1_mAP_ICFG: the image of every caption row (each image once per
    caption); its CUHK-PEDES and RSTPReid scripts with R1_mAP_CUHK (every second row)."""
    from tbps.eval.ranking import ivt_gallery_step, ivt_protocol

    class Cosine:
        def similarity(self, t, v):
            return t @ v.t()

    local = {"img": torch.eye(3), "img_pid": torch.tensor([5, 6, 7]), "img_idx": torch.tensor([0, 1, 2]),
             "txt": torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0]]),
             "txt_pid": torch.tensor([5, 6, 7, 5, 5, 6]),
             "txt_idx": torch.tensor([0, 1000, 2000, 1, 2, 1001]), "txt_img": torch.tensor([0, 1, 2, 0, 0, 1])}
    assert [ivt_gallery_step(d) for d in ("icfg-pedes", "cuhk-pedes", "rstpreid", "toypedes")] == [1, 2, 2, 2]
    # rows in split order: images 0, 0, 0, 1, 1, 2 -- image 2 is in the gallery now, so the pid-7 query finds it
    out = ivt_protocol(Cosine(), local, step=1)
    assert out["gallery"] == 6 and out["R1"] == pytest.approx(100) and out["mAP"] == pytest.approx(100)
    assert ivt_protocol(Cosine(), local, step=2)["R1"] == pytest.approx(100 * 5 / 6)
