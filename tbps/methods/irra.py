"""IRRA (Jiang & Ye, CVPR 2023): SDM + implicit relation reasoning (IRR, cross-modal MLM) + ID loss.

IRR: the masked caption's token features are the queries of one cross-attention layer over all image tokens, then
a ``cross_layers``-layer transformer, then an MLM head (Linear -> GELU -> LayerNorm -> Linear to the vocabulary);
cross-entropy on masked positions only. IRR is used in training only; retrieval uses the two global features.
"""

from __future__ import annotations

import torch
from torch import nn

from tbps import losses as L
from tbps.data.stream import DataNeeds

from .base import Method, register
from .towers import build_towers, image_global, text_global


class CrossModalEncoder(nn.Module):
    def __init__(self, width: int, heads: int, layers: int, vocab_size: int):
        super().__init__()
        self.ln_text = nn.LayerNorm(width)
        self.ln_image = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_post_attn = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width),
                                      nn.Linear(width, vocab_size))

    def forward(self, text_tokens, image_tokens, text_pad_mask=None):
        q = self.ln_text(text_tokens)
        kv = self.ln_image(image_tokens)
        x = self.cross_attn(q, kv, kv, need_weights=False)[0]
        x = self.transformer(self.ln_post_attn(x), src_key_padding_mask=text_pad_mask)
        return self.mlm_head(self.ln_post(x))


@register("irra")
class IRRA(Method):
    supported_losses = ("sdm", "itc", "mlm", "id")
    backbone_prefixes = ("image_tower.", "text_tower.")
    method_fields = {"mask_ratio": "mlm", "cross_layers": "mlm", "cross_heads": "mlm"}

    def __init__(self, cfg, text, num_classes):
        super().__init__(cfg, text, num_classes)
        build_towers(self, cfg, text)
        e = cfg.model.embed_dim
        if self.wants("mlm"):
            self.cross = CrossModalEncoder(e, cfg.method.cross_heads, cfg.method.cross_layers, text.vocab_size)
        if self.wants("id"):
            self.classifier = nn.Linear(e, num_classes)

    def data_needs(self):
        return DataNeeds(mlm_ratio=self.mcfg.mask_ratio if self.wants("mlm") else 0.0)

    def _image_tokens(self, images):
        return self.image_proj(self.image_tower(images))

    def encode_image(self, images):
        return image_global(self, self._image_tokens(images))

    def encode_text(self, ids, mask):
        return self.text_proj(text_global(self, self.text_tower(ids, mask), mask))

    def losses(self, batch):
        image_tokens = self._image_tokens(batch["images"])
        v = image_global(self, image_tokens)
        t = self.encode_text(batch["text_ids"], batch["text_mask"])
        out = {}
        for kind in ("sdm", "itc"):
            if self.wants(kind):
                out[kind] = self.contrastive(kind, v, t, batch["pids"])
        if self.wants("mlm"):
            masked = self.text_proj(self.text_tower(batch["mlm_ids"], batch["text_mask"]))
            logits = self.cross(masked, image_tokens, text_pad_mask=~batch["text_mask"].bool())
            out["mlm"] = L.mlm_loss(logits, batch["mlm_labels"])
        if self.wants("id"):
            out["id"] = L.id_loss(self.classifier(v), self.classifier(t), batch["train_ids"])
        return out
