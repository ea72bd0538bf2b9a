"""Rank a gallery for free-text queries with a trained checkpoint; write an HTML page and a PNG grid of the top K.

    python -m tbps.search --checkpoint runs/irra/best --gallery s3://bucket/cuhk-pedes \\
        "a woman in a red coat with a black backpack" [--top-k 10] [--out DIR]
    python -m tbps.search --checkpoint runs/irra/best --gallery /data/shards/synth --queries queries.txt

The gallery (a split of a shards dataset, default test) is embedded once and cached beside the checkpoint
(``<checkpoint>/search-index/``, keyed by the checkpoint and the gallery's manifest), so later queries only embed the
text and rank. Galleries of ``--faiss-min`` images or more are ranked by a FAISS inner-product index. When a query is
one of the gallery split's own captions, its person id is known and the results say which images are correct.
The model comes from ``tbps.checkpoint.load_method`` and the index from ``tbps.retrieval``; this module renders the
answers (HTML page, PNG grid, results.json) and holds the command line.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
import time

from PIL import Image, ImageDraw

from tbps.retrieval import encode_queries, fetch_images, gallery_index, normalise_caption

TILE_W, TILE_H, LABEL_H = 96, 192, 30


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
    from tbps.checkpoint import load_method

    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    method, cfg, tok = load_method(checkpoint, data_url=gallery, device=device)
    index, cached = gallery_index(method, cfg, tok, checkpoint, gallery, split, device, faiss_min, log)
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
