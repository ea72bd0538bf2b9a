"""Park, Jeong, Kim, Kwak (arXiv 2501.00318): part-level correspondence. Our reading (docs/methods.md).

- Global embeddings: max pooling over each modality's projected token features (text: real tokens only).
- A part decoder shared by both modalities: K learnable part tokens (also shared) attend, layer by layer, to one
  modality's token features. The first layer's output gives the *coarse* parts, the last layer's the *fine* parts.
- Losses: SDM on the global embeddings and on the coarse embedding (mean of the coarse parts), the
  commonality-based margin ranking loss (CMR) on the fine parts, and optionally the ID loss.
- Retrieval: cos(global) + ``method.part_weight`` * mean_k cos(fine part k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbps import losses as L
from tbps.models.checkpointing import BlockStack

from .base import register
from .towers import TwoTower


class PartDecoder(BlockStack):
    def __init__(self, width: int, heads: int, layers: int, num_parts: int):
        super().__init__()
        self.part_tokens = nn.Parameter(torch.randn(1, num_parts, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None):
        x = self.part_tokens.expand(len(tokens), -1, -1)
        coarse = None
        for i, layer in enumerate(self.layers):
            x = self.run_block(layer, x, tokens, None, None, None, pad_mask)
            if i == 0:
                coarse = self.norm(x)
        return coarse, self.norm(x)


@register("pcc")
class PCC(TwoTower):
    contrastive_kinds = ("sdm", "itc")

    def __init__(self, config, model, image_size, text, num_classes):
        super().__init__(config, model, image_size, text, num_classes)
        heads = max(1, model.embed_dim // 64)
        self.decoder = PartDecoder(model.embed_dim, heads, config.decoder_layers, config.num_parts)
        self.add_classifier(std=None)

    # token features in the joint space
    def _image(self, images):
        tokens = self.image_tokens(images)
        return tokens, tokens.amax(dim=1), None

    def _text(self, ids, mask):
        tokens = self.text_tokens(ids, mask)
        pad = ~mask.bool()
        pooled = tokens.masked_fill(pad[..., None], torch.finfo(tokens.dtype).min).amax(dim=1)
        return tokens, pooled, pad

    def _embed(self, tokens, pooled, pad):
        coarse, fine = self.decoder(tokens, pad)
        return pooled, coarse, fine

    @staticmethod
    def _pack(glob, fine):
        """One tensor per item for retrieval: [global | part_1 | ... | part_K], each unit-normalised."""
        return torch.cat([F.normalize(glob, dim=-1)[:, None], F.normalize(fine, dim=-1)], dim=1).flatten(1)

    def encode_image(self, images):
        tokens, pooled, pad = self._image(images)
        glob, _, fine = self._embed(tokens, pooled, pad)
        return self._pack(glob, fine)

    def encode_text(self, ids, mask):
        tokens, pooled, pad = self._text(ids, mask)
        glob, _, fine = self._embed(tokens, pooled, pad)
        return self._pack(glob, fine)

    def similarity(self, text_emb, image_emb):
        e = self.embed_dim
        t = text_emb.view(len(text_emb), -1, e)
        v = image_emb.view(len(image_emb), -1, e)
        glob = t[:, 0] @ v[:, 0].t()
        parts = torch.einsum("ikd,jkd->ij", t[:, 1:], v[:, 1:]) / (t.shape[1] - 1)
        return glob + self.config.part_weight * parts

    def search_vectors(self, emb, side):
        # similarity = global . global + (w / K) * sum_k part_k . part_k: scale the text side's parts by w / K
        e = self.embed_dim
        x = emb.view(len(emb), -1, e).clone()
        if side == "text":
            x[:, 1:] *= self.config.part_weight / (x.shape[1] - 1)
        return x.flatten(1)

    def features(self, batch):
        vg, vc, vf = self._embed(*self._image(batch["images"]))
        tg, tc, tf = self._embed(*self._text(batch["text_ids"], batch["text_mask"]))
        local = {}
        if self.wants("id"):
            local["id"] = L.id_loss(self.classifier(vg), self.classifier(tg), batch["train_ids"])
        return {"vg": vg, "tg": tg, "vc": vc.mean(1), "tc": tc.mean(1), "vf": vf, "tf": tf,
                "pids": batch["pids"]}, local

    def batch_losses(self, f):
        out, pids = {}, f["pids"]
        for kind in ("sdm", "itc"):
            if self.wants(kind):
                out[kind] = self.contrastive(kind, f["vg"], f["tg"], pids) + self.contrastive(kind, f["vc"], f["tc"],
                                                                                             pids)
        if self.wants("cmr"):  # over this rank's (accumulated) batch: CMR does not gather
            out["cmr"] = L.cmr_loss(f["vf"], f["tf"], pids, self.config.margin, self.config.commonality)
        return out
