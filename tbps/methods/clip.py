"""CLIP-style baseline: two towers, global features (CLS / end-of-text), symmetric InfoNCE (ITC)."""

from __future__ import annotations

import torch
from torch import nn

from tbps import losses as L

from .base import Method, register
from .towers import build_towers, image_global, load_clip, load_tower_weights, text_global


@register("clip")
class CLIP(Method):
    supported_losses = ("itc", "sdm", "id")
    backbone_prefixes = ("image_tower.", "text_tower.", "image_proj.", "text_proj.")
    head_prefixes = ("classifier.",)

    def __init__(self, cfg, text, num_classes):
        super().__init__(cfg, text, num_classes)
        build_towers(self, cfg, text)
        if self.wants("id"):
            self.classifier = nn.Linear(cfg.model.embed_dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)  # as IRRA's code base, which runs this baseline too
            nn.init.zeros_(self.classifier.bias)

    def load_tower_weights(self, image_url, text_url):
        load_tower_weights(self, image_url, text_url)

    def load_pretrained(self, checkpoint):
        load_clip(self, checkpoint)

    def encode_image(self, images):
        return image_global(self, self.image_proj(self.image_tower(images)))

    def encode_text(self, ids, mask):
        return self.text_proj(text_global(self, self.text_tower(ids, mask), mask))

    def features(self, batch):
        v = self.encode_image(batch["images"])
        t = self.encode_text(batch["text_ids"], batch["text_mask"])
        local = {}
        if self.wants("id"):
            local["id"] = L.id_loss(self.classifier(v), self.classifier(t), batch["train_ids"])
        return {"v": v, "t": t, "pids": batch["pids"]}, local

    def batch_losses(self, f):
        return {kind: self.contrastive(kind, f["v"], f["t"], f["pids"]) for kind in ("itc", "sdm") if self.wants(kind)}
