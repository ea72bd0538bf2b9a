"""Retrieval: embedding a split, and a gallery index that answers free-text queries.

- ``embed``: one pass over an evaluation loader (``tbps.data.EvalStream``: each gallery image once, its captions
  as queries) through a method's encoders. The evaluation pass (``tbps.eval.evaluate``: the engine's val/test and
  ``tbps.evaluate``) and the search gallery both embed through it, so search ranks images exactly as evaluation
  embeds them (same decode, resize and normalisation).
- ``GalleryIndex``: a split's image side (or a plain folder's images: ``list_images``, ``ImageFolderStream``) as
  search vectors (``Method.search_vectors``: inner products equal the
  method's similarity), with pids, shard keys and paths; ranked by torch or, for large galleries, a FAISS
  inner-product index. ``gallery_index`` caches it beside the checkpoint, keyed by (checkpoint, gallery, split).
- ``encode_queries`` and ``fetch_images`` (original bytes of some gallery entries) complete a search.

Imports no Ray, DeepSpeed or argparse.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass, field

import torch

from shards.storage import filesystem, join, write_bytes_atomic
from tbps.data.text import trim_padding

INDEX_FORMAT = 4  # part of every cache key: 2 = images decoded upright by their EXIF orientation (indexes built
# before embedded photos with an orientation tag sideways, and are rebuilt); 3 = a caption of several persons maps to
# SHARED_CAPTION (format 2 kept its first person's id, and marked hits of the others wrong); 4 = a dataset's images
# decoded as the checkpoint's data.decode says (before: large JPEGs always at reduced scale)
SHARED_CAPTION = -1  # caption_pids' value for a caption that several persons of the split have


class NonFiniteEmbeddingsError(ValueError):
    """A model's embeddings hold NaN or inf values. Ranks computed from them would be meaningless -- every comparison
    with NaN is false, so each correct image would rank first and a diverged model score R1 100 -- so evaluation and
    search stop with this error (a user error: one message)."""

    is_user_error = True


def nonfinite_rows(vectors: torch.Tensor) -> int:
    """How many rows of ``vectors`` hold a NaN or an infinity."""
    if vectors.numel() == 0:
        return 0
    return int((~torch.isfinite(vectors.reshape(len(vectors), -1))).any(dim=1).sum())


def nonfinite_message(counts: dict[str, tuple[int, int]]) -> str:
    """``counts``: what -> (rows with NaN or inf, rows) -- the message of :class:`NonFiniteEmbeddingsError`."""
    parts = " and ".join(f"{bad} of {total} {what}" for what, (bad, total) in counts.items() if bad)
    return (f"the model's embeddings are not finite: {parts} have NaN or inf values, so its weights are probably "
            "not finite (a diverged run, or a checkpoint saved from one); nothing can be ranked from them")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def embed(model, loader, device="cpu", autocast_dtype=None, keep_strings: bool = False, texts: bool = True,
          progress=None) -> dict:
    """This rank's gallery and query embeddings with their pids and global indices, over ``loader``'s
    ``EvalBatch``es. ``keep_strings``: also the images' relative paths, shard keys and shard names and the raw
    captions; ``texts=False``: the captions are not embedded (``txt`` stays empty; their pids and strings are
    kept); ``progress(images_so_far)`` is called after each batch."""
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("img", "img_pid", "img_idx", "txt", "txt_pid", "txt_idx", "txt_img")}
    strings: dict[str, list] = {"img_path": [], "img_key": [], "img_shard": [], "caption": []}
    skipped, seen = [], 0
    for batch in loader:
        if "images" not in batch:  # a shard skipped with data.on_bad_shard=skip (its images are missing)
            skipped += batch.get("skipped_shards", [])
            continue
        if texts and model.text_padding == "longest":  # cut on the host: no device sync
            batch["text_ids"], batch["text_mask"] = trim_padding(batch["text_ids"], batch["text_mask"])
        batch = _to(batch, device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            parts["img"].append(model.encode_image(batch["images"]).float())
            if texts:
                parts["txt"].append(model.encode_text(batch["text_ids"], batch["text_mask"]).float())
        parts["img_pid"].append(batch["image_pids"])
        parts["img_idx"].append(batch["image_index"])
        parts["txt_pid"].append(batch["text_pids"])
        parts["txt_idx"].append(batch["text_index"])
        parts["txt_img"].append(batch["text_image"])
        if keep_strings:
            strings["img_path"] += batch["image_path"]
            strings["img_key"] += batch["image_key"]
            strings["img_shard"] += batch["image_shard"]
            strings["caption"] += batch["captions"]
        seen += len(batch["image_index"])
        if progress:
            progress(seen)
    out = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    out["skipped_shards"] = skipped
    if keep_strings:
        out.update(strings)
    return out


# ------------------------------------------------------------------------------------------------ gallery index
@dataclass
class GalleryIndex:
    vectors: torch.Tensor  # [N, D] search vectors (image side), float32, in split order
    pids: list[int]
    keys: list[str]
    shards: list[str]
    paths: list[str]
    caption_pids: dict[str, int]  # normalised caption -> pid (SHARED_CAPTION: several), for queries from the dataset
    url: str
    split: str
    source: str = "shards"  # shards (a tbps dataset's split) | images (a plain folder or bucket of image files)
    _faiss: object = field(default=None, repr=False)

    STATE = ("vectors", "pids", "keys", "shards", "paths", "caption_pids", "url", "split", "source")

    def __post_init__(self):  # built or read from the cache: a diverged model's index ranks nothing
        bad = nonfinite_rows(self.vectors) if self.vectors is not None else 0
        if bad:
            raise NonFiniteEmbeddingsError(nonfinite_message({"gallery images": (bad, len(self.vectors))}))

    def use_faiss(self) -> None:
        import faiss

        index = faiss.IndexFlatIP(self.vectors.shape[1])  # exact inner product, BLAS-batched
        index.add(self.vectors.numpy().astype("float32"))
        self._faiss = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, positions) of the top ``k`` gallery images per query vector."""
        k = min(k, len(self.keys))
        if self._faiss is not None:
            scores, idx = self._faiss.search(queries.float().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        scores = queries.float() @ self.vectors.t()
        # stable ranking: ties keep gallery order, as in evaluation
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return scores.gather(1, order), order

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}


def normalise_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def index_key(checkpoint: str, gallery: str, split: str) -> str:
    """Identifies (checkpoint weights, gallery content): meta.json + config.yaml of the checkpoint, the gallery's
    manifest (shard hashes included) and the split."""
    from tbps.checkpoint import read_text

    h = hashlib.sha256()
    for part in (read_text(join(checkpoint, "meta.json")), read_text(join(checkpoint, "config.yaml")),
                 read_text(join(gallery, "manifest.json")), split, str(INDEX_FORMAT)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@torch.no_grad()
def _embed_images(method, loader, device: str, log, what: str, total: int | None = None):
    """One image-only ``embed`` pass with progress lines. Returns (its output, the order that sorts its rows by
    ``img_idx`` -- the gallery's order, whatever the loader workers' interleaving --, the sorted search vectors)."""
    t0 = time.time()

    def progress(n):
        if log:
            of = f" of {total}" if total is not None else ""
            log(f"[search] embedded {n}{of} {what} ({n / max(time.time() - t0, 1e-9):.0f}/s)")
    local = embed(method, loader, device, keep_strings=True, texts=False, progress=progress)
    order = local["img_idx"].argsort().tolist()
    vectors = method.search_vectors(local["img"], "image").cpu()[order] if order else None
    return local, order, vectors


def build_gallery(method, cfg, tok, gallery: str, split: str, device: str = "cpu", batch_size: int = 128,
                  log=None) -> GalleryIndex:
    """Embed the images of ``split`` of the dataset at ``gallery`` through the evaluation loader (a damaged shard
    stops it, naming the shard)."""
    from dataclasses import replace

    from tbps.data import build_eval_loader

    data = replace(cfg.data, url=gallery, on_bad_shard="error")
    local, order, vectors = _embed_images(method, build_eval_loader(data, tok, split, batch_size), device, log,
                                          "gallery images")
    if not order:
        raise ValueError(f"split {split!r} of {gallery} has no images")
    caption_pids: dict[str, int] = {}
    for caption, pid in zip(local["caption"], local["txt_pid"].tolist()):
        key = normalise_caption(caption)
        # a generic caption ("a man in black.") may describe several persons: then no hit is known to be right
        caption_pids[key] = int(pid) if caption_pids.get(key, pid) == pid else SHARED_CAPTION
    pids = local["img_pid"].tolist()
    return GalleryIndex(vectors, [int(pids[i]) for i in order], [local["img_key"][i] for i in order],
                        [local["img_shard"][i] for i in order], [local["img_path"][i] for i in order], caption_pids,
                        gallery, split)


# ------------------------------------------------------------------------------------- a folder of image files
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_images(url: str) -> list[tuple[str, str]]:
    """(path relative to ``url``, size and modification stamp) of every image file under the folder or bucket
    prefix ``url``, recursively, in name order."""
    from shards.storage import with_retries

    fs, root = filesystem(url)
    root = root.rstrip("/")
    if not with_retries("list", url, lambda: fs.isdir(root)):
        raise FileNotFoundError(f"--images {url}: no such folder")
    found = with_retries("list", url, lambda: fs.find(root, detail=True))
    items = []
    for path, info in sorted(found.items()):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
            items.append((path[len(root):].lstrip("/"), f"{info.get('size')}:{stamp}"))
    if not items:
        raise ValueError(f"--images {url}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return items


class ImageFolderStream(torch.utils.data.IterableDataset):
    """``EvalBatch``es of a folder's images (no captions, pids -1), decoded, resized and normalised as evaluation
    does (``data.decode`` included: a photo embeds as the same image in a dataset's gallery); loader workers take
    every n-th batch."""

    def __init__(self, url: str, paths: list[str], data_cfg, batch_size: int):
        from tbps.data.transforms import BatchAugment

        self.url, self.paths, self.cfg, self.batch_size = url, paths, data_cfg, batch_size
        self.augment = BatchAugment(data_cfg, train=False)

    def __iter__(self):
        import numpy as np

        from shards.storage import read_bytes
        from tbps.data.stream import decode_image, decode_target
        from tbps.data.transforms import resize_mode, resize_uint8

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        size, decode_hw, resize = tuple(self.cfg.image_size), decode_target(self.cfg), resize_mode(self.cfg, False)
        starts = range(0, len(self.paths), self.batch_size)
        for start in list(starts)[worker::workers]:
            rels = self.paths[start:start + self.batch_size]
            images = []
            for rel in rels:
                where = join(self.url, rel)
                try:
                    image = decode_image(read_bytes(where), decode_hw)
                except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
                    raise ValueError(f"{where}: not a readable image ({e}); remove it or convert it") from None
                images.append(resize_uint8(image, size, resize))
            n, empty = len(rels), torch.empty(0, dtype=torch.long)
            yield {"images": self.augment(torch.from_numpy(np.stack(images))),
                   "image_pids": torch.full((n,), -1, dtype=torch.long),
                   "image_index": torch.arange(start, start + n), "image_path": list(rels), "image_key": list(rels),
                   "image_shard": [""] * n, "text_ids": empty, "text_mask": empty, "text_pids": empty,
                   "text_index": empty, "text_image": empty, "captions": []}


def folder_key(checkpoint: str, url: str, listing: list[tuple[str, str]]) -> str:
    """Identifies (checkpoint weights, the folder's files as listed: names, sizes, modification stamps)."""
    from tbps.checkpoint import read_text

    h = hashlib.sha256()
    for part in (read_text(join(checkpoint, "meta.json")), read_text(join(checkpoint, "config.yaml")), url,
                 "\n".join(f"{p}\t{s}" for p, s in listing), str(INDEX_FORMAT)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def build_folder_gallery(method, cfg, url: str, paths: list[str], device: str = "cpu", batch_size: int = 64,
                         log=None) -> GalleryIndex:
    """Embed a plain folder's images (no dataset conversion)."""
    from torch.utils.data import DataLoader

    from tbps.data.stream import resolve_loader_workers

    stream = ImageFolderStream(url, paths, cfg.data, batch_size)
    workers = min(resolve_loader_workers(cfg.data.loader_workers), -(-len(paths) // batch_size))
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    local, order, vectors = _embed_images(method, loader, device, log, "images", total=len(paths))
    keys = [local["img_key"][i] for i in order]
    return GalleryIndex(vectors, [-1] * len(keys), keys, [""] * len(keys), keys, {}, url, "", "images")


# ------------------------------------------------------------------------------------------------ the cache
def gallery_index(method, cfg, tok, checkpoint: str, gallery: str, split: str = "test", device: str = "cpu",
                  faiss_min: int = 20000, log=print, images: bool = False) -> tuple[GalleryIndex, bool]:
    """The gallery index of a dataset split (or, with ``images``, of the plain folder ``gallery``): loaded from the
    cache beside the checkpoint, or built and cached. Returns (index, cached)."""
    if images:
        listing = list_images(gallery)
        name = f"images-{folder_key(checkpoint, gallery, listing)}.pt"
        where = f"in {gallery}"
    else:
        name = f"{split}-{index_key(checkpoint, gallery, split)}.pt"
        where = f"of {gallery} ({split})"
    url = join(checkpoint, "search-index", name)
    fs, path = filesystem(url)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), weights_only=True)
        index, cached = GalleryIndex(**state), True
        log(f"[search] gallery index: {len(index.keys)} images {where}, from the cache {url}")
    else:
        if images:
            index = build_folder_gallery(method, cfg, gallery, [p for p, _ in listing], device, log=log)
        else:
            index = build_gallery(method, cfg, tok, gallery, split, device, log=log)
        buf = io.BytesIO()
        torch.save(index.state(), buf)
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
    """Search vectors (text side) of free-text queries."""
    from tbps.data.text import tokenize

    ids, mask = tokenize(tok, queries, cfg.data.text_length)
    if method.text_padding == "longest":
        ids, mask = trim_padding(ids, mask)
    emb = method.encode_text(ids.to(device), mask.to(device)).float()
    return method.search_vectors(emb, "text").cpu()


def fetch_images(index: GalleryIndex, positions: list[int]) -> dict[int, bytes]:
    """Original image bytes of some gallery entries, reading only the shards (or files) that hold them."""
    from tbps.data.stream import IMAGE_KEYS, shard_samples

    if index.source == "images":
        from shards.storage import read_bytes

        return {p: read_bytes(join(index.url, index.keys[p])) for p in positions}

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
