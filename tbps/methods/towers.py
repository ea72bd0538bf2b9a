"""Two-tower scaffolding shared by CLIP, IRRA and PCC: timm image tower + transformers text tower + projections."""

from __future__ import annotations

from torch import nn

from tbps.models import ImageTower, TextTower


def build_towers(module: nn.Module, cfg, text) -> None:
    m = cfg.model
    module.image_tower = ImageTower(m.image_tower, tuple(cfg.data.image_size), m.patch_stride, m.drop_path,
                                    m.image_overrides)
    module.text_tower = TextTower(m.text_tower, text.vocab_size, text.length, m.text_width, m.text_layers,
                                  m.text_heads, text.pad_id, text.bos_id, text.eos_id)
    if m.image_pretrained:
        module.image_tower.load_pretrained(m.image_pretrained)
    if m.text_pretrained:
        module.text_tower.load_pretrained(m.text_pretrained)
    # projections into the joint space apply to every token (as CLIP's do), so token features live there too
    module.image_proj = nn.Linear(module.image_tower.width, m.embed_dim, bias=False)
    module.text_proj = nn.Linear(module.text_tower.width, m.embed_dim, bias=False)


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
