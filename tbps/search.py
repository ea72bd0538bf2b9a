"""Rank a gallery for free-text queries with a trained checkpoint; write an HTML page and a PNG grid of the top K.

    python -m tbps.search --checkpoint runs/irra/best --gallery s3://bucket/cuhk-pedes \\
        "a woman in a red coat with a black backpack" [--top-k 10] [--out DIR]
    python -m tbps.search --checkpoint runs/irra/best --gallery /data/shards/synth --queries queries.txt

The gallery (a split of a shards dataset, default test) is embedded once and cached beside the checkpoint
(``<checkpoint>/search-index/``, keyed by the checkpoint and the gallery's manifest), so later queries only embed the
text and rank. Galleries of ``--faiss-min`` images or more are ranked by a FAISS inner-product index. When a query is
one of the gallery split's own captions, its person id is known and the results say which images are correct.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from shards.storage import filesystem, join, write_bytes_atomic

TILE_W, TILE_H, LABEL_H = 96, 192, 30
INDEX_FORMAT = 1


@dataclass
class GalleryIndex:
    vectors: torch.Tensor  # [N, D] search vectors (image side), float32
    pids: list[int]
    keys: list[str]
    shards: list[str]
    paths: list[str]
    caption_pids: dict[str, int]  # normalised caption -> pid, for queries taken from the dataset
    url: str
    split: str
    _faiss: object = field(default=None, repr=False)

    def use_faiss(self) -> None:
        import faiss

        index = faiss.IndexFlatIP(self.vectors.shape[1])  # exact inner product, BLAS-batched
        index.add(self.vectors.numpy().astype("float32"))
        self._faiss = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.keys))
        if self._faiss is not None:
            scores, idx = self._faiss.search(queries.float().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        scores = queries.float() @ self.vectors.t()
        # stable ranking: ties keep gallery order, as in evaluation
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return scores.gather(1, order), order


def normalise_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def index_key(checkpoint: str, gallery: str, split: str) -> str:
    """Identifies (checkpoint weights, gallery content): meta.json + config.yaml of the checkpoint, the gallery's
    manifest (shard hashes included) and the split."""
    from tbps.engine.checkpoint import read_text

    h = hashlib.sha256()
    for part in (read_text(join(checkpoint, "meta.json")), read_text(join(checkpoint, "config.yaml")),
                 read_text(join(gallery, "manifest.json")), split, str(INDEX_FORMAT)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@torch.no_grad()
def build_gallery(method, cfg, gallery: str, split: str, device: str = "cpu", batch_size: int = 128,
                  log=None) -> GalleryIndex:
    from tbps.data import load_manifest
    from tbps.data.stream import ShardCheck, _decode_image, shard_samples, split_shards
    from tbps.data.transforms import BatchAugment, resize_uint8

    manifest = load_manifest(gallery)
    entries = split_shards(manifest, split, gallery)
    urls = [join(gallery, s["name"]) for s in entries]
    check = ShardCheck(gallery, entries)  # a damaged gallery shard stops indexing, naming it
    augment = BatchAugment(cfg.data, train=False)
    size = tuple(cfg.data.image_size)
    method.eval()
    vecs, pids, keys, shards, paths, caps = [], [], [], [], [], {}
    batch: list[np.ndarray] = []

    def flush():
        if batch:
            emb = method.encode_image(augment(torch.from_numpy(np.stack(batch))).to(device)).float()
            vecs.append(method.search_vectors(emb, "image").cpu())
            batch.clear()

    t0 = time.time()
    for sample in shard_samples(urls, check):
        meta = json.loads(sample["json"])
        batch.append(resize_uint8(_decode_image(sample, size), size, cfg.data.interpolation))
        pids.append(int(meta["pid"]))
        keys.append(sample["__key__"])
        shards.append(os.path.basename(sample["__url__"]))
        paths.append(meta.get("path", ""))
        for c in meta.get("captions", []):
            caps.setdefault(normalise_caption(c), int(meta["pid"]))
        if len(batch) == batch_size:
            flush()
            if log:
                log(f"[search] embedded {len(keys)} gallery images ({len(keys) / (time.time() - t0):.0f}/s)")
    flush()
    if not keys:
        raise ValueError(f"split {split!r} of {gallery} has no images")
    return GalleryIndex(torch.cat(vecs), pids, keys, shards, paths, caps, gallery, split)


def gallery_index(method, cfg, checkpoint: str, gallery: str, split: str = "test", device: str = "cpu",
                  faiss_min: int = 20000, log=print) -> tuple[GalleryIndex, bool]:
    """The gallery index: loaded from the cache beside the checkpoint, or built and cached. Returns (index, cached)."""
    url = join(checkpoint, "search-index", f"{split}-{index_key(checkpoint, gallery, split)}.pt")
    fs, path = filesystem(url)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), weights_only=True)
        index, cached = GalleryIndex(**state), True
        log(f"[search] gallery index: {len(index.keys)} images of {gallery} ({split}), from the cache {url}")
    else:
        index = build_gallery(method, cfg, gallery, split, device, log=log)
        buf = io.BytesIO()
        torch.save({k: getattr(index, k) for k in ("vectors", "pids", "keys", "shards", "paths", "caption_pids",
                                                   "url", "split")}, buf)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_bytes_atomic(fs, path, buf.getvalue())
        cached = False
        log(f"[search] gallery index: {len(index.keys)} images embedded and cached at {url}")
    if len(index.keys) >= faiss_min:
        from tbps.extras import available

        if available("faiss"):
            index.use_faiss()
            log(f"[search] ranking with a FAISS inner-product index ({len(index.keys)} >= --faiss-min {faiss_min})")
        else:  # the exact torch ranking gives the same results, more slowly on large galleries
            log(f"[search] FAISS is not installed (pip install 'tbps[search]'): ranking {len(index.keys)} images "
                "with torch")
    return index, cached


@torch.no_grad()
def encode_queries(method, cfg, tok, queries: list[str], device: str = "cpu") -> torch.Tensor:
    from tbps.data.text import tokenize

    ids, mask = tokenize(tok, queries, cfg.data.text_length)
    emb = method.encode_text(ids.to(device), mask.to(device)).float()
    return method.search_vectors(emb, "text").cpu()


def fetch_images(index: GalleryIndex, positions: list[int]) -> dict[int, bytes]:
    """Original image bytes of some gallery entries, reading only the shards that hold them."""
    from tbps.data.stream import IMAGE_KEYS, shard_samples

    want: dict[str, dict[str, int]] = {}
    for p in positions:
        want.setdefault(index.shards[p], {})[index.keys[p]] = p
    out = {}
    for shard, keys in want.items():
        left = len(keys)
        for sample in shard_samples([join(index.url, shard)]):
            p = keys.get(sample["__key__"])
            if p is not None:
                out[p] = next(sample[k] for k in IMAGE_KEYS if k in sample)
                left -= 1
                if left == 0:  # stop reading this shard once its images are found
                    break
    return out


# ------------------------------------------------------------------------------------------------------ output
def _tile(data: bytes, rank: int, score: float, pid: int, correct) -> Image.Image:
    tile = Image.new("RGB", (TILE_W, TILE_H + LABEL_H), "white")
    from tbps.data.stream import decode_image

    im = decode_image(data)  # the loaders' one decode path
    im.thumbnail((TILE_W - 6, TILE_H - 6))
    tile.paste(im, ((TILE_W - im.width) // 2, 3 + (TILE_H - 6 - im.height) // 2))
    color = {True: (30, 160, 60), False: (200, 40, 40), None: (150, 150, 150)}[correct]
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, TILE_W - 1, TILE_H - 1], outline=color, width=3)
    draw.text((4, TILE_H + 2), f"#{rank} {score:.3f}", fill=(0, 0, 0))
    draw.text((4, TILE_H + 15), f"id {pid}" + {True: " ok", False: " x", None: ""}[correct], fill=color)
    return tile


def grid_shape(k: int) -> tuple[int, int]:
    cols = min(k, 5)
    return cols, math.ceil(k / cols)


def write_results(out: str, query: str, hits: list[dict], images: dict[int, bytes], meta: dict) -> dict:
    """index.html, grid.png (K tiles, 5 per row) and results.json in ``out``."""
    os.makedirs(out, exist_ok=True)
    cols, rows = grid_shape(len(hits))
    grid = Image.new("RGB", (cols * TILE_W, rows * (TILE_H + LABEL_H)), "white")
    figures = []
    for i, h in enumerate(hits):
        data = images[h["position"]]
        grid.paste(_tile(data, h["rank"], h["score"], h["pid"], h["correct"]),
                   ((i % cols) * TILE_W, (i // cols) * (TILE_H + LABEL_H)))
        mark = {True: "correct", False: "wrong", None: "unknown"}[h["correct"]]
        figures.append(
            f'<figure class="{mark}"><img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" '
            f'alt="{html.escape(h["key"])}"><figcaption>#{h["rank"]} · {h["score"]:.4f}<br>id {h["pid"]} · '
            f'{html.escape(h["path"] or h["key"])}{"" if h["correct"] is None else " · " + mark}</figcaption></figure>')
    grid.save(os.path.join(out, "grid.png"))
    known = meta.get("query_pid") is not None
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tbps search: {html.escape(query)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .grid{{display:flex;flex-wrap:wrap;gap:10px}}
figure{{margin:0;padding:4px;border:3px solid #999;width:140px;text-align:center;font-size:12px}}
figure.correct{{border-color:#1ea03c}} figure.wrong{{border-color:#c82828}} img{{max-width:128px;max-height:256px}}
</style></head><body>
<h2>“{html.escape(query)}”</h2>
<p>Top {len(hits)} of {meta['gallery_size']} images in {html.escape(meta['gallery'])} ({html.escape(meta['split'])}),
checkpoint {html.escape(meta['checkpoint'])}.
{f"The query is a caption of person {meta['query_pid']}: green = correct, red = wrong." if known else
 "The query is not one of the split's captions: correctness unknown."}</p>
<div class="grid">
{chr(10).join(figures)}
</div></body></html>
"""
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)
    result = {"query": query, **meta, "hits": hits}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "query"


def search(checkpoint: str, gallery: str, queries: list[str], top_k: int = 10, out: str = "search-results",
           split: str = "test", device: str = "cpu", faiss_min: int = 20000, log=print) -> list[dict]:
    """Answer each query; returns one result dict per query (also written under ``out``)."""
    from tbps.evaluate import load_checkpoint_model

    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    method, cfg, tok = load_checkpoint_model(checkpoint, gallery, device)
    index, cached = gallery_index(method, cfg, checkpoint, gallery, split, device, faiss_min, log)
    results = []
    for n, query in enumerate(queries):
        t0 = time.perf_counter()
        scores, order = index.search(encode_queries(method, cfg, tok, [query], device), top_k)
        answer_ms = (time.perf_counter() - t0) * 1000
        qpid = index.caption_pids.get(normalise_caption(query))
        hits = [{"rank": r + 1, "score": float(s), "position": int(p), "key": index.keys[p], "pid": index.pids[p],
                 "path": index.paths[p], "correct": None if qpid is None else index.pids[p] == qpid}
                for r, (s, p) in enumerate(zip(scores[0].tolist(), order[0].tolist()))]
        images = fetch_images(index, [h["position"] for h in hits])
        folder = out if len(queries) == 1 else os.path.join(out, f"q{n + 1:03d}-{_slug(query)}")
        meta = {"checkpoint": checkpoint, "gallery": gallery, "split": split, "gallery_size": len(index.keys),
                "query_pid": qpid, "index_cached": cached, "answer_ms": answer_ms,
                "faiss": index._faiss is not None}
        results.append(write_results(folder, query, hits, images, meta))
        log(f"\n“{query}” — answered in {answer_ms:.0f} ms ({'FAISS' if meta['faiss'] else 'exact matmul'}, "
            f"gallery of {len(index.keys)}): {folder}/index.html, {folder}/grid.png")
        for h in hits:
            mark = "" if h["correct"] is None else ("  correct" if h["correct"] else "  wrong")
            log(f"  #{h['rank']:<3} {h['score']:.4f}  id {h['pid']:<6} {h['path'] or h['key']}{mark}")
    return results


def main(argv=None) -> int:
    from shards.cli import add_verbose

    ap = argparse.ArgumentParser(prog="python -m tbps.search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (a run's best/ or checkpoint_*)")
    ap.add_argument("--gallery", required=True, help="shards dataset URL (local dir or s3://...)")
    ap.add_argument("query", nargs="*", help="query text(s)")
    ap.add_argument("--queries", help="file with one query per line")
    ap.add_argument("--split", default="test", help="gallery split (default test)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--out", default="search-results", help="output directory (one subfolder per query if several)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--faiss-min", type=int, default=20000, help="use FAISS for galleries at least this large")
    add_verbose(ap)
    args = ap.parse_args(argv)
    queries = list(args.query)
    if args.queries:
        with open(args.queries) as f:
            queries += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not queries:
        ap.error("give a query text or --queries FILE")
    from shards.cli import run_command

    def run() -> int:
        search(args.checkpoint, args.gallery, queries, args.top_k, args.out, args.split, args.device, args.faiss_min)
        return 0
    return run_command("python -m tbps.search", run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
