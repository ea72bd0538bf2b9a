"""Readers for the raw annotation formats of CUHK-PEDES, ICFG-PEDES and RSTPReid.

Each reader returns plain records; images are checked separately (``load_image``) so that every problem with the
input is found before a single shard is written.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class RawFormat:
    annotation_file: str
    path_field: str
    splits: tuple[str, ...]


FORMATS: dict[str, RawFormat] = {
    "cuhk-pedes": RawFormat("reid_raw.json", "file_path", ("train", "val", "test")),
    "icfg-pedes": RawFormat("ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstpreid": RawFormat("data_captions.json", "img_path", ("train", "val", "test")),
}

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "GIF": "gif"}


@dataclass
class RawRecord:
    index: int  # position in the annotation list, for error messages
    split: str
    pid: int  # the dataset's own person id
    path: str  # image path relative to <root>/imgs
    captions: list[str] = field(default_factory=list)


class BadRecord(ValueError):
    """One annotation record (or its image) is unusable. The message names the file and the record."""

    is_user_error = True  # shards.cli: one message and exit code 2, no traceback

    def __init__(self, file: str, index: int | None, reason: str, path: str | None = None):
        self.file, self.index, self.reason, self.path = file, index, reason, path
        where = file if index is None else f"{file}: record #{index}"
        if path:
            where += f" ({path})"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable with its fields (raised in shards/corpus.py's writer processes)
        return BadRecord, (self.file, self.index, self.reason, self.path)

    def as_dict(self) -> dict:
        return {"file": self.file, "record": self.index, "path": self.path, "reason": self.reason}


def _parse_record(fmt: RawFormat, file: str, index: int, raw) -> RawRecord:
    if not isinstance(raw, dict):
        raise BadRecord(file, index, f"expected a JSON object, got {type(raw).__name__}")
    path = raw.get(fmt.path_field)
    label = path if isinstance(path, str) else None
    missing = [k for k in ("split", "id", fmt.path_field, "captions") if k not in raw]
    if missing:
        raise BadRecord(file, index, f"missing field(s) {', '.join(repr(m) for m in missing)}", label)
    split = raw["split"]
    if split not in fmt.splits:
        raise BadRecord(file, index, f"unknown split {split!r} (expected one of {', '.join(fmt.splits)})", label)
    pid = raw["id"]
    if isinstance(pid, str) and pid.strip().lstrip("-").isdigit():
        pid = int(pid)
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise BadRecord(file, index, f"'id' must be an integer, got {raw['id']!r}", label)
    if not isinstance(path, str) or not path.strip():
        raise BadRecord(file, index, f"{fmt.path_field!r} must be a non-empty string, got {path!r}")
    if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
        raise BadRecord(file, index, f"{fmt.path_field!r} must be relative to imgs/ and stay inside it", path)
    captions = raw["captions"]
    if not isinstance(captions, list) or not captions:
        raise BadRecord(file, index, "'captions' must be a non-empty list", path)
    cleaned = []
    for j, cap in enumerate(captions):
        if not isinstance(cap, str):
            raise BadRecord(file, index, f"caption {j} is not a string ({type(cap).__name__})", path)
        cap = " ".join(cap.split())
        if not cap:
            raise BadRecord(file, index, f"caption {j} is empty", path)
        cleaned.append(cap)
    return RawRecord(index=index, split=split, pid=pid, path=path, captions=cleaned)


def read_annotations(dataset: str, root: str, skip_bad: bool = False) -> tuple[list[RawRecord], list[BadRecord]]:
    """Parse and validate ``<root>/<annotation file>``. Returns (records, skipped)."""
    if dataset not in FORMATS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(FORMATS)}")
    fmt = FORMATS[dataset]
    file = os.path.join(root, fmt.annotation_file)
    if not os.path.isfile(file):
        raise BadRecord(file, None, f"annotation file not found (a {dataset} root holds {fmt.annotation_file} "
                                    "and imgs/)")
    with open(file, "rb") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise BadRecord(file, None, f"not UTF-8 text at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadRecord(file, None, f"not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise BadRecord(file, None, f"expected a JSON list of records, got {type(data).__name__}")
    records, skipped = [], []
    for index, raw in enumerate(data):
        try:
            records.append(_parse_record(fmt, file, index, raw))
        except BadRecord as e:
            if not skip_bad:
                raise
            skipped.append(e)
    return records, skipped


def load_image(root: str, record: RawRecord, file: str) -> tuple[bytes, str]:
    """Read an image's original bytes and check that it decodes. Returns (bytes, extension)."""
    path = os.path.join(root, "imgs", record.path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadRecord(file, record.index, f"image not found: {path}", record.path) from None
    except OSError as e:
        raise BadRecord(file, record.index, f"cannot read image {path}: {e}", record.path) from None
    return data, check_image(data, file, record.index, record.path, path)


def check_image(data: bytes, file: str, index: int | None, path: str | None, where: str | None = None) -> str:
    """Check that image bytes decode; returns the file extension of their format. Errors name the record."""
    where = where or path
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt == "JPEG":  # decode at 1/8 scale: enough to find truncated or corrupt files, ~10x cheaper
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRecord(file, index, f"cannot decode image {where}: {e}", path) from None
    if fmt not in IMAGE_EXT:
        raise BadRecord(file, index, f"unsupported image format {fmt} ({where})", path)
    return IMAGE_EXT[fmt]
