"""Rank a gallery for free-text queries with a trained checkpoint; write an HTML page and a PNG grid of the top K.

    python -m tbps.search --checkpoint runs/irra/best --gallery s3://bucket/cuhk-pedes \\
        "a woman in a red coat with a black backpack" [--top-k 10] [--out DIR]
    python -m tbps.search --checkpoint runs/irra/best --gallery /data/shards/synth --queries queries.txt
    python -m tbps.search --checkpoint runs/irra/best --images ~/photos/crops "a man in a red jacket"
    python -m tbps.search --checkpoint runs/irra/best --images s3://bucket/crops --serve --port 8000

The gallery (a split of a shards dataset, default test) is embedded once and cached beside the checkpoint
(``<checkpoint>/search-index/``, keyed by the checkpoint and the gallery's manifest), so later queries only embed the
text and rank. Galleries of ``--faiss-min`` images or more are ranked by a FAISS inner-product index. When a query is
one of the gallery split's own captions, its person id is known and the results say which images are correct (not
when several persons of the split share that caption: correctness is then unknown).
``--images`` searches a plain folder or bucket prefix of image files (person crops; .jpg/.png/...; recursively) with
no dataset conversion, cached the same way (keyed by the files' names, sizes and modification stamps). ``--serve``
serves a page on 127.0.0.1 where a person types queries (``/?q=TEXT&k=K``).
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
import threading
import time

from PIL import Image, ImageDraw

from tbps.retrieval import SHARED_CAPTION, encode_queries, fetch_images, gallery_index, normalise_caption

TILE_W, TILE_H, LABEL_H = 96, 192, 30
PAGE_MAX_K = 200  # --serve: the most results one page holds (each image inline; the form's limit too)


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
    draw.text((4, TILE_H + 15), ("" if pid < 0 else f"id {pid}") + {True: " ok", False: " x", None: ""}[correct],
              fill=color)
    return tile


def grid_shape(k: int) -> tuple[int, int]:
    cols = min(k, 5)
    return cols, math.ceil(k / cols)


def render_page(query: str, hits: list[dict], images: dict[int, bytes], meta: dict, form: bool = False) -> str:
    """The results page: the query, the top K with scores (images inline), and with ``form`` (``--serve``) a box
    to type the next query."""
    figures = []
    for h in hits:
        data = images[h["position"]]
        mark = {True: "correct", False: "wrong", None: "unknown"}[h["correct"]]
        who = "" if h["pid"] < 0 else f"id {h['pid']} · "
        figures.append(
            f'<figure class="{mark}"><img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" '
            f'alt="{html.escape(h["key"])}"><figcaption>#{h["rank"]} · <span class="score">{h["score"]:.4f}</span>'
            f'<br>{who}{html.escape(h["path"] or h["key"])}{"" if h["correct"] is None else " · " + mark}'
            f'</figcaption></figure>')
    if meta.get("source") == "images":
        note = "Images of a plain folder: no person ids, correctness unknown."
    elif meta.get("query_shared"):
        note = "The query is a caption of several persons of the split: correctness unknown."
    elif meta.get("query_pid") is not None:
        note = f"The query is a caption of person {meta['query_pid']}: green = correct, red = wrong."
    else:
        note = "The query is not one of the split's captions: correctness unknown."
    where = html.escape(meta["gallery"]) + ("" if meta.get("source") == "images" else f" ({html.escape(meta['split'])})")
    box = (f'<form method="get" action="/"><input type="text" name="q" id="q" size="60" autofocus '
           f'value="{html.escape(query)}" placeholder="describe a person, e.g. a man in a red jacket"> '
           f'<input type="number" name="k" value="{len(hits) or meta.get("top_k", 10)}" min="1" max="{PAGE_MAX_K}"> '
           f'<button type="submit" id="go">search</button></form>') if form else ""
    head = f"<h2 id=\"query\">“{html.escape(query)}”</h2>" if query else "<h2>tbps search</h2>"
    summary = (f"<p>Top {len(hits)} of {meta['gallery_size']} images in {where}, checkpoint "
               f"{html.escape(meta['checkpoint'])}"
               + (f", answered in {meta['answer_ms']:.0f} ms" if "answer_ms" in meta else "") + f". {note}</p>"
               if query else f"<p>{meta['gallery_size']} images in {where}, checkpoint "
                             f"{html.escape(meta['checkpoint'])}.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tbps search{': ' + html.escape(query) if query else ''}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .grid{{display:flex;flex-wrap:wrap;gap:10px}}
figure{{margin:0;padding:4px;border:3px solid #999;width:140px;text-align:center;font-size:12px}}
figure.correct{{border-color:#1ea03c}} figure.wrong{{border-color:#c82828}} img{{max-width:128px;max-height:256px}}
form{{margin-bottom:1em}}
</style></head><body>
{box}
{head}
{summary}
<div class="grid" id="results">
{chr(10).join(figures)}
</div></body></html>
"""


def write_results(out: str, query: str, hits: list[dict], images: dict[int, bytes], meta: dict) -> dict:
    """index.html, grid.png (K tiles, 5 per row) and results.json in ``out``."""
    os.makedirs(out, exist_ok=True)
    cols, rows = grid_shape(len(hits))
    grid = Image.new("RGB", (cols * TILE_W, rows * (TILE_H + LABEL_H)), "white")
    for i, h in enumerate(hits):
        grid.paste(_tile(images[h["position"]], h["rank"], h["score"], h["pid"], h["correct"]),
                   ((i % cols) * TILE_W, (i // cols) * (TILE_H + LABEL_H)))
    grid.save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(render_page(query, hits, images, meta))
    result = {"query": query, **meta, "hits": hits}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "query"


class SearchService:
    """A checkpoint and a gallery, loaded once, answering queries: a dataset's split (``gallery``) or a plain folder
    or bucket of image files (``images``); the gallery index is cached beside the checkpoint."""

    def __init__(self, checkpoint: str, gallery: str | None = None, images: str | None = None, split: str = "test",
                 device: str = "cpu", faiss_min: int = 20000, log=print):
        from tbps.checkpoint import load_method

        if (gallery is None) == (images is None):
            raise ValueError("give a dataset (--gallery URL) or a folder of images (--images DIR_or_URL), one of them")
        self.checkpoint, self.split, self.device = checkpoint, split, device
        self.gallery = gallery or images
        self.source = "images" if images else "shards"
        self.method, self.cfg, self.tok = load_method(checkpoint, data_url=gallery, device=device)
        self.index, self.cached = gallery_index(self.method, self.cfg, self.tok, checkpoint, self.gallery, split,
                                                device, faiss_min, log, images=images is not None)
        self.lock = threading.Lock()  # one query at a time through the model (the server answers in threads)

    def meta(self) -> dict:
        return {"checkpoint": self.checkpoint, "gallery": self.gallery, "split": self.split, "source": self.source,
                "gallery_size": len(self.index.keys), "index_cached": self.cached,
                "faiss": self.index._faiss is not None}

    def answer(self, query: str, top_k: int = 10) -> tuple[list[dict], dict[int, bytes], dict]:
        """(hits, original image bytes by gallery position, meta) for one query."""
        if top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {top_k}")
        with self.lock:
            t0 = time.perf_counter()
            scores, order = self.index.search(encode_queries(self.method, self.cfg, self.tok, [query], self.device),
                                              top_k)
            answer_ms = (time.perf_counter() - t0) * 1000
        qpid = self.index.caption_pids.get(normalise_caption(query))
        shared = qpid == SHARED_CAPTION  # a caption of several persons: correctness unknown
        qpid = None if shared else qpid
        hits = [{"rank": r + 1, "score": float(s), "position": int(p), "key": self.index.keys[p],
                 "pid": self.index.pids[p], "path": self.index.paths[p],
                 "correct": None if qpid is None else self.index.pids[p] == qpid}
                for r, (s, p) in enumerate(zip(scores[0].tolist(), order[0].tolist()))]
        images = fetch_images(self.index, [h["position"] for h in hits])
        return hits, images, {**self.meta(), "query_pid": qpid, "answer_ms": answer_ms,
                              **({"query_shared": True} if shared else {})}


def search(checkpoint: str, gallery: str | None, queries: list[str], top_k: int = 10, out: str = "search-results",
           split: str = "test", device: str = "cpu", faiss_min: int = 20000, log=print,
           images: str | None = None) -> list[dict]:
    """Answer each query; returns one result dict per query (also written under ``out``)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    service = SearchService(checkpoint, gallery, images, split, device, faiss_min, log)
    results = []
    for n, query in enumerate(queries):
        hits, found, meta = service.answer(query, top_k)
        folder = out if len(queries) == 1 else os.path.join(out, f"q{n + 1:03d}-{_slug(query)}")
        results.append(write_results(folder, query, hits, found, meta))
        log(f"\n“{query}” — answered in {meta['answer_ms']:.0f} ms ({'FAISS' if meta['faiss'] else 'exact matmul'}, "
            f"gallery of {meta['gallery_size']}): {folder}/index.html, {folder}/grid.png")
        for h in hits:
            mark = "" if h["correct"] is None else ("  correct" if h["correct"] else "  wrong")
            who = "" if h["pid"] < 0 else f"id {h['pid']:<6} "
            log(f"  #{h['rank']:<3} {h['score']:.4f}  {who}{h['path'] or h['key']}{mark}")
    return results


# ------------------------------------------------------------------------------------------------------ --serve
def make_server(service: SearchService, port: int = 8000, top_k: int = 10):
    """A local page on 127.0.0.1:``port`` (0 = a free port): a query box; ``/?q=TEXT&k=K`` answers it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if url.path != "/":
                self.send_error(404, "not found: the search page is /")
                return
            params = parse_qs(url.query)
            query = params.get("q", [""])[0].strip()
            try:
                k = int(params.get("k", [top_k])[0])
                if k > PAGE_MAX_K:  # a typed URL: the whole gallery inline in one page would stall the server
                    raise ValueError(f"k must be at most {PAGE_MAX_K} on this page, got {k}")
                hits, found, meta = service.answer(query, k) if query else ([], {}, {**service.meta(),
                                                                                      "top_k": top_k})
                body, status = render_page(query, hits, found, meta, form=True), 200
            except ValueError as e:
                body, status = f"<!doctype html><p>bad request: {html.escape(str(e))}</p>", 400
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # one line per request on stderr
            sys.stderr.write(f"[search] {self.address_string()} {fmt % args}\n")

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve(service: SearchService, port: int = 8000, top_k: int = 10, log=print) -> None:
    server = make_server(service, port, top_k)
    log(f"[search] serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv=None) -> int:
    from shards.cli import add_verbose, at_least

    ap = argparse.ArgumentParser(prog="python -m tbps.search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (a run's best/ or checkpoint_*)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", help="shards dataset URL (local dir or s3://...)")
    where.add_argument("--images", help="a plain folder or bucket prefix of image files (person crops), searched "
                                        "without conversion")
    ap.add_argument("query", nargs="*", help="query text(s)")
    ap.add_argument("--queries", help="file with one query per line")
    ap.add_argument("--split", default="test", help="gallery split (default test; --gallery only)")
    ap.add_argument("--top-k", type=at_least(1), default=10)
    ap.add_argument("--out", default="search-results", help="output directory (one subfolder per query if several)")
    ap.add_argument("--serve", action="store_true", help="serve a search page on 127.0.0.1 (type queries in a browser)")
    ap.add_argument("--port", type=at_least(0, 65535), default=8000, help="--serve: the port (0 = a free one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--faiss-min", type=at_least(0), default=20000, help="use FAISS for galleries at least this large")
    add_verbose(ap)
    args = ap.parse_args(argv)
    queries = list(args.query)
    if args.queries:
        with open(args.queries) as f:
            queries += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not queries and not args.serve:
        ap.error("give a query text, --queries FILE or --serve")
    from shards.cli import run_command

    def run() -> int:
        if args.serve:
            service = SearchService(args.checkpoint, args.gallery, args.images, args.split, args.device,
                                    args.faiss_min)
            serve(service, args.port, args.top_k)
        else:
            search(args.checkpoint, args.gallery, queries, args.top_k, args.out, args.split, args.device,
                   args.faiss_min, images=args.images)
        return 0
    return run_command("python -m tbps.search", run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
