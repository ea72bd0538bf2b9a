"""Two-tower scaffolding shared by CLIP, IRRA and PCC: timm image tower + transformers text tower + projections,
and loading whole-CLIP weights into them (the towers *and* CLIP's projections, so training starts in CLIP's joint
space)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tbps.models import ImageTower, TextTower, WeightLoadError, load_into
from tbps.models.clip import ClipCheckpoint, openai_text_to_transformers, openai_visual_to_timm, unknown_keys


def build_towers(module: nn.Module, cfg, text) -> None:
    m = cfg.model
    overrides = dict(m.image_overrides)
    if m.activation != "auto":
        overrides["act_layer"] = m.activation
    module.image_tower = ImageTower(m.image_tower, tuple(cfg.data.image_size), m.patch_stride, m.drop_path, overrides)
    module.text_tower = TextTower(m.text_tower, text.vocab_size, text.length, m.text_width, m.text_layers,
                                  m.text_heads, text.pad_id, text.bos_id, text.eos_id, m.activation)
    # projections into the joint space apply to every token (as CLIP's do), so token features live there too
    module.image_proj = nn.Linear(module.image_tower.width, m.embed_dim, bias=False)
    module.text_proj = nn.Linear(module.text_tower.width, m.embed_dim, bias=False)


def load_tower_weights(module: nn.Module, image_url: str, text_url: str) -> None:
    """``model.image_pretrained`` / ``model.text_pretrained``: the towers alone (projections stay as built)."""
    if image_url:
        module.image_tower.load_pretrained(image_url)
    if text_url:
        module.text_tower.load_pretrained(text_url)


def load_clip(module: nn.Module, ckpt: ClipCheckpoint) -> None:
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
            module.log_scale.copy_(sd["logit_scale"].reshape(1).clamp(max=math.log(100.0)))


def image_global(module: nn.Module, tokens):
    """The global image feature from (projected) tokens: CLS (the papers) or the mean of the patch tokens."""
    pool = module.cfg.model.image_pool
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, module.image_tower.num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"model.image_pool must be cls or mean, got {pool!r}")


def text_global(module: nn.Module, tokens, mask):
    """The global text feature: end-of-text token (CLIP/IRRA) or the mean of the real tokens (from-scratch
    training: every token contributes from the first step instead of waiting for attention to route into EOT)."""
    pool = module.cfg.model.text_pool
    if pool == "eot":
        return module.text_tower.eot_feature(tokens, mask)
    if pool == "mean":
        m = mask.to(tokens.dtype)[..., None]
        return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    raise ValueError(f"model.text_pool must be eot or mean, got {pool!r}")
