"""IVT's shared tower: one ViT serving both modalities.

Attention and LayerNorms are shared; every block has one FFN per modality (mixture-of-modality-experts style).
Images enter through a patch conv (stride = patch, or smaller for overlapping patches) + CLS + position + a type
embedding; text through BERT-style embeddings (word + position + token type, LayerNorm) + a type embedding.
Output: the CLS token of each modality (no projection head).
Bidirectional mask modelling (BMM) drops a random 0..r fraction of tokens of both modalities in training (CLS kept).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Attention
from torch import nn

from .weights import WeightLoadError, read_state_dict


def bmm_image_keep(batch: int, num_tokens: int, ratio_max: float, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """Indices ``[B, n_keep]`` of image tokens kept (index 0 = CLS, always kept). One ratio ~ U(0, ratio_max) per
    call so the batch stays rectangular; which patches go is drawn per sample."""
    patches = num_tokens - 1
    ratio = float(torch.rand((), generator=generator)) * ratio_max
    n_drop = min(int(ratio * patches), patches - 1)
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)[:, : patches - n_drop] + 1
    keep = torch.cat([torch.zeros(batch, 1, dtype=torch.long), order.sort(dim=1).values], dim=1)
    return keep.to(device) if device is not None else keep


def bmm_text_keep(mask: torch.Tensor, ratio_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask over caption tokens: drops floor(ratio * real) of each caption's real tokens (position 0,
    the CLS token, is never dropped), ratio ~ U(0, ratio_max) per call."""
    mask = mask.bool()
    ratio = float(torch.rand((), generator=generator)) * ratio_max
    droppable = mask.clone()
    droppable[:, 0] = False
    n_drop = (droppable.sum(dim=1).float() * ratio).floor().long()  # [B]
    score = torch.rand(mask.shape, generator=generator).to(mask.device)
    score = torch.where(droppable, score, torch.full_like(score, 2.0))  # only droppable tokens can rank first
    rank = score.argsort(dim=1).argsort(dim=1)
    dropped = rank < n_drop[:, None]
    return mask & ~dropped


class SharedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict({"image": Mlp(dim, hidden), "text": Mlp(dim, hidden)})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.drop_path(self.mlp[modality](self.norm2(x)))


class SharedTower(nn.Module):
    def __init__(self, vocab_size: int, text_length: int, image_size: tuple[int, int], width: int = 768,
                 layers: int = 12, heads: int = 12, patch: int = 16, stride: int = 0, pad_id: int = 0,
                 drop_path: float = 0.0):
        super().__init__()
        stride = stride or patch
        self.patch, self.stride = patch, stride
        self.grid = ((image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1)
        self.patch_embed = nn.Conv2d(3, width, patch, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], width) * 0.02)
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(text_length, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.text_norm = nn.LayerNorm(width, eps=1e-12)
        self.type_embed = nn.Parameter(torch.zeros(2, width))  # modality type: 0 image, 1 text
        self.blocks = nn.ModuleList(SharedBlock(width, heads, drop_path=drop_path * i / max(1, layers - 1))
                                    for i in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.width = width
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)  # BERT init; N(0, 1) positions would drown the words

    def forward_image(self, images: torch.Tensor, drop_ratio: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed + self.type_embed[0]
        if drop_ratio > 0:
            keep = bmm_image_keep(len(x), x.shape[1], drop_ratio, generator, x.device)
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x, "image")
        return self.norm(x)[:, 0]

    def forward_text(self, ids: torch.Tensor, mask: torch.Tensor, drop_ratio: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        x = self.text_norm(x) + self.type_embed[1]
        keep = mask.bool()
        if drop_ratio > 0:
            keep = bmm_text_keep(keep, drop_ratio, generator)
        attn_mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        attn_mask = attn_mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, "text", attn_mask)
        return self.norm(x)[:, 0]

    # ------------------------------------------------------------------------------------------ initialisation
    def _load_mapped(self, mapped: dict[str, torch.Tensor], required: list[str], source: str, what: str):
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
        """Attention, norms, image FFNs, patch/CLS/position embeddings from a timm ViT checkpoint."""
        sd = read_state_dict(url, "model.image_pretrained")
        mapped = {}
        for k, v in sd.items():
            if k == "patch_embed.proj.weight":
                mapped["patch_embed.weight"] = v
            elif k == "patch_embed.proj.bias":
                mapped["patch_embed.bias"] = v
            elif k == "pos_embed":
                mapped["pos_embed"] = resample_abs_pos_embed(v, new_size=list(self.grid), num_prefix_tokens=1)
            elif k == "cls_token" or k.startswith("norm."):
                mapped[k] = v
            elif k.startswith("blocks."):
                i, rest = k.split(".", 2)[1:]
                if rest.startswith("mlp."):
                    rest = "mlp.image." + rest[4:]
                if int(i) < len(self.blocks):
                    mapped[f"blocks.{i}.{rest}"] = v
        required = [k for k in self.state_dict() if not self._is_text_key(k) and k != "type_embed"]
        self._load_mapped(mapped, required, url, "model.image_pretrained")

    def load_bert(self, url: str) -> None:
        """Text embeddings and text FFNs from a BERT checkpoint (transformers layout, with or without 'bert.')."""
        sd = read_state_dict(url, "model.text_pretrained")
        mapped = {}
        n = self.position_embeddings.num_embeddings
        for k, v in sd.items():
            k = k[5:] if k.startswith("bert.") else k
            if k.startswith("embeddings."):
                name = k[len("embeddings."):]
                if name == "position_embeddings.weight":
                    v = v[:n]
                if name.startswith("LayerNorm."):
                    name = "text_norm." + name[len("LayerNorm."):]
                if name.startswith(("word_embeddings.", "position_embeddings.", "token_type_embeddings.",
                                    "text_norm.")):
                    mapped[name] = v
            elif k.startswith("encoder.layer."):
                i, rest = k.split(".", 3)[2:]
                if int(i) >= len(self.blocks):
                    continue
                if rest.startswith("intermediate.dense."):
                    mapped[f"blocks.{i}.mlp.text.fc1.{rest.rsplit('.', 1)[1]}"] = v
                elif rest.startswith("output.dense."):
                    mapped[f"blocks.{i}.mlp.text.fc2.{rest.rsplit('.', 1)[1]}"] = v
        required = [k for k in self.state_dict() if self._is_text_key(k)]
        self._load_mapped(mapped, required, url, "model.text_pretrained")

    @staticmethod
    def _is_text_key(k: str) -> bool:
        return k.startswith(("word_embeddings", "position_embeddings", "token_type_embeddings", "text_norm")) or \
            ".mlp.text." in k
