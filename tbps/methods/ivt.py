"""IVT (Shu et al., ECCV 2022 workshops): one shared network, multi-level alignment (MLA), bidirectional mask
modelling (BMM), CMPM over every image view and every text level.

Training batch: ``images`` [B, 3, C, H, W] (three augmented views) and ``mla_ids``/``mla_mask`` [B, 3, L]
(sentence, phrase, word). All 3B images and 3B texts go through one CMPM whose positives are all same-id pairs,
across levels too. BMM drops a random 0..``method.mask_ratio`` fraction of the tokens of both modalities.
"""

from __future__ import annotations

import torch
from torch import nn

from tbps import losses as L
from tbps.data.stream import DataNeeds
from tbps.models import SharedTower

from .base import Method, register


@register("ivt")
class IVT(Method):
    supported_losses = ("cmpm", "sdm", "id")
    backbone_prefixes = ("tower.",)
    method_fields = {"mask_ratio": "", "mla_word_max": ""}

    def __init__(self, cfg, text, num_classes):
        super().__init__(cfg, text, num_classes)
        m = cfg.model
        patch = int(m.image_overrides.get("patch_size", 16))
        self.tower = SharedTower(text.vocab_size, text.length, tuple(cfg.data.image_size), m.shared_width,
                                 m.shared_layers, m.shared_heads, patch=patch, stride=m.patch_stride,
                                 pad_id=text.pad_id, drop_path=m.drop_path)
        if self.wants("id"):
            self.classifier = nn.Linear(m.shared_width, num_classes)

    def load_tower_weights(self, image_url, text_url):
        if image_url:
            self.tower.load_vit(image_url)
        if text_url:
            self.tower.load_bert(text_url)

    def data_needs(self):
        return DataNeeds(views=3, mla=True, mla_word_max=self.mcfg.mla_word_max)

    def encode_image(self, images):
        return self.tower.forward_image(images)

    def encode_text(self, ids, mask):
        return self.tower.forward_text(ids, mask)

    def losses(self, batch):
        images = batch["images"]
        if images.ndim == 4:  # a single view (e.g. a plain batch): treat as one level
            images = images[:, None]
        ids = batch.get("mla_ids", batch["text_ids"][:, None])
        mask = batch.get("mla_mask", batch["text_mask"][:, None])
        B, V = images.shape[:2]
        r = self.mcfg.mask_ratio if self.training else 0.0
        v = self.tower.forward_image(images.flatten(0, 1), drop_ratio=r)  # [B*V, D]
        t = self.tower.forward_text(ids.flatten(0, 1), mask.flatten(0, 1), drop_ratio=r)  # [B*levels, D]
        pids_v = batch["pids"].repeat_interleave(V)
        pids_t = batch["pids"].repeat_interleave(ids.shape[1])
        if len(pids_v) != len(pids_t):
            raise ValueError(f"IVT needs as many image views as text levels, got {V} and {ids.shape[1]}")
        out = {}
        for kind in ("cmpm", "sdm"):
            if self.wants(kind):
                out[kind] = self.contrastive(kind, v, t, pids_v)
        if self.wants("id"):
            out["id"] = L.id_loss(self.classifier(v), self.classifier(t), batch["train_ids"].repeat_interleave(V))
        return out
