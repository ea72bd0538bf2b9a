"""Text side of the pipeline: tokenizers from a local path or s3:// URL, BERT-style MLM masking, IVT's MLA levels."""

from __future__ import annotations

import os
import random
from typing import Iterable

import torch

from .clip_tokenizer import NAME as CLIP_TOKENIZER
from .clip_tokenizer import ClipTokenizer
from shards.storage import local_copy

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def build_tokenizer(captions: Iterable[str], out_dir: str, min_frequency: int = 1):
    """Train a small word-level tokenizer on captions and save it as a transformers tokenizer directory.

    This is the offline default (ToyPEDES): no hub download. Real datasets use the CLIP BPE or BERT tokenizer
    of the chosen text tower, given by path.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=min_frequency)
    tok.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id),
                                                                                                ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str):
    """``clip`` (CLIP's BPE with IRRA's mask token, built in: ``tbps.data.clip_tokenizer``), or a transformers
    tokenizer directory, local or on s3:// (any fsspec URL); never from a hub."""
    from transformers import AutoTokenizer

    if not path:
        raise FileNotFoundError("no tokenizer path given (data.tokenizer)")
    if path == CLIP_TOKENIZER:
        return ClipTokenizer()
    try:
        local = local_copy(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer not found at {path} (data.tokenizer)") from None
    if not os.path.isdir(local):
        raise FileNotFoundError(f"tokenizer not found at {path} (data.tokenizer): expected a directory written by "
                                "save_pretrained")
    tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer at {path} lacks a mask or pad token; MLM and padding need both")
    return tok


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[len(texts), length]``, truncated and right-padded to ``length``. A transformers
    tokenizer pads only to the longest text and torch pads the rest: the same tensors, and a long ``length`` (the ivt
    preset's 512) costs nothing -- padding 28 captions to 512 inside the tokenizer took 3x the time of padding to 100.
    The built-in CLIP tokenizer fills fixed-length tensors itself."""
    if isinstance(tokenizer, ClipTokenizer) or getattr(tokenizer, "padding_side", "right") != "right":
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    extra = length - ids.shape[1]
    if extra > 0:
        ids = torch.nn.functional.pad(ids, (0, extra), value=tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0)
    return ids, mask


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int], ratio: float,
                mask_id: int, vocab_size: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for IRRA's implicit relation reasoning, as IRRA's data pipeline does it.

    Eligible: real tokens that are not special (with the CLIP tokenizer: 0 < id < 49405). Each is selected with
    probability ``ratio``; a selected token becomes the mask token (80 %), a random non-special token (10 %; CLIP:
    1..49404) or stays (10 %). A caption where nothing was selected gets its first eligible token (IRRA: position 1,
    the first word) replaced by the mask token. Returns (masked_ids, labels), labels -100 where not selected.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype)
    real = attention_mask.bool() & ~torch.isin(input_ids, special)
    u = torch.rand(input_ids.shape, generator=generator)
    selected = (u < ratio) & real
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked[to_mask] = mask_id
    is_special = torch.zeros(vocab_size, dtype=torch.bool)
    is_special[special[special < vocab_size]] = True
    allowed = (~is_special).nonzero()[:, 0].to(input_ids.dtype)
    masked[to_random] = allowed[torch.randint(len(allowed), (int(to_random.sum()),), generator=generator)]
    # at least one per caption that has an eligible token: the first one, always to the mask token
    none = ~selected.any(dim=1) & real.any(dim=1)
    if none.any():
        rows = none.nonzero()[:, 0]
        first = real.to(torch.uint8).argmax(dim=1)[rows]
        selected[rows, first] = True
        masked[rows, first] = mask_id
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def mlm_rows(labels: torch.Tensor, multiple: int = 64) -> int:
    """The rows IRRA's MLM head computes for a batch (``mlm_rows``): its masked tokens (labels != -100), rounded up
    to a multiple of ``multiple`` so that compiled graphs see few distinct shapes, at most every position. Any bound
    at least the count gives the same loss (the extra rows are unmasked positions, ignored); the loader counts it on
    the CPU, where counting on the GPU would cost a device sync every step."""
    count = int((labels != -100).sum())
    return max(1, min(labels.numel(), -(-count // multiple) * multiple))


# ------------------------------------------------------------------------------------------------- IVT's MLA levels
def trim_padding(ids: torch.Tensor, mask: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut right padding down to ``length`` or the longest caption of ``mask`` (any leading shape), as the official
    IVT tokenizer call pads to 'longest'. Masked padding leaves the CLS outputs unchanged; BMM's position count
    (padding included) then matches the official one. The loader gives the length (``mla_length``): measured on a
    GPU tensor it would cost a device sync every step."""
    if length is None:
        length = max(1, int(mask.sum(dim=-1).max()))
    return ids[..., :length], mask[..., :length]


def _longest_and_rest(sentences: list[str]) -> list[str]:
    """Per sentence: its longest comma clause (the first, on ties) and the other clauses re-joined by ',' -- each kept
    if longer than 5 characters before trimming spaces, as the official code filters them."""
    out = []
    for sentence in sentences:
        clauses = sentence.split(",")
        i = max(range(len(clauses)), key=lambda k: (len(clauses[k]), -k))
        rest = (",".join(clauses[:i]) + "," + ",".join(clauses[i + 1:])).strip(",")
        out += [c for c in (clauses[i], rest) if len(c) > 5]
    return [c.strip(" ") for c in out]


def phrase_pieces(caption: str) -> list[str]:
    """IVT's phrase-level candidates (processor.get_phrase_level_txt): the caption split into sentences on '.'
    (after stripping '.', '[' and ']' from its ends), and per sentence the longest comma clause and the rest."""
    return _longest_and_rest(caption.strip(".").strip("[").strip("]").split("."))


def word_fallback_pieces(caption: str) -> list[str]:
    """IVT's word-level candidates for a caption without attribute phrases (datasets/bases.py ``split_txt``): as
    ``phrase_pieces`` but only '.' stripped from the ends."""
    return _longest_and_rest(caption.strip(".").split("."))


def clause_pieces(caption: str) -> list[str]:
    """IVT's word-level candidates on ICFG-PEDES and RSTPReid (datasets/bases.py ``ImageDatasetLevelICFG`` and
    ``ImageDatasetLevelRSTP``): the caption split into sentences on '.' (after stripping '.', '[' and ']' from its
    ends), each sentence into its comma clauses, each clause kept if longer than 5 characters before trimming
    spaces."""
    sentences = caption.strip(".").strip("[").strip("]").split(".")
    return [c.strip(" ") for sentence in sentences for c in sentence.split(",") if len(c) > 5]


MLA_WORD_RULES = ("attributes", "clauses")
CLAUSE_DATASETS = ("icfg-pedes", "rstpreid")  # shards.build's names of the datasets IVT's clause rule is for


def mla_word_rule(setting: str, dataset: str) -> str:
    """``data.mla_words`` for a dataset (its manifest's ``dataset``): ``auto`` is the rule IVT's own loader for that
    dataset uses -- ``clauses`` on ICFG-PEDES and RSTPReid, ``attributes`` (CUHK-PEDES's) everywhere else."""
    if setting == "auto":
        return "clauses" if dataset in CLAUSE_DATASETS else "attributes"
    if setting not in MLA_WORD_RULES:
        raise ValueError(f"data.mla_words must be auto, attributes or clauses, got {setting!r}")
    return setting


def mla_texts(caption: str, rng: random.Random, attributes: list[str] | None = None,
              words: str = "attributes") -> tuple[str, str, str]:
    """IVT multi-level alignment texts (sentence, phrase, word) as the official training builds them.

    sentence: the caption, lower-cased. phrase: one of ``phrase_pieces``. word, by ``words`` (``mla_word_rule``):
    ``attributes`` (CUHK-PEDES's loader) -- a random non-empty subset of the caption's attribute phrases (uniform
    size, then a uniform subset, in drawn order) joined by ','; without attribute phrases, one of
    ``word_fallback_pieces``; ``clauses`` (ICFG-PEDES's and RSTPReid's loaders) -- one of ``clause_pieces``,
    attribute phrases unused. Where the official code would sample from an empty list (a caption with no piece over
    5 characters) the level is the caption itself.
    """
    caption = caption.lower()
    phrases = phrase_pieces(caption)
    phrase = rng.choice(phrases) if phrases else caption
    if words == "clauses":
        pieces = clause_pieces(caption)
        word = rng.choice(pieces) if pieces else caption
    elif attributes:
        word = ",".join(rng.sample(attributes, rng.randint(1, len(attributes))))
    else:
        pieces = word_fallback_pieces(caption)
        word = rng.choice(pieces) if pieces else caption
    return caption, phrase, word or caption
