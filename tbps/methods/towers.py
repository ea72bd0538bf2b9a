"""The two-tower base class of CLIP, IRRA and PCC (timm image tower + transformers text tower + projections, the
global features and the loss loop they share) and loading whole-CLIP weights into it (the towers *and* CLIP's
projections, so training starts in CLIP's joint space)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tbps import losses as L
from tbps.config import LOGIT_SCALE_MAX
from tbps.models import ImageTower, TextTower, WeightLoadError, load_into
from tbps.models.clip import ClipCheckpoint, openai_text_to_transformers, openai_visual_to_timm, unknown_keys

from .base import Method


class TwoTower(Method):
    """Base of CLIP, IRRA and PCC: a timm image tower and a transformers text tower, each with a bias-free projection
    into the joint space (applied to every token, as CLIP's are), global features by ``model.image_pool`` /
    ``model.text_pool``, the contrastive losses over the two global features, and CLIP / tower weight loading."""

    backbone_prefixes = ("image_tower.", "text_tower.", "image_proj.", "text_proj.")
    head_prefixes = ("classifier.",)
    contrastive_kinds = ("itc", "sdm")  # batch-level losses over (v, t) this method may be configured with

    def __init__(self, config, model, image_size, text, num_classes: int):
        super().__init__(config, text, num_classes)
        overrides = dict(model.image_overrides)
        if model.activation != "auto":
            overrides["act_layer"] = model.activation
        self.image_pool, self.text_pool, self.embed_dim = model.image_pool, model.text_pool, model.embed_dim
        self.image_tower = ImageTower(model.image_tower, tuple(image_size), model.patch_stride, model.drop_path,
                                      overrides)
        self.text_tower = TextTower(model.text_tower, text.vocab_size, text.length, model.text_width,
                                    model.text_layers, model.text_heads, text.pad_id, text.bos_id, text.eos_id,
                                    model.activation, model.text_dropout)
        self.image_proj = nn.Linear(self.image_tower.width, model.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_tower.width, model.embed_dim, bias=False)

    def add_classifier(self, std: float | None = 0.001) -> None:
        """The ID classifier over the joint embedding (``id`` loss); ``std``: N(0, std) weights and zero bias (IRRA's
        code base, which runs the CLIP baseline too), None = PyTorch's default init."""
        if self.wants("id"):
            self.classifier = nn.Linear(self.embed_dim, self.num_classes)
            if std is not None:
                nn.init.normal_(self.classifier.weight, std=std)
                nn.init.zeros_(self.classifier.bias)

    # -- weights
    def load_tower_weights(self, image_url: str, text_url: str) -> None:
        """``model.image_pretrained`` / ``model.text_pretrained``: the towers alone (projections stay as built)."""
        if image_url:
            self.image_tower.load_pretrained(image_url)
        if text_url:
            self.text_tower.load_pretrained(text_url)

    def load_pretrained(self, checkpoint) -> None:
        load_clip(self, checkpoint)

    # -- features
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every image token, projected into the joint space."""
        return self.image_proj(self.image_tower(images))

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_tower(ids, mask))

    def image_global(self, tokens: torch.Tensor) -> torch.Tensor:
        """The global image feature from (projected) tokens: CLS (the papers) or the mean of the patch tokens."""
        if self.image_pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.image_tower.num_prefix_tokens:].mean(dim=1)

    def text_global(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The global text feature of (tower or projected) tokens: end-of-text token (CLIP/IRRA) or the mean of the real tokens (from-scratch
        training: every token contributes from the first step instead of waiting for attention to route into EOT)."""
        if self.text_pool == "eot":
            return self.text_tower.eot_feature(tokens, mask)
        m = mask.to(tokens.dtype)[..., None]
        return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)

    def encode_image(self, images):
        return self.image_global(self.image_tokens(images))

    def encode_text(self, ids, mask):
        return self.text_proj(self.text_global(self.text_tower(ids, mask), mask))  # pool, then project (linear)

    # -- training
    def token_losses(self, batch: dict, image_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses that read the image tokens (IRRA's MLM); none by default."""
        return {}

    def features(self, batch):
        image_tokens = self.image_tokens(batch["images"])
        v = self.image_global(image_tokens)
        t = self.encode_text(batch["text_ids"], batch["text_mask"])
        local = self.token_losses(batch, image_tokens)
        if self.wants("id"):
            local["id"] = L.id_loss(self.classifier(v), self.classifier(t), batch["train_ids"])
        return {"v": v, "t": t, "pids": batch["pids"]}, local

    def batch_losses(self, f):
        return {kind: self.contrastive(kind, f["v"], f["t"], f["pids"]) for kind in self.contrastive_kinds
                if self.wants(kind)}


def load_clip(module: TwoTower, ckpt: ClipCheckpoint) -> None:
    """Both towers, both projections and (for a learnable temperature) the logit scale from a CLIP checkpoint."""
    what = "model.pretrained"
    extra = unknown_keys(ckpt.state)
    if extra:
        raise WeightLoadError(f"{what}: checkpoint {ckpt.source} has keys no CLIP conversion reads (an unsupported "
                              f"variant): {', '.join(extra[:12])}")
    if module.text_tower.kind != "clip":
        raise WeightLoadError(f"{what}: a CLIP checkpoint needs model.text_tower=clip, got "
                              f"{module.text_tower.kind!r}")
    sd = ckpt.state
    try:
        image = openai_visual_to_timm(sd, tuple(module.image_tower.vit.patch_embed.grid_size))
        own = module.text_tower.model.state_dict()
        prefix = "text_model." if "text_model.final_layer_norm.weight" in own else ""
        text = openai_text_to_transformers(sd, module.text_tower.model.config.max_position_embeddings, prefix)
        image_proj, text_proj = sd["visual.proj"].t(), sd["text_projection"].t()
    except KeyError as e:
        raise WeightLoadError(f"{what}: checkpoint {ckpt.source} lacks key {e}") from None
    load_into(module.image_tower.vit, image, ckpt.source, what + " (image tower)")
    load_into(module.text_tower.model, text, ckpt.source, what + " (text tower)")
    for name, weight in (("image_proj", image_proj), ("text_proj", text_proj)):
        layer = getattr(module, name)
        if layer.weight.shape != weight.shape:
            raise WeightLoadError(f"{what}: {name} is {tuple(layer.weight.shape)}, the checkpoint's "
                                  f"{tuple(weight.shape)}")
        with torch.no_grad():
            layer.weight.copy_(weight)
    if isinstance(module.log_scale, nn.Parameter) and "logit_scale" in sd:
        with torch.no_grad():  # CLIP stores log(1/tau)
            module.log_scale.copy_(sd["logit_scale"].reshape(1).clamp(max=math.log(LOGIT_SCALE_MAX)))
