"""IRRA (Jiang & Ye, CVPR 2023): SDM + implicit relation reasoning (IRR, cross-modal MLM) + ID loss.

IRR, as the official code (model/build.py) builds it: the masked caption's token features (text tower + projection,
every position) are normalised (``ln_text``) and are the queries of one cross-attention layer over all normalised
image tokens (``ln_image``), with no residual; then ``cross_layers`` CLIP residual blocks (QuickGELU, no mask), a
LayerNorm, and the MLM head Linear -> QuickGELU -> LayerNorm -> Linear(vocab). Cross-entropy on masked positions only.
Initialisation: CLIP-style normal init of the cross-attention, blocks and MLM head; ID classifier N(0, 0.001), bias 0.
IRR is used in training only; retrieval uses the two global features.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import QuickGELU
from timm.models.vision_transformer import Block
from torch import nn

from tbps import losses as L
from tbps.data.needs import DataNeeds
from tbps.models.checkpointing import BlockStack

from .base import register
from .towers import TwoTower


class CrossModalEncoder(BlockStack):
    def __init__(self, width: int, heads: int, layers: int, vocab_size: int, pad_mask: bool = False):
        super().__init__()
        self.pad_mask = pad_mask
        self.ln_text = nn.LayerNorm(width)
        self.ln_image = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        # CLIP's residual block: timm's Block with CLIP's LayerNorm (eps 1e-5; timm's default is 1e-6) and QuickGELU
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True, act_layer=QuickGELU,
                                          norm_layer=nn.LayerNorm) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(OrderedDict([("dense", nn.Linear(width, width)), ("act", QuickGELU()),
                                                   ("ln", nn.LayerNorm(width)), ("fc", nn.Linear(width, vocab_size))]))
        self.reset_parameters(width, layers)

    @torch.no_grad()
    def reset_parameters(self, width: int, layers: int) -> None:
        """IRRA's initialisation (CLIP's text-transformer scheme at the encoder's width and depth)."""
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(blk.attn.qkv.bias)  # as nn.MultiheadAttention's in_proj_bias
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def forward(self, text_tokens, image_tokens, text_pad_mask=None, positions=None):
        """MLM logits [B, L, vocab] at every position, or [N, vocab] at ``positions`` (indices into the B * L
        flattened positions): the head (LayerNorm, MLP, vocabulary projection) acts on each position alone."""
        kv = self.ln_image(image_tokens)
        x = self.cross_attn(self.ln_text(text_tokens), kv, kv, need_weights=False)[0]
        attn_mask = None
        if self.pad_mask and text_pad_mask is not None:  # off by default: IRRA attends to padding too
            attn_mask = torch.zeros(text_pad_mask.shape, dtype=x.dtype, device=x.device)
            attn_mask = attn_mask.masked_fill(text_pad_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        for blk in self.blocks:
            x = self.run_block(blk, x, attn_mask)
        if positions is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, positions)
        return self.mlm_head(self.ln_post(x))


@register("irra")
class IRRA(TwoTower):
    # IRRA's solver raises the lr of parameters whose name holds "cross" (cross-attention, cross-modal transformer)
    # and of the classifier and MLM head; its cross-modal LayerNorms (ln_pre_t, ln_pre_i, ln_post) have no "cross" in
    # their names and stay at the base lr with CLIP -- matched here (docs/methods.md)
    backbone_prefixes = TwoTower.backbone_prefixes + ("cross.ln_",)
    head_prefixes = ("classifier.", "cross.mlm_head.")
    contrastive_kinds = ("sdm", "itc")

    def __init__(self, config, model, image_size, text, num_classes):
        super().__init__(config, model, image_size, text, num_classes)
        if self.wants("mlm"):
            self.cross = CrossModalEncoder(model.embed_dim, config.cross_heads, config.cross_layers, text.vocab_size,
                                           config.mlm_pad_mask)
        self.add_classifier(std=0.001)

    def load_pretrained(self, checkpoint):
        from .pretrained import IrraRun, load_irra_run

        if isinstance(checkpoint, IrraRun):
            load_irra_run(self, checkpoint)
        else:
            super().load_pretrained(checkpoint)

    def data_needs(self):
        return DataNeeds(mlm_ratio=self.config.mask_ratio if self.wants("mlm") else 0.0)

    def mlm_logits(self, batch, image_tokens, positions=None):
        masked = self.text_tokens(batch["mlm_ids"], batch["text_mask"])
        return self.cross(masked, image_tokens, text_pad_mask=~batch["text_mask"].bool(), positions=positions)

    def token_losses(self, batch, image_tokens):
        if not self.wants("mlm"):
            return {}
        labels, rows = batch["mlm_labels"], batch.get("mlm_rows")
        if rows is None:  # every position scored, as the official code does
            return {"mlm": L.mlm_loss(self.mlm_logits(batch, image_tokens), labels)}
        # the same loss with the head scoring only the masked positions (and, up to the loader's bound, some
        # unmasked ones, ignored): the masked ones first, found without a device sync; the vocabulary projection
        # over every position was ~7 % of the step's FLOPs and its fp32 logits several GB at batch 256
        flat = labels.reshape(-1)
        positions = torch.argsort((flat == -100).to(torch.int32), stable=True)[:rows]
        return {"mlm": L.mlm_loss(self.mlm_logits(batch, image_tokens, positions), flat[positions])}
