"""The evaluation pass: embed the gallery (each image once) and the queries (every caption) across ranks
(``tbps.retrieval.embed``, as search embeds its gallery), then rank each rank's own queries against the whole gallery
and reduce the metric sums. No rank idles while another
works, and no rank holds the full Q x G score matrix."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tbps.distributed import world
from tbps.retrieval import NonFiniteEmbeddingsError, embed, nonfinite_message, nonfinite_rows

from .metrics import KS, METRICS, chance_level, chunk_stats, finish


def save_embeddings(local: dict, path: str) -> None:
    """``embeddings.npz``: one row per gallery image (``image_emb``, ``image_path``, ``image_pid``) and per caption
    (``text_emb``, ``caption``, ``text_pid``), each side in split order, in the space the method's similarity uses
    (``Method.search_vectors``: inner products = similarity). Single process."""
    import numpy as np

    io, to = local["img_idx"].argsort(), local["txt_idx"].argsort()
    np.savez(path, image_emb=local["img_vec"][io].cpu().numpy(), image_path=np.array(local["img_path"])[io.numpy()],
             image_pid=local["img_pid"][io].cpu().numpy(), text_emb=local["txt_vec"][to].cpu().numpy(),
             caption=np.array(local["caption"])[to.numpy()], text_pid=local["txt_pid"][to].cpu().numpy())


def _gather_gallery(local: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' gallery embeddings, ordered by global image index (the tie-break order)."""
    rank, size = world()
    emb, pid, idx = local["img"], local["img_pid"], local["img_idx"]
    if size > 1:
        objs = [None] * size
        dist.all_gather_object(objs, (emb.cpu(), pid.cpu(), idx.cpu()))
        emb = torch.cat([o[0] for o in objs if len(o[0])]).to(local["img"].device)
        pid = torch.cat([o[1] for o in objs if len(o[1])])
        idx = torch.cat([o[2] for o in objs if len(o[2])])
    order = idx.argsort()
    return emb[order], pid[order].to(emb.device)


def ivt_gallery_step(dataset: str) -> int:
    """Which caption rows' images IVT's evaluation takes as its gallery on a dataset (its manifest's name): every
    row on ICFG-PEDES (``R1_mAP_ICFG``, which its ICFG script uses), every second row elsewhere (``R1_mAP_CUHK``,
    which its CUHK-PEDES and RSTPReid scripts use)."""
    return 1 if dataset == "icfg-pedes" else 2


def ivt_protocol(model, local: dict, chunk: int = 1024, step: int = 2) -> dict[str, float]:
    """R1/R5/R10/mAP as IVT's tables compute them (utils/metrics.py ``R1_mAP_CUHK``; ``R1_mAP_ICFG`` with
    ``step=1``, ``ivt_gallery_step``): the gallery is the image of every ``step``-th caption row in split order
    (step 2, rows 0, 2, 4, ...: each image once when every image has two captions, some twice or not at all
    otherwise; step 1: each image once per caption) and AP is the trapezoid variant
    (``chunk_stats(ap="trapezoid")``). Ties are ordered by gallery row (IVT's reversed argsort orders them the
    other way). Single process."""
    if world()[1] > 1:
        raise RuntimeError("the IVT protocol is computed in a single process (tbps.evaluate)")
    gallery_images = local["txt_img"][local["txt_idx"].argsort()][::step].tolist()
    position = {i: p for p, i in enumerate(local["img_idx"].tolist())}
    take = torch.tensor([position[i] for i in gallery_images], dtype=torch.long, device=local["img"].device)
    gallery, gallery_pids = local["img"][take], local["img_pid"].to(take.device)[take]
    queries, query_pids = local["txt"], local["txt_pid"].to(take.device)
    stats = torch.zeros(len(KS) + 4, dtype=torch.float64, device=gallery.device)
    for s in range(0, len(queries), chunk):
        sim = model.similarity(queries[s:s + chunk], gallery).float()
        stats += chunk_stats(sim, query_pids[s:s + chunk], gallery_pids, ap="trapezoid")
    out = {k: v for k, v in finish(stats).items() if k != "mINP"}
    out["gallery"] = len(gallery)
    return out


def check_embeddings_finite(gallery: torch.Tensor, queries: torch.Tensor) -> None:
    """Raise :class:`NonFiniteEmbeddingsError` on every rank when any rank's embeddings hold NaN or inf (the gallery
    is the same on all ranks; the counts of this rank's queries are summed across them)."""
    counts = torch.tensor([nonfinite_rows(queries), len(queries)], dtype=torch.long)
    if world()[1] > 1:
        counts = counts.to(gallery.device)
        dist.all_reduce(counts)
    bad_queries, total_queries = counts.tolist()
    bad_gallery = nonfinite_rows(gallery)
    if bad_gallery or bad_queries:
        raise NonFiniteEmbeddingsError(nonfinite_message({"gallery images": (bad_gallery, len(gallery)),
                                                          "captions": (bad_queries, total_queries)}))


@torch.no_grad()
def evaluate(model, loader, device="cpu", chunk: int = 1024, autocast_dtype=None, cmc: int = 0,
             embeddings_path: str | None = None, ap: str = "standard", dataset: str = "") -> dict[str, float]:
    """R1/R5/R10/mAP/mINP (+ chance R1 and timing) of ``model`` on the split behind ``loader`` (this rank's part).
    Every rank must call it; with one process it is the plain single-process evaluation. ``embeddings_path``
    (single process) also writes the embeddings (``save_embeddings``). ``ap="trapezoid"`` (single process) adds
    ``ivt``: the metrics by IVT's protocol for ``dataset`` (the manifest's name; ``ivt_protocol``), beside ours."""
    if ap not in ("standard", "trapezoid"):
        raise ValueError(f"ap must be standard or trapezoid, got {ap!r}")
    start = time.time()
    local = embed(model, loader, device, autocast_dtype, keep_strings=embeddings_path is not None)
    gallery, gallery_pids = _gather_gallery(local)
    queries, query_pids = local["txt"], local["txt_pid"].to(gallery.device)
    check_embeddings_finite(gallery, queries)  # before anything is written from them
    if embeddings_path:
        local["img_vec"] = model.search_vectors(local["img"], "image")
        local["txt_vec"] = model.search_vectors(local["txt"], "text")
        save_embeddings(local, embeddings_path)
    cmc = min(cmc, len(gallery))
    stats = torch.zeros(len(KS) + 4 + cmc, dtype=torch.float64, device=gallery.device)
    for s in range(0, len(queries), chunk):
        sim = model.similarity(queries[s:s + chunk], gallery).float()
        stats += chunk_stats(sim, query_pids[s:s + chunk], gallery_pids, cmc=cmc)
    all_qpids, skipped = query_pids.cpu(), len(local["skipped_shards"])
    if world()[1] > 1:
        dist.all_reduce(stats)
        objs = [None] * world()[1]
        dist.all_gather_object(objs, (all_qpids, skipped))
        all_qpids, skipped = torch.cat([o[0] for o in objs]), sum(o[1] for o in objs)
    out = finish(stats)
    out["R1_mAP"] = (out["R1"] + out["mAP"]) / 2  # IVT's selection criterion (train.select_metric)
    out["chance_R1"] = chance_level(all_qpids, gallery_pids.cpu(), 1)
    out["queries"] = int(stats[len(KS) + 3])
    out["gallery"] = len(gallery)
    if skipped:  # data.on_bad_shard=skip, all ranks
        out["skipped_shards"] = skipped
    if ap == "trapezoid":
        out["ivt"] = ivt_protocol(model, local, chunk, ivt_gallery_step(dataset))
    out["eval_seconds"] = time.time() - start
    return out


def format_table(rows: dict[str, dict[str, float]], chance: bool = True) -> str:
    """A metrics table: one row per split/model name."""
    cols = list(METRICS)
    w = max([14] + [len(n) + 2 for n in rows])
    head = f"{'':<{w}}" + "".join(f"{c:>8}" for c in cols) + (f"{'chance R1':>11}" if chance else "")
    lines = [head]
    for name, m in rows.items():
        line = f"{name:<{w}}" + "".join(f"{m.get(c, float('nan')):>8.2f}" for c in cols)
        if chance and "chance_R1" in m:
            line += f"{m['chance_R1']:>11.2f}"
        lines.append(line)
    return "\n".join(lines)
