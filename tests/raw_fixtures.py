"""Writers of small raw datasets in the three original annotation formats (images drawn by PIL)."""

from __future__ import annotations

import io
import json
import os

from PIL import Image

from shards.readers import FORMATS


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", (24, 64), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_records(dataset: str) -> list[dict]:
    """train: 4 ids x 2 images, val/test (where the format has them): 2 ids x 2 images; captions vary in count."""
    fmt = FORMATS[dataset]
    records, n = [], 0
    pid_base = {"train": 100, "val": 200, "test": 300}
    for split in fmt.splits:
        ids = 4 if split == "train" else 2
        for p in range(ids):
            for j in range(2):
                n += 1
                ext = "png" if n % 3 == 0 else "jpg"
                captions = [f"person {pid_base[split] + p} picture {j} caption {c}." for c in range(1 + n % 2 + 1)]
                records.append({"split": split, "id": pid_base[split] + p * 7,
                                fmt.path_field: f"{split}/p{p}/img{j}.{ext}", "captions": captions})
    return records


def write_raw(root: str, dataset: str, records: list[dict] | None = None, raw_json: str | None = None) -> list[dict]:
    fmt = FORMATS[dataset]
    records = make_records(dataset) if records is None else records
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    for i, rec in enumerate(records):
        path = rec.get(fmt.path_field)
        if not isinstance(path, str):
            continue
        full = os.path.join(root, "imgs", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if not os.path.exists(full):
            with open(full, "wb") as f:
                f.write(image_bytes(i, "PNG" if path.endswith(".png") else "JPEG"))
    with open(os.path.join(root, fmt.annotation_file), "w") as f:
        f.write(raw_json if raw_json is not None else json.dumps(records))
    return records
