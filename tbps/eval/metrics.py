"""Retrieval metrics, exact, in bounded memory (REFERENCE.md definitions).

R@K: % of queries with a correct image in the top K. AP: mean over a query's correct images of
(correct images up to that rank) / rank. INP: (number correct) / (rank of the last correct image).
Ties are ordered by gallery index (stable sort). Queries with no correct image are skipped in mAP/mINP (they still
count as misses in R@K). A NaN or inf score is an error (a NaN compares false with everything, so the correct
images would all rank first).
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
METRICS = ("R1", "R5", "R10", "mAP", "mINP")  # what every report, table and selection uses, in this order
# what train.select_metric may name: a metric, or R1_mAP = (R1 + mAP) / 2, by which IVT's loop keeps its best epoch
# (processor.py: acc_test = 0.5 * (R1 + mAP)); every evaluation reports it
SELECT_METRICS = (*METRICS, "R1_mAP")


def positive_ranks(sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                   block_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """(query index, 1-based rank) of every correct (query, gallery) pair, without sorting the rows.

    The rank of correct image j for query q is 1 + #{g: s_qg > s_qj} + #{g < j: s_qg == s_qj} (ties in gallery
    order, as a stable descending sort would place them). Counting costs (correct pairs) x G comparisons — far less
    than sorting every row when queries have few correct images — and memory stays at one block of rows."""
    matches = query_pids[:, None] == gallery_pids[None, :]
    qi, gi = matches.nonzero(as_tuple=True)  # ordered by query, then gallery index
    del matches
    if sim.device.type == "cpu":
        return qi, _numpy_ranks(sim, qi, gi)
    scores = sim[qi, gi]
    ranks = torch.empty(len(qi), dtype=torch.long, device=sim.device)
    G = sim.shape[1]
    step = max(1, block_elems // max(G, 1))
    col = torch.arange(G, device=sim.device)
    for b in range(0, len(qi), step):
        rows, sp, g = sim[qi[b:b + step]], scores[b:b + step, None], gi[b:b + step]
        rank = (rows > sp).sum(dim=1) + 1
        tied = ((rows == sp).sum(dim=1) > 1).nonzero(as_tuple=True)[0]  # ties besides itself: rare with floats
        if len(tied):
            rank[tied] += ((rows[tied] == sp[tied]) & (col[None, :] < g[tied, None])).sum(dim=1)
        ranks[b:b + step] = rank
    return qi, ranks


def _numpy_ranks(sim: torch.Tensor, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
    """CPU path: per query row, numpy counts (several times faster than torch's bool reductions, and no row copies),
    rows split over threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    S = sim.detach().numpy()
    q_np, g_np = qi.numpy(), gi.numpy()
    ranks = np.empty(len(q_np), dtype=np.int64)
    bounds = np.searchsorted(q_np, np.arange(len(S) + 1))  # pairs of row r: bounds[r]:bounds[r + 1]

    def rows(lo: int, hi: int) -> None:
        for r in range(lo, hi):
            a, b = bounds[r], bounds[r + 1]
            if a == b:
                continue
            row, g = S[r], g_np[a:b]
            thr = row[g][:, None]
            gt = np.count_nonzero(row > thr, axis=1)
            ge = np.count_nonzero(row >= thr, axis=1)
            rank = gt + 1
            for j in np.flatnonzero(ge - gt > 1):  # exact ties besides the image itself: order by gallery index
                rank[j] += np.count_nonzero(row[:g[j]] == thr[j, 0])
            ranks[a:b] = rank

    threads = max(1, min(torch.get_num_threads(), 8))
    cuts = np.linspace(0, len(S), threads + 1).astype(int)
    if threads == 1 or len(S) < 64:
        rows(0, len(S))
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: rows(cuts[i], cuts[i + 1]), range(threads)))
    return torch.from_numpy(ranks)


def chunk_stats(sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                ks: tuple[int, ...] = KS, cmc: int = 0, ap: str = "standard") -> torch.Tensor:
    """Sums for a block of queries: [hits@k for k in ks..., sum AP, sum INP, queries with a match, queries], then,
    with ``cmc`` > 0, how many queries have their first correct image at rank 1, 2, ..., cmc (for the CMC curve).

    ``ap="trapezoid"``: IVT's AP (utils/metrics.py ``compute_mAP``): mean over the n correct images of
    (p_i + p_{i-1}') / 2, p_i = i / r_i the precision at the i-th correct image's rank and
    p_{i-1}' = (i - 1) / (r_i - 1) the precision just before it (1 at rank 1)."""
    if ap not in ("standard", "trapezoid"):
        raise ValueError(f"ap must be standard or trapezoid, got {ap!r}")
    # every comparison with NaN is false: each correct image would rank 1st. The min and max are finite exactly when
    # every score is (both propagate NaN), in one pass and without a Q x G temporary (isfinite(sim).all() doubled
    # bench/eval.py's time and took 200 MB at ICFG scale)
    if sim.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(sim))).all()):
        bad = int((~torch.isfinite(sim)).sum())
        raise ValueError(f"{bad} of the {sim.numel()} similarity scores are NaN or inf: no rank can be computed from "
                         "them (the embeddings or the model's weights are not finite)")
    Q = len(sim)
    qi, ranks = positive_ranks(sim, query_pids, gallery_pids)
    dev, f64 = sim.device, torch.float64
    stats = torch.zeros(len(ks) + 4 + cmc, dtype=f64, device=dev)
    stats[len(ks) + 3] = Q
    if len(qi) == 0:
        return stats
    G = sim.shape[1]
    order = torch.sort(qi * (G + 1) + ranks).indices  # per query, correct images in rank order
    qi, ranks = qi[order], ranks[order]
    num_rel = torch.bincount(qi, minlength=Q)
    start = torch.cumsum(num_rel, 0) - num_rel
    position = torch.arange(len(qi), device=dev) - start[qi] + 1  # i-th correct image of its query
    precision = position.to(f64) / ranks.to(f64)
    if ap == "trapezoid":
        before = torch.where(ranks > 1, (position - 1).to(f64) / (ranks - 1).clamp_min(1).to(f64),
                             torch.ones_like(precision))
        precision = (precision + before) / 2
    ap = torch.zeros(Q, dtype=f64, device=dev).index_add_(0, qi, precision)
    valid = num_rel > 0
    first = ranks[start[valid]]  # best rank of a correct image
    last = ranks[(start + num_rel - 1)[valid]]
    for i, k in enumerate(ks):
        stats[i] = (first <= k).sum()
    stats[len(ks)] = (ap[valid] / num_rel[valid]).sum()
    stats[len(ks) + 1] = (num_rel[valid].to(f64) / last.to(f64)).sum()
    stats[len(ks) + 2] = valid.sum()
    if cmc:
        stats[len(ks) + 4:] = torch.bincount(first[first <= cmc] - 1, minlength=cmc).to(f64)
    return stats


def finish(stats: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    n_k = len(ks)
    queries, valid = float(stats[n_k + 3]), float(stats[n_k + 2])
    out = {f"R{k}": 100.0 * float(stats[i]) / max(queries, 1) for i, k in enumerate(ks)}
    out["mAP"] = 100.0 * float(stats[n_k]) / max(valid, 1)
    out["mINP"] = 100.0 * float(stats[n_k + 1]) / max(valid, 1)
    if len(stats) > n_k + 4:  # CMC: R@k for k = 1..len
        out["cmc"] = (100.0 * torch.cumsum(stats[n_k + 4:], 0) / max(queries, 1)).tolist()
    return out


def retrieval_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      chunk: int = 1024, cmc: int = 0) -> dict[str, float]:
    """``similarity`` [Q, G] (queries are texts) -> {"R1", "R5", "R10", "mAP", "mINP"} in percent (+ "cmc": R@1..cmc
    when ``cmc`` > 0)."""
    if similarity.shape != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match {len(query_pids)} queries x "
                         f"{len(gallery_pids)} gallery images")
    query_pids = query_pids.to(similarity.device)
    gallery_pids = gallery_pids.to(similarity.device)
    cmc = min(cmc, len(gallery_pids))
    total = torch.zeros(len(KS) + 4 + cmc, dtype=torch.float64, device=similarity.device)
    for start in range(0, len(similarity), chunk):
        total += chunk_stats(similarity[start:start + chunk], query_pids[start:start + chunk], gallery_pids,
                             cmc=cmc)
    return finish(total)


def chance_level(query_pids: torch.Tensor, gallery_pids: torch.Tensor, k: int = 1) -> float:
    """Expected R@k (percent) of a random ranking: mean over queries of 1 - C(G - n, k) / C(G, k)."""
    G = len(gallery_pids)
    counts = {}
    for p in gallery_pids.tolist():
        counts[p] = counts.get(p, 0) + 1
    total = 0.0
    for p in query_pids.tolist():
        n = counts.get(p, 0)
        miss = 1.0
        for i in range(k):
            miss *= max(G - n - i, 0) / (G - i)
        total += 1 - miss
    return 100.0 * total / max(len(query_pids), 1)
