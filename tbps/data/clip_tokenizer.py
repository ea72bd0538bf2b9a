"""CLIP's BPE tokenizer with IRRA's mask token, built from the vocabulary file open_clip_torch ships (no download).

Ids equal OpenAI's tokenizer (``clip.tokenize``; open_clip's ``SimpleTokenizer``): the same cleaning (ftfy, HTML
unescape twice, whitespace collapse, lower case), ``<|startoftext|>`` (49406) ... ``<|endoftext|>`` (49407), zero
padding, and truncation that keeps the end token. As in IRRA's tokenizer, the last BPE vocabulary entry gives its id
to ``<|mask|>`` (49405), so the vocabulary stays 49,408 and OpenAI's embedding table fits as it is. That entry is the
merge ``jeky + ll</w>`` ("jekyll"); we drop the merge too, so "jekyll" becomes the two tokens "jeky", "ll" (IRRA's
tokenizer raises a KeyError on that word).

The object offers the small part of the transformers tokenizer interface the pipeline uses (``__call__`` with
padding/truncation, ``len``, ``*_token_id``, ``all_special_ids``), so a transformers tokenizer directory and this
one are interchangeable in ``data.tokenizer``.
"""

from __future__ import annotations

import torch

NAME = "clip"  # the data.tokenizer value that selects this tokenizer
MASK_TOKEN = "<|mask|>"


class ClipTokenizer:
    vocab_size = 49408
    pad_token_id = 0  # OpenAI pads with zeros (id 0 is also "!"; IRRA never masks it, nor do we)
    mask_token_id = 49405
    bos_token_id = 49406  # <|startoftext|>
    eos_token_id = 49407  # <|endoftext|>
    cls_token_id = None
    sep_token_id = None

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer  # ships bpe_simple_vocab_16e6.txt.gz

        bpe = SimpleTokenizer(context_length=None)
        if len(bpe.encoder) != self.vocab_size:
            raise RuntimeError(f"open_clip's CLIP vocabulary has {len(bpe.encoder)} entries, expected {self.vocab_size}")
        last_merge = max(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
        last_token = "".join(last_merge)
        if bpe.encoder.get(last_token) != self.mask_token_id:
            raise RuntimeError(f"unexpected CLIP vocabulary: id {self.mask_token_id} is not the last merge")
        del bpe.bpe_ranks[last_merge]  # never produce the token whose id <|mask|> takes
        del bpe.encoder[last_token]
        bpe.encoder[MASK_TOKEN] = self.mask_token_id
        bpe.decoder[self.mask_token_id] = MASK_TOKEN
        bpe.cache.pop(last_token, None)
        self._bpe = bpe
        self.all_special_ids = [self.pad_token_id, self.mask_token_id, self.bos_token_id, self.eos_token_id]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption after CLIP's cleaning, without start/end tokens."""
        return self._bpe.encode(text)

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.pad_token_id,)]
        return self._bpe.decode(keep)

    def __call__(self, texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"):
        if isinstance(texts, str):
            texts = [texts]
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("ClipTokenizer pads to max_length and returns torch tensors")
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.bos_token_id] + self.encode(text) + [self.eos_token_id]
            if len(tokens) > max_length:
                if not truncation:
                    raise ValueError(f"caption of {len(tokens)} tokens exceeds {max_length}: {text[:80]!r}")
                tokens = tokens[:max_length]
                tokens[-1] = self.eos_token_id  # truncation keeps the end token (its feature is the caption's)
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}
