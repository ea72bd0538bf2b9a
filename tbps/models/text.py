"""Text towers from transformers (CLIP text transformer, BERT), built from config or a local/s3 checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from shards.storage import local_copy

from .weights import WeightLoadError

KINDS = ("clip", "bert")


def dropout_settings(kind: str, dropout: float) -> dict:
    """The transformers config fields of ``model.text_dropout``: BERT's hidden and attention dropout (bert-base's own
    0.1 each; given explicitly, so a loaded checkpoint's config.json cannot set them behind the run's config). The
    CLIP text transformer has no dropout (OpenAI's has none): 0 only."""
    if not 0 <= dropout < 1:
        raise ValueError(f"model.text_dropout must be in [0, 1), got {dropout}")
    if kind == "clip":
        if dropout:
            raise ValueError(f"model.text_dropout={dropout}: the CLIP text transformer has no dropout layers "
                             f"(OpenAI's CLIP has none); it applies to a BERT text tower (model.text_tower=bert) and "
                             f"to IVT's shared tower")
        return {"attention_dropout": 0.0}
    return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def _config(kind: str, vocab_size: int, length: int, width: int, layers: int, heads: int, pad_id: int,
            bos_id: int | None, eos_id: int | None, activation: str = "auto", dropout: float = 0.0):
    from transformers import BertConfig, CLIPTextConfig

    act = {} if activation == "auto" else {"hidden_act": activation}  # auto: CLIP quick_gelu, BERT gelu
    if kind == "clip":
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=length,
                              pad_token_id=pad_id, projection_dim=width, bos_token_id=bos_id, eos_token_id=eos_id,
                              **act, **dropout_settings(kind, dropout))
    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=max(length, 512), pad_token_id=pad_id, **act,
                          **dropout_settings(kind, dropout))
    raise ValueError(f"model.text_tower must be one of {', '.join(KINDS)}, got {kind!r}")


class TextTower(nn.Module):
    """Returns token features ``[B, L, width]``; ``eot_feature`` picks the last real token (CLIP's end-of-text).

    The CLIP text transformer is causal, so a real token never sees padding: it runs without a padding mask, as
    OpenAI's and IRRA's code do, which also gives the padding positions OpenAI's features (IRRA's cross-modal
    encoder reads them). BERT gets the padding mask. ``dropout``: ``model.text_dropout`` (``dropout_settings``), also
    over a loaded checkpoint's own."""

    def __init__(self, kind: str, vocab_size: int, length: int, width: int = 512, layers: int = 12, heads: int = 8,
                 pad_id: int = 0, bos_id: int | None = None, eos_id: int | None = None, activation: str = "auto",
                 dropout: float = 0.0):
        super().__init__()
        from transformers import BertModel, CLIPTextModel

        self.kind = kind
        self.dropout_rate = dropout  # model.text_dropout, kept for load_pretrained
        cfg = _config(kind, vocab_size, length, width, layers, heads, pad_id, bos_id, eos_id, activation, dropout)
        cfg._attn_implementation = "sdpa"  # PyTorch's fused attention kernels (flash / memory-efficient on GPUs)
        self.model = CLIPTextModel(cfg) if kind == "clip" else BertModel(cfg, add_pooling_layer=False)
        self.width = width
        self.vocab_size = vocab_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            return self.model(input_ids=ids).last_hidden_state
        # BERT: the padding mask as SDPA's boolean mask [B, 1, 1, L] (True = attend), which transformers passes on as
        # it is; given the 2D mask, it would first read back whether any token is padding (a host synchronisation
        # per forward in eager mode) to leave the mask out when none is
        return self.model(input_ids=ids, attention_mask=mask.bool()[:, None, None, :]).last_hidden_state

    @staticmethod
    def eot_feature(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = mask.long().sum(dim=1) - 1
        return tokens[torch.arange(len(tokens), device=tokens.device), last]

    def load_pretrained(self, url: str) -> None:
        """Replace the randomly initialised model with ``from_pretrained`` of a local/s3 directory (no hub)."""
        from transformers import BertModel, CLIPTextModel

        cls = CLIPTextModel if self.kind == "clip" else BertModel
        try:
            path = local_copy(url)
        except FileNotFoundError:
            raise WeightLoadError(f"model.text_pretrained: checkpoint not found at {url}") from None
        try:
            kwargs = {"add_pooling_layer": False} if self.kind == "bert" else {}
            kwargs.update(dropout_settings(self.kind, self.dropout_rate))  # this run's, not the checkpoint's
            model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                              attn_implementation="sdpa", **kwargs)
        except Exception as e:
            raise WeightLoadError(f"model.text_pretrained: cannot load {url} as {cls.__name__}: "
                                  f"{type(e).__name__}: {e}") from None
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if problems:
            raise WeightLoadError(f"model.text_pretrained: checkpoint {url} does not fit {cls.__name__}: {problems}")
        if model.config.vocab_size != self.vocab_size:
            raise WeightLoadError(f"model.text_pretrained: {url} has vocab {model.config.vocab_size}, the tokenizer "
                                  f"{self.vocab_size}: use the tokenizer saved with the checkpoint")
        self.model = model
        self.width = model.config.hidden_size
