"""Retrieval metrics, exact, in bounded memory (REFERENCE.md definitions).

R@K: % of queries with a correct image in the top K. AP: mean over a query's correct images of
(correct images up to that rank) / rank. INP: (number correct) / (rank of the last correct image).
Ties are ordered by gallery index (stable sort). Queries with no correct image are skipped in mAP/mINP (they still
count as misses in R@K).
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


def chunk_stats(sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                ks: tuple[int, ...] = KS) -> torch.Tensor:
    """Sums for a block of queries: [hits@k for k in ks..., sum AP, sum INP, queries with a match, queries]."""
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    matches = gallery_pids[order] == query_pids[:, None]  # [q, G] bool, in rank order
    hits = [matches[:, :k].any(dim=1).sum() for k in ks]
    num_rel = matches.sum(dim=1)
    valid = num_rel > 0
    ranks = torch.arange(1, matches.shape[1] + 1, device=sim.device, dtype=torch.float64)
    cum = matches.cumsum(dim=1, dtype=torch.float64)
    ap = (cum / ranks * matches).sum(dim=1) / num_rel.clamp_min(1)
    last = torch.where(matches, ranks.expand_as(cum), torch.zeros_like(cum)).amax(dim=1)
    inp = num_rel / last.clamp_min(1)
    return torch.stack([*(h.double() for h in hits), ap[valid].sum(), inp[valid].sum(),
                        valid.sum().double(), torch.tensor(float(len(sim)), device=sim.device,
                                                           dtype=torch.float64)])


def finish(stats: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    n_k = len(ks)
    queries, valid = float(stats[n_k + 3]), float(stats[n_k + 2])
    out = {f"R{k}": 100.0 * float(stats[i]) / max(queries, 1) for i, k in enumerate(ks)}
    out["mAP"] = 100.0 * float(stats[n_k]) / max(valid, 1)
    out["mINP"] = 100.0 * float(stats[n_k + 1]) / max(valid, 1)
    return out


def retrieval_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      chunk: int = 1024) -> dict[str, float]:
    """``similarity`` [Q, G] (queries are texts) -> {"R1", "R5", "R10", "mAP", "mINP"} in percent."""
    if similarity.shape != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match {len(query_pids)} queries x "
                         f"{len(gallery_pids)} gallery images")
    query_pids = query_pids.to(similarity.device)
    gallery_pids = gallery_pids.to(similarity.device)
    total = torch.zeros(len(KS) + 4, dtype=torch.float64, device=similarity.device)
    for start in range(0, len(similarity), chunk):
        total += chunk_stats(similarity[start:start + chunk], query_pids[start:start + chunk], gallery_pids)
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
