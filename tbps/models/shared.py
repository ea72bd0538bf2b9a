"""IVT's shared tower: one ViT serving both modalities, as the official model (model/backbones/vit_vl.py,
``UVT_Bert_IMG_TXT_MASK``) builds it.

Attention and LayerNorms (eps 1e-6) are shared; every block has one GELU FFN per modality. Images enter through a
patch conv (stride = patch, or smaller for overlapping patches) + CLS + position embedding + an image-only,
per-position type embedding [1, N+1, D], then dropout; text through BERT's embeddings (word + position + token type
0, LayerNorm eps 1e-12, dropout) and nothing else. Output: the CLS token of each modality (no projection head).

Bidirectional mask modelling (BMM), in training: per forward, one count k ~ U{0..floor(r * N)} over the N token
positions (CLS and, for text, padding included: training batches come padded to their longest caption, as the
official ``padding='longest'``; ``tbps.data.text.trim_padding``) and one set of k positions (never CLS) removed from
every sequence of the batch.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from .checkpointing import BlockStack
from .clip import resize_grid
from .weights import WeightLoadError, read_state_dict


@torch.compiler.disable  # host-side work: always eager under train.compile (its draws read a value back anyway)
def bmm_keep(num_tokens: int, max_drop: float, generator: torch.Generator | None = None,
             device=None) -> torch.Tensor:
    """Positions ``[n_keep]`` (ascending, 0 = CLS always kept) that BMM keeps for a whole batch: k ~ U{0..floor(
    max_drop * num_tokens)} positions drawn from 1..num_tokens-1 are dropped (at most num_tokens - 1).

    Drawn on the host (CPU generator); on a CUDA device the positions reach it by an asynchronous copy from pinned
    memory, so the step never waits for the device here."""
    bound = min(int(max_drop * num_tokens), num_tokens - 1)
    k = int(torch.randint(0, bound + 1, (), generator=generator))
    order = torch.randperm(num_tokens - 1, generator=generator) + 1  # the first k are dropped, the rest kept
    keep = torch.cat([torch.zeros(1, dtype=torch.long), order[k:].sort().values])
    if device is None or torch.device(device).type == "cpu":
        return keep
    if torch.device(device).type == "cuda":
        return keep.pin_memory().to(device, non_blocking=True)
    return keep.to(device)


class SharedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True, attn_drop=attn_dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict({"image": Mlp(dim, hidden, drop=dropout), "text": Mlp(dim, hidden, drop=dropout)})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.drop_path(self.mlp[modality](self.norm2(x)))


class SharedTower(BlockStack):
    """``drop_path``: stochastic depth, linear from 0 at the first block to this at the last (IVT 0.1);
    ``text_dropout``: dropout after BERT's embedding LayerNorm (BERT's hidden_dropout_prob, IVT 0.1); ``dropout``
    / ``attn_dropout``: after the image embeddings, in the FFNs and attention projections / on attention weights
    (IVT 0)."""

    def __init__(self, vocab_size: int, text_length: int, image_size: tuple[int, int], width: int = 768,
                 layers: int = 12, heads: int = 12, patch: int = 16, stride: int = 0, pad_id: int = 0,
                 drop_path: float = 0.0, text_dropout: float = 0.0, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        stride = stride or patch
        self.patch = patch
        self.grid = grid_of(image_size, patch, stride)
        tokens = 1 + self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(3, width, patch, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.type_embed = nn.Parameter(torch.zeros(1, tokens, width))  # image-only, per position
        self.image_dropout = nn.Dropout(dropout)
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(text_length, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.text_norm = nn.LayerNorm(width, eps=1e-12)
        self.text_dropout = nn.Dropout(text_dropout)
        self.blocks = nn.ModuleList(SharedBlock(width, heads, drop_path=drop_path * i / max(1, layers - 1),
                                                dropout=dropout, attn_dropout=attn_dropout) for i in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.width = width
        self._init_weights()

    def _init_weights(self) -> None:
        """CLS / position / type embeddings: truncated normal(0.02), as the official model. The type embedding is the
        one table every official run keeps from initialisation (ImageNet ViT + BERT overwrite the rest). Layers keep
        PyTorch's / timm's defaults and text embeddings BERT's N(0, 0.02); the official truncated-normal Linear init
        is :meth:`init_linear_official` (``method.linear_init``; always overwritten when the weights load)."""
        for p in (self.cls_token, self.pos_embed, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)

    def init_linear_official(self) -> None:
        """The official ``_init_weights`` of the Linear layers (``method.linear_init: trunc_normal``): weights from a
        normal of std 0.02 truncated at +-2 (timm's ``trunc_normal_``), biases zero. (Its LayerNorm init, ones and
        zeros, is PyTorch's default.) ImageNet ViT and BERT weights overwrite all of them when they load."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_image(self, images: torch.Tensor, bmm_max_drop: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed + self.type_embed
        x = self.image_dropout(x)
        if bmm_max_drop > 0:
            x = x[:, bmm_keep(x.shape[1], bmm_max_drop, generator, x.device)]
        for blk in self.blocks:
            x = self.run_block(blk, x, "image")
        return self.norm(x)[:, 0]

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.text_dropout(self.text_norm(x))

    def forward_text(self, ids: torch.Tensor, mask: torch.Tensor, bmm_max_drop: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        x, keep = self.embed_text(ids), mask.bool()
        if bmm_max_drop > 0:
            kept = bmm_keep(x.shape[1], bmm_max_drop, generator, x.device)
            x, keep = x[:, kept], keep[:, kept]
        attn_mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        attn_mask = attn_mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
        for blk in self.blocks:
            x = self.run_block(blk, x, "text", attn_mask)
        return self.norm(x)[:, 0]

    # ------------------------------------------------------------------------------------------ initialisation
    def load_mapped(self, mapped: dict[str, torch.Tensor], required: list[str], source: str, what: str):
        own = self.state_dict()
        unknown = [k for k in mapped if k not in own]
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
                  if k in own and v.shape != own[k].shape]
        missing = [k for k in required if k not in mapped]
        if unknown or shapes or missing:
            raise WeightLoadError(f"{what}: checkpoint {source} does not fit the IVT shared tower; "
                                  f"missing keys: {missing[:12]}; shape mismatch: {shapes[:12]}; "
                                  f"unmapped: {unknown[:12]}")
        self.load_state_dict(mapped, strict=False)

    def load_vit(self, url: str) -> None:
        """Attention, norms, image FFNs, patch/CLS/position embeddings from a timm ViT checkpoint; the square position
        grid resized bilinearly (no antialias), CLS kept, as the official ``resize_pos_embed``."""
        sd = read_state_dict(url, "model.image_pretrained")
        mapped = {}
        for k, v in sd.items():
            if k == "patch_embed.proj.weight":
                mapped["patch_embed.weight"] = v
            elif k == "patch_embed.proj.bias":
                mapped["patch_embed.bias"] = v
            elif k == "pos_embed":
                mapped["pos_embed"] = resize_grid(v[0], self.grid)
            elif k == "cls_token" or k.startswith("norm."):
                mapped[k] = v
            elif k.startswith("blocks."):
                i, rest = k.split(".", 2)[1:]
                if rest.startswith("mlp."):
                    rest = "mlp.image." + rest[4:]
                if int(i) < len(self.blocks):
                    mapped[f"blocks.{i}.{rest}"] = v
        required = [k for k in self.state_dict() if not self._is_text_key(k) and k != "type_embed"]
        self.load_mapped(mapped, required, url, "model.image_pretrained")

    def load_bert(self, url: str) -> None:
        """Text embeddings and text FFNs from a BERT checkpoint (transformers layout, with or without 'bert.')."""
        sd = read_state_dict(url, "model.text_pretrained")
        mapped = {}
        for k, v in sd.items():
            k = k[5:] if k.startswith("bert.") else k
            if k.startswith("embeddings."):
                name = self._text_embedding_key(k[len("embeddings."):])
                if name:
                    mapped[name] = self._fit_positions(name, v)
            elif k.startswith("encoder.layer."):
                i, rest = k.split(".", 3)[2:]
                if int(i) >= len(self.blocks):
                    continue
                if rest.startswith("intermediate.dense."):
                    mapped[f"blocks.{i}.mlp.text.fc1.{rest.rsplit('.', 1)[1]}"] = v
                elif rest.startswith("output.dense."):
                    mapped[f"blocks.{i}.mlp.text.fc2.{rest.rsplit('.', 1)[1]}"] = v
        required = [k for k in self.state_dict() if self._is_text_key(k)]
        self.load_mapped(mapped, required, url, "model.text_pretrained")

    def _fit_positions(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """BERT's 512-row position table cut to data.text_length rows."""
        if name == "position_embeddings.weight":
            n = self.position_embeddings.num_embeddings
            if len(v) < n:
                raise WeightLoadError(f"the checkpoint has {len(v)} text positions; data.text_length is {n}")
            return v[:n]
        return v

    @staticmethod
    def _text_embedding_key(name: str) -> str:
        """BERT embedding names -> ours ('' for buffers such as position_ids)."""
        if name.startswith("LayerNorm."):
            return "text_norm." + name[len("LayerNorm."):]
        if name.startswith(("word_embeddings.", "position_embeddings.", "token_type_embeddings.")):
            return name
        return ""

    @staticmethod
    def _is_text_key(k: str) -> bool:
        return k.startswith(("word_embeddings", "position_embeddings", "token_type_embeddings", "text_norm")) or \
            ".mlp.text." in k


def grid_of(image_size, patch: int, stride: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of a conv with kernel ``patch`` and ``stride`` over ``image_size`` (height, width)."""
    return (image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1


# ---------------------------------------------------------------------------------------- official IVT checkpoints
IVT_UNUSED = ("temp", "classifier_img.", "bottleneck_img.", "encoder_fusion.", "itm.")  # not part of retrieval


def is_ivt_state(sd: dict) -> bool:
    """An official IVT checkpoint's state dict (DDP's ``module.`` prefix or not)?"""
    return any(k.removeprefix("module.").startswith("encoder_vl.") for k in sd)


def ivt_to_ours(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official IVT keys (``encoder_vl.*`` of ``build_transformer_uvt_img_txt_mask`` or of the pretraining model)
    -> SharedTower keys. Returns (mapped, ignored): ignored = the official model's parts retrieval never uses (the
    unused temperature, BNNeck and ID classifier, the pretraining fusion encoder and ITM head). Any other key is an
    error naming it."""
    out, ignored, unknown = {}, [], []
    for key, v in sd.items():
        k = key.removeprefix("module.")
        if not k.startswith("encoder_vl."):
            (ignored if k.startswith(IVT_UNUSED) else unknown).append(key)
            continue
        k = k[len("encoder_vl."):]
        if k.startswith("embeddings."):
            name = SharedTower._text_embedding_key(k[len("embeddings."):])
            if name:
                out[name] = v
            elif k != "embeddings.position_ids":
                unknown.append(key)
        elif k.startswith("patch_embed.proj."):
            out["patch_embed." + k[len("patch_embed.proj."):]] = v
        elif k in ("cls_token", "pos_embed", "type_embed") or k.startswith("norm."):
            out[k] = v
        elif k.startswith("blocks."):
            out[k.replace(".mlp_vis.", ".mlp.image.").replace(".mlp_txt.", ".mlp.text.")] = v
        else:
            unknown.append(key)
    if unknown:
        raise WeightLoadError(f"model.pretrained: {source} has keys of no IVT model tbps knows: "
                              f"{', '.join(unknown[:12])}")
    return out, ignored
