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
