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
    cut: int = 0  # captions the caption rule cut (``CAPTION_RULES``)
    left_out: int = 0  # captions (image-caption pairs) the caption rule left out


# ``shards.build --caption-rule``: what happens to a raw caption before it is stored
CAPTION_RULES = ("as-is", "ivt")
IVT_MAX_WORDS = 90  # IVT's datasets/icfg_pedes.py and rstp_reid.py: ``_process_dataset(..., max_tok=90)``
IVT_RULE_DATASETS = {  # what IVT's dataset class does to a long caption (docs/methods.md, IVT: Other datasets)
    "icfg-pedes": f"cuts a caption of more than {IVT_MAX_WORDS} processed tokens before its "
                  f"{IVT_MAX_WORDS + 1}st token",
    "rstpreid": f"leaves out a pair whose caption has more than {IVT_MAX_WORDS} words",
}


def ivt_words(caption: str) -> list[str]:
    """A caption's words as IVT's RSTPReid reader counts them (``RSTPReID._split_word``): split on single spaces (two
    spaces give an empty word, which counts); a piece holding "." is split on "." (empty parts dropped), else one
    holding "," on ",", else one holding "?" on "?"."""
    words: list[str] = []
    for piece in caption.split(" "):
        for sep in (".", ",", "?"):
            if sep in piece:
                words += [part for part in piece.split(sep) if part]
                break
        else:
            words.append(piece)
    return words


def ivt_cut(caption: str, tokens: list[str]) -> str:
    """IVT's ICFG-PEDES reader (``ICFG_PEDES._process_dataset``): a caption of more than 90 processed tokens ends
    where the first occurrence of its 91st token begins, searched in the caption string (a substring search: the cut
    can fall inside an earlier word). Raises ``ValueError`` when that token is not in the caption (IVT's
    ``str.index`` fails there)."""
    if len(tokens) <= IVT_MAX_WORDS:
        return caption
    token = tokens[IVT_MAX_WORDS]
    at = caption.find(token)
    if at < 0:
        raise ValueError(f"its token {IVT_MAX_WORDS + 1}, {token!r}, is not in the caption text")
    return caption[:at]


def caption_rule_of(manifest: dict) -> str:
    """The caption rule a dataset was built with (``shards.build --caption-rule``; as-is before the option)."""
    return (manifest.get("caption_rule") or {}).get("name", "as-is")


def caption_rule_warning(method: str, manifest: dict, url: str) -> str | None:
    """Pre-flight's word on a dataset's caption rule, or None: IVT's ICFG-PEDES and RSTPReid loaders treat long
    captions their own way (``shards.build --caption-rule ivt``), which the other methods' official loaders do not."""
    dataset = manifest.get("dataset", "")
    rule = caption_rule_of(manifest)
    if method == "ivt" and rule != "ivt" and dataset in IVT_RULE_DATASETS:
        return (f"{url} ({dataset}) keeps every caption as written; IVT's {dataset} loader "
                f"{IVT_RULE_DATASETS[dataset]}: build the shards with `python -m shards.build --caption-rule ivt` "
                "to train and evaluate as IVT does (docs/methods.md)")
    if method != "ivt" and rule == "ivt":
        return (f"{url} was built with IVT's caption rule (shards.build --caption-rule ivt: {dataset}'s loader in IVT "
                f"{IVT_RULE_DATASETS.get(dataset, 'changes long captions')}); {method} reads captions as written: "
                "build the shards without --caption-rule for it")
    return None


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


def _parse_record(fmt: RawFormat, file: str, index: int, raw, dataset: str = "", caption_rule: str = "as-is") \
        -> RawRecord:
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
    for j, cap in enumerate(captions):
        if not isinstance(cap, str):
            raise BadRecord(file, index, f"caption {j} is not a string ({type(cap).__name__})", path)
        if not cap.split():
            raise BadRecord(file, index, f"caption {j} is empty", path)
    cut = left_out = 0
    if caption_rule == "ivt" and dataset == "icfg-pedes":
        tokens = raw.get("processed_tokens")
        if not isinstance(tokens, list) or len(tokens) < len(captions) or \
                not all(isinstance(t, list) and all(isinstance(w, str) for w in t) for t in tokens):
            raise BadRecord(file, index, "--caption-rule ivt needs 'processed_tokens', one list of token strings per "
                                         "caption (ICFG-PEDES.json has them): IVT cuts a caption of more than "
                                         f"{IVT_MAX_WORDS} of them", path)
        kept = []
        for j, (cap, toks) in enumerate(zip(captions, tokens)):
            try:
                short = ivt_cut(cap, toks)
            except ValueError as e:
                raise BadRecord(file, index, f"--caption-rule ivt: caption {j} has {len(toks)} processed tokens and "
                                             f"{e} (IVT's reader fails here too)", path) from None
            if not short.split():
                raise BadRecord(file, index, f"--caption-rule ivt: caption {j} is empty after IVT's cut at its token "
                                             f"{IVT_MAX_WORDS + 1}, {toks[IVT_MAX_WORDS]!r}, found at its start", path)
            cut += short != cap
            kept.append(short)
        captions = kept
    elif caption_rule == "ivt" and dataset == "rstpreid":
        kept = [cap for cap in captions if len(ivt_words(cap)) <= IVT_MAX_WORDS]
        left_out = len(captions) - len(kept)
        captions = kept
    cleaned = [" ".join(cap.split()) for cap in captions]
    return RawRecord(index=index, split=split, pid=pid, path=path, captions=cleaned, cut=cut, left_out=left_out)


def read_annotations(dataset: str, root: str, skip_bad: bool = False, caption_rule: str = "as-is") \
        -> tuple[list[RawRecord], list[BadRecord]]:
    """Parse and validate ``<root>/<annotation file>``. Returns (records, skipped). ``caption_rule="ivt"`` applies
    IVT's reader of the dataset to its captions (``IVT_RULE_DATASETS``; a record whose every caption it leaves out
    is returned with none)."""
    if dataset not in FORMATS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(FORMATS)}")
    if caption_rule not in CAPTION_RULES:
        raise ValueError(f"unknown caption rule {caption_rule!r}; expected one of {', '.join(CAPTION_RULES)}")
    if caption_rule == "ivt" and dataset not in IVT_RULE_DATASETS:
        raise ValueError(f"--caption-rule ivt applies to {' and '.join(IVT_RULE_DATASETS)} (IVT's {dataset} loader "
                         "keeps every caption whole): leave it out")
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
            records.append(_parse_record(fmt, file, index, raw, dataset, caption_rule))
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
