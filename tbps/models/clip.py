"""Whole-CLIP checkpoints: read OpenAI's, open_clip's and transformers' formats into one layout, read the architecture
from the weights (as OpenAI's ``build_model`` does), and convert them to our towers (timm ViT + transformers
``CLIPTextModel`` + the two projections).

The common layout is OpenAI's state dict (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``,
``visual.proj``, ``token_embedding.weight``, ``transformer.resblocks.N...``, ``ln_final``, ``text_projection``,
``logit_scale``), in fp32. Formats read:

- OpenAI's release files (``ViT-B-16.pt``): TorchScript archives holding fp16 weights, or a plain state dict;
- open_clip checkpoints (``open_clip_pytorch_model.bin`` / ``.safetensors``, or a training checkpoint holding
  ``state_dict`` with ``module.`` prefixes) of the standard ViT CLIP models (OpenAI's layout);
- a transformers ``CLIPModel`` directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed

from shards.storage import local_copy

from .weights import WEIGHT_FILES, WeightLoadError, read_state_dict

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints stored in OpenAI's archives
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


@dataclass
class ClipArch:
    """What a CLIP checkpoint's weights say about its architecture."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def text_heads(self) -> int:
        return self.text_width // 64


@dataclass
class ClipCheckpoint:
    state: dict[str, torch.Tensor]  # OpenAI layout, fp32
    arch: ClipArch
    format: str  # openai-torchscript | openai | open_clip | transformers
    activation: str  # what the format implies: quick_gelu (OpenAI, transformers' config) or gelu (open_clip's default)
    source: str


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def to_fp32(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_openai_layout(sd: dict) -> bool:
    return "visual.proj" in sd and "text_projection" in sd and "visual.conv1.weight" in sd


# ----------------------------------------------------------------------------------- transformers <-> OpenAI blocks
_HF_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}


def hf_layers_to_openai(sd: dict, src: str, dst: str) -> dict:
    """transformers' ``CLIPEncoderLayer`` keys under ``src`` (``...encoder.layers.``) -> OpenAI resblocks under
    ``dst`` (q/k/v projections concatenated into ``in_proj``)."""
    out = {}
    layers = sorted({int(k[len(src):].split(".")[0]) for k in sd if k.startswith(src)})
    for i in layers:
        p, q = f"{src}{i}.", f"{dst}{i}."
        for part in ("weight", "bias"):
            out[f"{q}attn.in_proj_{part}"] = torch.cat([sd[f"{p}self_attn.{x}_proj.{part}"] for x in "qkv"])
            for hf, oa in _HF_LAYER.items():
                out[f"{q}{oa}.{part}"] = sd[f"{p}{hf}.{part}"]
    return out


def openai_layers_to_hf(sd: dict, src: str, dst: str) -> dict:
    """The inverse of ``hf_layers_to_openai``."""
    out = {}
    layers = sorted({int(k[len(src):].split(".")[0]) for k in sd if k.startswith(src)})
    for i in layers:
        p, q = f"{src}{i}.", f"{dst}{i}."
        for part in ("weight", "bias"):
            for x, chunk in zip("qkv", sd[f"{p}attn.in_proj_{part}"].chunk(3)):
                out[f"{q}self_attn.{x}_proj.{part}"] = chunk
            for hf, oa in _HF_LAYER.items():
                out[f"{q}{hf}.{part}"] = sd[f"{p}{oa}.{part}"]
    return out


def _openai_from_transformers(sd: dict) -> dict:
    v, t = "vision_model.", "text_model."
    out = {
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
    }
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = sd[f"{v}pre_layrnorm.{part}"]
        out[f"visual.ln_post.{part}"] = sd[f"{v}post_layernorm.{part}"]
        out[f"ln_final.{part}"] = sd[f"{t}final_layer_norm.{part}"]
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    out.update(hf_layers_to_openai(sd, v + "encoder.layers.", "visual.transformer.resblocks."))
    out.update(hf_layers_to_openai(sd, t + "encoder.layers.", "transformer.resblocks."))
    return out


# ------------------------------------------------------------------------------------------------------- reading
def read_clip_checkpoint(url: str, what: str = "model.pretrained") -> ClipCheckpoint:
    """Any supported whole-CLIP checkpoint (local path or s3:// URL) in OpenAI's layout, with its architecture."""
    return checked_clip(*read_model_file(url, what), what)


def read_model_file(url: str, what: str = "model.pretrained") -> tuple[dict, str, str, str]:
    """(state dict, format, activation, url of the file read) of a whole-model checkpoint: a transformers CLIPModel
    directory (converted to OpenAI's keys), a TorchScript archive, or a torch / safetensors state dict (a training
    checkpoint's ``state_dict`` unwrapped, DDP's ``module.`` prefix removed)."""
    try:
        path = local_copy(url)
    except FileNotFoundError:
        raise WeightLoadError(f"{what}: checkpoint not found at {url}") from None
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.exists(config):
            with open(config) as f:
                hf = json.load(f)
            if "text_config" not in hf or "vision_config" not in hf:
                raise WeightLoadError(f"{what}: {url}/config.json is not a transformers CLIPModel config "
                                      f"(model_type {hf.get('model_type')!r})")
            try:
                sd = _openai_from_transformers(read_state_dict(url, what))
            except KeyError as e:
                raise WeightLoadError(f"{what}: {url} is not a transformers CLIPModel checkpoint: no key {e}") from None
            act = hf["vision_config"].get("hidden_act", "quick_gelu")
            return sd, "transformers", act, url
        found = [f for f in OPEN_CLIP_FILES + WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
        if not found:
            raise WeightLoadError(f"{what}: {url} holds no CLIP checkpoint (config.json + weights of a transformers "
                                  f"CLIPModel, or one of {', '.join(OPEN_CLIP_FILES + WEIGHT_FILES)})")
        url, path = url.rstrip("/") + "/" + found[0], os.path.join(path, found[0])
    if _is_torchscript(path):
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise WeightLoadError(f"{what}: cannot read TorchScript archive {url}: {type(e).__name__}: {e}") from None
        fmt = "openai-torchscript"
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True) if not path.endswith(".safetensors") \
            else read_state_dict(path, what)
        fmt = "open_clip" if os.path.basename(path) in OPEN_CLIP_FILES or (isinstance(raw, dict) and
                                                                           "state_dict" in raw) else "openai"
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise WeightLoadError(f"{what}: {url} does not hold a state dict of tensors")
        sd = _strip_module(raw)
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    # open_clip's GELU models and OpenAI's QuickGELU ones share one layout; the file does not say which
    return sd, fmt, "gelu" if fmt == "open_clip" else "quick_gelu", url


def checked_clip(sd: dict, fmt: str, activation: str, url: str, what: str) -> ClipCheckpoint:
    if not is_openai_layout(sd):
        if any(k.startswith("visual.layer1.") for k in sd):
            raise WeightLoadError(f"{what}: {url} is a ResNet CLIP; only ViT CLIP image towers are supported")
        raise WeightLoadError(f"{what}: {url} is not a CLIP checkpoint in OpenAI/open_clip/transformers layout "
                              f"(no visual.proj / text_projection / visual.conv1.weight; first keys: "
                              f"{', '.join(list(sd)[:6])})")
    activation = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}.get(
        activation, activation)
    return ClipCheckpoint(to_fp32(sd), arch_of(sd), fmt, activation, url)


def arch_of(sd: dict) -> ClipArch:
    """The architecture from the weights' shapes (OpenAI's ``build_model``)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    return ClipArch(embed_dim=sd["text_projection"].shape[1], vision_width=sd["visual.conv1.weight"].shape[0],
                    vision_layers=count("visual.transformer.resblocks."), patch_size=sd["visual.conv1.weight"].shape[-1],
                    context_length=sd["positional_embedding"].shape[0],
                    vocab_size=sd["token_embedding.weight"].shape[0], text_width=sd["ln_final.weight"].shape[0],
                    text_layers=count("transformer.resblocks."))


# ---------------------------------------------------------------------------------------------------- converting
def resize_grid(pos: torch.Tensor, grid: tuple[int, int], old: tuple[int, int] | None = None) -> torch.Tensor:
    """[1 + h'*w', D] -> [1, 1 + h*w, D]: the grid ``old`` (default: square) resized bilinearly (no antialias), CLS
    kept — as IRRA's and IVT's ``resize_pos_embed`` do. A table that already has h*w positions (an IRRA run's) is
    taken as it is."""
    pos = pos[None]
    if pos.shape[1] - 1 == grid[0] * grid[1]:
        return pos
    if old is None:
        side = round((pos.shape[1] - 1) ** 0.5)
        if side * side != pos.shape[1] - 1:
            raise WeightLoadError(f"position table of {pos.shape[1] - 1} patches is neither square nor the {grid} "
                                  "grid")
        old = (side, side)
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old), num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)


TIMM_BLOCK_KEYS = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
               "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openai_visual_to_timm(sd: dict, grid: tuple[int, int], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """OpenAI's ViT keys -> timm ``VisionTransformer`` keys (pre-norm CLIP variant, no head), the position grid
    resized to ``grid`` (rows, cols)."""
    out = {"cls_token": sd[prefix + "class_embedding"].reshape(1, 1, -1),
           "pos_embed": resize_grid(sd[prefix + "positional_embedding"], grid),
           "patch_embed.proj.weight": sd[prefix + "conv1.weight"]}
    for part in ("weight", "bias"):
        out[f"norm_pre.{part}"] = sd[f"{prefix}ln_pre.{part}"]
        out[f"norm.{part}"] = sd[f"{prefix}ln_post.{part}"]
    blocks = prefix + "transformer.resblocks."
    for k, v in sd.items():
        if not k.startswith(blocks):
            continue
        i, rest = k[len(blocks):].split(".", 1)
        for oa, tm in TIMM_BLOCK_KEYS.items():
            if rest == oa or rest.startswith(oa + "."):
                out[f"blocks.{i}.{tm}{rest[len(oa):]}"] = v
                break
        else:
            raise WeightLoadError(f"unexpected key {k} in the CLIP image tower (layer scale or other variants are not "
                                  "supported)")
    return out


def openai_text_to_transformers(sd: dict, length: int, t: str = "text_model.") -> dict[str, torch.Tensor]:
    """OpenAI's text transformer keys -> transformers ``CLIPTextModel`` keys under prefix ``t`` (``text_model.``, or
    "" where a transformers version keeps the text model's modules at the top); positions cut to ``length``."""
    out = {t + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
           t + "embeddings.position_embedding.weight": sd["positional_embedding"][:length]}
    for part in ("weight", "bias"):
        out[f"{t}final_layer_norm.{part}"] = sd[f"ln_final.{part}"]
    out.update(openai_layers_to_hf(sd, "transformer.resblocks.", t + "encoder.layers."))
    return out


_KNOWN = re.compile(r"^(visual\.(class_embedding|positional_embedding|conv1\.weight|ln_pre\.(weight|bias)|"
                    r"ln_post\.(weight|bias)|proj|transformer\.resblocks\.\d+\..+)|transformer\.resblocks\.\d+\..+|"
                    r"token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale|"
                    r"attn_mask)$")


def unknown_keys(sd: dict) -> list[str]:
    """Keys of an OpenAI-layout state dict that no conversion consumes (variants we do not support)."""
    return [k for k in sd if not _KNOWN.match(k)]
