"""Building a method and loading its starting weights: the one function the engine, ``tbps.evaluate``,
``tbps.search``, the benchmarks and the tests use.

    method = create_method(cfg, text_spec, num_classes)   # reads model.pretrained, fits cfg.model, builds, loads

``model.pretrained`` (local path or s3://) is a whole model:
- a CLIP checkpoint (``tbps.models.clip``: OpenAI's TorchScript or plain state dict, open_clip, a transformers
  ``CLIPModel`` directory): the architecture fields of ``cfg.model`` are set from its weights, then both towers, both
  projections and, for a learnable temperature, the logit scale are loaded;
- an official IRRA output directory (``best.pth`` holding ``{"model": state_dict}`` + ``configs.yaml``): CLIP as
  above plus IRRA's cross-modal encoder, MLM head and ID classifier;
- an official IVT checkpoint (``{"state_dict": ...}`` with ``encoder_vl.*`` keys): a released fine-tuned model or
  IVT's vision-language pretrained model, mapped onto the shared tower (``IvtCheckpoint``).
``model.image_pretrained`` / ``model.text_pretrained`` load the towers alone: after a CLIP checkpoint (overriding
a tower), before an IVT one (as the official fine-tuning loads ImageNet ViT + BERT, then IVT's checkpoint over them).

Weights are read once, after the method is built and never inside a constructor: an evaluation copy built with
``build_method`` gets its weights from the training copy's state dict instead of re-reading storage.
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass

import torch
import yaml

from tbps.config import ConfigError, IrraMethodConfig, LossTerm
from shards.storage import local_copy
from tbps.models import WeightLoadError
from tbps.models.clip import ClipCheckpoint, TIMM_BLOCK_KEYS, to_fp32, checked_clip, read_model_file
from tbps.models.shared import grid_of, is_ivt_state, ivt_to_ours

from .base import Method, TextSpec, build_method

ARCH_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads")
IRRA_FILES = ("best.pth", "configs.yaml")


@dataclass
class IrraRun:
    """An official IRRA output directory: its CLIP part (OpenAI layout), its heads (IRRA's keys) and its args."""

    clip: ClipCheckpoint
    heads: dict[str, torch.Tensor]
    args: dict
    source: str
    format: str = "irra-run"


# ------------------------------------------------------------------------------------------------------ IRRA runs
class _IrraArgsLoader(yaml.SafeLoader):
    """IRRA writes ``yaml.dump(vars(args))``: tuples (img_size) come as python/tuple tags; nothing else is built."""


_IrraArgsLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                                lambda loader, node: tuple(loader.construct_sequence(node)))


def is_irra_run(url: str) -> bool:
    from shards.storage import filesystem, join

    fs, _ = filesystem(url)
    return all(fs.exists(filesystem(join(url, f))[1]) for f in IRRA_FILES)


def read_irra_run(url: str, what: str = "model.pretrained") -> IrraRun:
    from shards.storage import join

    path = local_copy(url)
    with open(os.path.join(path, "configs.yaml")) as f:
        try:
            args = yaml.load(f, Loader=_IrraArgsLoader) or {}
        except yaml.YAMLError as e:
            raise WeightLoadError(f"{what}: {join(url, 'configs.yaml')} is not IRRA's configs.yaml: {e}") from None
    try:
        ckpt = torch.load(os.path.join(path, "best.pth"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightLoadError(f"{what}: cannot read {join(url, 'best.pth')}: {type(e).__name__}: {e}") from None
    sd = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("base_model.") for k in sd):
        raise WeightLoadError(f"{what}: {join(url, 'best.pth')} holds no IRRA model ({{'model': state_dict}} with "
                              "base_model.* keys)")
    sd = to_fp32(sd)  # IRRA trains with fp16 linear weights
    base = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    heads = {k: v for k, v in sd.items() if not k.startswith("base_model.")}
    return IrraRun(checked_clip(base, "irra-run", "quick_gelu", url, what), heads, args, url)


def irra_heads_to_ours(heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IRRA's head keys -> ours: cross_attn, ln_pre_t/ln_pre_i/ln_post, cross_modal_transformer resblocks (OpenAI's
    block layout -> timm Block), mlm_head.{dense,ln,fc}, classifier."""
    simple = {"cross_attn.": "cross.cross_attn.", "ln_pre_t.": "cross.ln_text.", "ln_pre_i.": "cross.ln_image.",
              "ln_post.": "cross.ln_post.", "mlm_head.": "cross.mlm_head.", "classifier.": "classifier."}
    out, unknown = {}, []
    blocks = "cross_modal_transformer.resblocks."
    for k, v in heads.items():
        if k.startswith(blocks):
            i, rest = k[len(blocks):].split(".", 1)
            new = next((f"cross.blocks.{i}.{tm}{rest[len(oa):]}" for oa, tm in TIMM_BLOCK_KEYS.items()
                        if rest == oa or rest.startswith(oa + ".")), None)
        else:
            new = next((dst + k[len(src):] for src, dst in simple.items() if k.startswith(src)), None)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise WeightLoadError(f"model.pretrained: IRRA checkpoint has keys tbps cannot map: {', '.join(unknown[:12])}")
    return out


def load_irra_run(method: Method, run: IrraRun) -> None:
    """CLIP (towers + projections) strictly; IRRA's heads where this method has them. A classifier for another
    number of identities (fine-tuning on another dataset) keeps its fresh initialisation; that is reported."""
    from .towers import load_clip

    load_clip(method, run.clip)
    mapped = irra_heads_to_ours(run.heads)
    own = method.state_dict()
    if "cross" in dict(method.named_children()):
        cross = {k: v for k, v in mapped.items() if k.startswith("cross.")}
        if not cross:
            raise WeightLoadError(f"model.pretrained: {run.source} has no cross-modal encoder (trained without mlm); "
                                  "drop mlm from method.losses or start from its CLIP weights")
        missing = [k for k in own if k.startswith("cross.") and k not in cross]
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in cross.items()
                  if k in own and v.shape != own[k].shape]
        extra = [k for k in cross if k not in own]
        if missing or shapes or extra:
            raise WeightLoadError(f"model.pretrained: IRRA cross-modal encoder of {run.source} does not fit: missing "
                                  f"{missing[:8]}, shape mismatch {shapes[:8]}, unexpected {extra[:8]}")
        method.load_state_dict(cross, strict=False)
    classifier = {k: v for k, v in mapped.items() if k.startswith("classifier.")}
    if "classifier" in dict(method.named_children()) and classifier:
        if all(own[k].shape == v.shape for k, v in classifier.items()):
            method.load_state_dict(classifier, strict=False)
        else:
            print(f"[tbps] model.pretrained: IRRA's ID classifier has {classifier['classifier.weight'].shape[0]} "
                  f"identities, this dataset {own['classifier.weight'].shape[0]}: the classifier starts fresh")


def irra_args_to_config(cfg, args: dict) -> None:
    """Fit ``cfg`` (the irra preset, in place) to an IRRA run's args: losses and weights, temperature, cross-modal
    depth, image size, patch stride, text length; the CLIP tokenizer."""
    names = [n.strip() for n in str(args.get("loss_names", "sdm+mlm+id")).split("+") if n.strip()]
    weight = {"id": float(args.get("id_loss_weight", 1.0)), "mlm": float(args.get("mlm_loss_weight", 1.0))}
    base = cfg.method if isinstance(cfg.method, IrraMethodConfig) else IrraMethodConfig()
    cfg.method = dataclasses.replace(base, losses=[LossTerm(n, weight.get(n, 1.0)) for n in names],
                                     temperature=float(args.get("temperature", base.temperature)),
                                     cross_layers=int(args.get("cmt_depth", base.cross_layers)))
    cfg.data.image_size = [int(x) for x in args.get("img_size", cfg.data.image_size)]
    cfg.model.patch_stride = int(args.get("stride_size", 0))
    cfg.data.text_length = int(args.get("text_length", cfg.data.text_length))
    cfg.data.tokenizer = "clip"


# ------------------------------------------------------------------------------------------------------ IVT
@dataclass
class IvtCheckpoint:
    """An official IVT checkpoint mapped onto ``SharedTower`` keys (``state``); ``ignored`` lists the official
    model's keys retrieval never uses. ``kind``: ``finetuned`` (a text-based person search model) or ``pretraining``
    (IVT's vision-language pretrained model: fusion encoder + ITM head beside the shared encoder)."""

    state: dict[str, torch.Tensor]
    ignored: list[str]
    kind: str
    source: str
    format: str = "ivt"

    @property
    def grid_tokens(self) -> int:
        return self.state["pos_embed"].shape[1] - 1


def ivt_checkpoint(sd: dict, source: str) -> IvtCheckpoint:
    state, ignored = ivt_to_ours(to_fp32(sd), source)
    for key in ("pos_embed", "patch_embed.weight", "word_embeddings.weight", "position_embeddings.weight"):
        if key not in state:
            raise WeightLoadError(f"model.pretrained: IVT checkpoint {source} has no {key} (encoder_vl.*); is it whole?")
    kind = "pretraining" if any(k.removeprefix("module.").startswith(("encoder_fusion.", "itm.")) for k in ignored) \
        else "finetuned"
    return IvtCheckpoint(state, ignored, kind, source)


def stride_for(tokens: int, image_size, patch: int) -> int:
    """The patch stride giving ``tokens`` patches over ``image_size`` (0 if none)."""
    for stride in range(patch, 0, -1):
        rows, cols = grid_of(image_size, patch, stride)
        if rows * cols == tokens:
            return stride
    return 0


def fit_ivt_config(cfg, ckpt: IvtCheckpoint, text: TextSpec) -> str:
    if cfg.method.name != "ivt":
        raise ConfigError(f"model.pretrained: {ckpt.source} is an IVT checkpoint; it needs method.name=ivt "
                          f"(got {cfg.method.name})")
    vocab, width = ckpt.state["word_embeddings.weight"].shape
    if vocab != text.vocab_size:
        raise ConfigError(f"model.pretrained: {ckpt.source} has a vocabulary of {vocab} tokens, the tokenizer "
                          f"{text.vocab_size}: set data.tokenizer to the BERT-base uncased tokenizer IVT uses")
    positions = ckpt.state["position_embeddings.weight"].shape[0]
    if text.length > positions:
        raise ConfigError(f"data.text_length {text.length} exceeds the checkpoint's {positions} text positions")
    m = cfg.model
    patch = ckpt.state["patch_embed.weight"].shape[-1]
    m.image_overrides = {**m.image_overrides, "patch_size": patch}
    m.shared_width = width
    m.shared_layers = 1 + max(int(k.split(".")[1]) for k in ckpt.state if k.startswith("blocks."))
    if width % m.shared_heads:
        raise ConfigError(f"model.shared_heads {m.shared_heads} does not divide the checkpoint's width {width}")
    stride = m.patch_stride or patch
    note = ""
    if ckpt.grid_tokens != math.prod(grid_of(cfg.data.image_size, patch, stride)):
        found = stride_for(ckpt.grid_tokens, cfg.data.image_size, patch)
        if ckpt.kind == "finetuned":
            if not found:
                raise ConfigError(f"model.pretrained: {ckpt.source} has {ckpt.grid_tokens} patch positions, which no "
                                  f"patch stride gives at data.image_size {cfg.data.image_size}; set the image size "
                                  "it was trained at")
            m.patch_stride = found
            note = f", patch stride {found} (from its position table)"
        else:
            note = (f"; its {ckpt.grid_tokens}-patch position/type tables do not fit this grid: "
                    f"model.pretrained_grid={m.pretrained_grid}")
    return (f"IVT {ckpt.kind} checkpoint {ckpt.source}: shared tower {width} x {m.shared_layers}, patch {patch}{note}"
            + (f"; not loaded (unused by retrieval): {_summarise(ckpt.ignored)}" if ckpt.ignored else ""))


def _summarise(keys: list[str]) -> str:
    heads = sorted({k.removeprefix("module.").split(".")[0] for k in keys})
    return ", ".join(heads)


# ------------------------------------------------------------------------------------------------------ tbps
@dataclass
class TbpsCheckpoint:
    """A tbps model directory (a run's ``best/`` or ``checkpoint_*``) as a starting point: pretrain on a corpus,
    then fine-tune (``model.pretrained=<run>/best``). ``config``: the saved ``tbps.config.Config``."""

    state: dict[str, torch.Tensor]
    config: object
    source: str
    format: str = "tbps"


def is_tbps_checkpoint(url: str) -> bool:
    from shards.storage import filesystem, join

    fs, _ = filesystem(url)
    return all(fs.exists(filesystem(join(url, f))[1]) for f in ("model.pt", "config.yaml", "meta.json"))


def read_tbps_checkpoint(url: str) -> TbpsCheckpoint:
    from tbps.checkpoint import load_model_state, read_saved_config

    return TbpsCheckpoint(load_model_state(url), read_saved_config(url), url)


# the architecture: taken from the checkpoint's config (regularisers such as drop_path stay this run's)
MODEL_ARCH = ("activation", "image_tower", "image_overrides", "patch_stride", "image_pool", "text_tower", "text_pool",
              "text_width", "text_layers", "text_heads", "embed_dim", "shared_width", "shared_layers", "shared_heads")
METHOD_ARCH = {"irra": ("cross_layers", "cross_heads"), "pcc": ("num_parts", "decoder_layers")}


def fit_tbps_config(cfg, ckpt: TbpsCheckpoint, text: TextSpec) -> str:
    saved = ckpt.config
    if saved.method.name != cfg.method.name:
        raise ConfigError(f"model.pretrained: {ckpt.source} holds a {saved.method.name} model: it starts "
                          f"{saved.method.name} runs only (this run: method.name={cfg.method.name})")
    if list(saved.data.image_size) != list(cfg.data.image_size):
        raise ConfigError(f"model.pretrained: {ckpt.source} was trained at data.image_size {saved.data.image_size}; "
                          f"this run has {cfg.data.image_size} (set it to the checkpoint's)")
    embeddings = [v for k, v in ckpt.state.items() if k.endswith(("token_embedding.weight", "word_embeddings.weight"))]
    if embeddings and embeddings[0].shape[0] != text.vocab_size:
        raise ConfigError(f"model.pretrained: {ckpt.source} has a vocabulary of {embeddings[0].shape[0]} tokens, this "
                          f"run's tokenizer {text.vocab_size}: set data.tokenizer={saved.data.tokenizer} (the "
                          "checkpoint's)")
    tables = [len(v) for k, v in ckpt.state.items() if k.endswith(("position_embedding.weight",
                                                                      "position_embeddings.weight"))]
    if text.length != saved.data.text_length and saved.data.text_length in tables:  # a table sized by text_length
        raise ConfigError(f"model.pretrained: {ckpt.source} was trained with data.text_length "
                          f"{saved.data.text_length}, which sizes its text position table; this run has "
                          f"{text.length}: set data.text_length={saved.data.text_length} (the checkpoint's)")
    for key in MODEL_ARCH:
        setattr(cfg.model, key, getattr(saved.model, key))
    for key in METHOD_ARCH.get(cfg.method.name, ()):
        setattr(cfg.method, key, getattr(saved.method, key))
    cfg.model.image_pretrained = cfg.model.text_pretrained = ""  # every tower weight comes from the checkpoint
    return f"tbps {saved.method.name} checkpoint {ckpt.source} (its architecture; the ID classifier starts fresh)"


def load_tbps_checkpoint(method: Method, ckpt: TbpsCheckpoint, log=print) -> None:
    """Every weight but the ID classifier (its identities are the pretraining data's): shapes must match; heads the
    run does not have (e.g. IRRA's MLM head without mlm) are left out, named."""
    own = method.state_dict()
    state = {k: v for k, v in ckpt.state.items() if not k.startswith("classifier.")}
    missing = [k for k in own if k not in state and not k.startswith("classifier.")]
    if missing:
        raise WeightLoadError(f"model.pretrained: {ckpt.source} lacks {len(missing)} weight(s) this model has: "
                              f"{', '.join(missing[:8])}")
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise WeightLoadError(f"model.pretrained: shapes of {ckpt.source} differ: {'; '.join(shapes[:6])}")
    unused = sorted({k.split(".")[0] for k in state if k not in own})
    method.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if unused and log:
        log(f"[tbps] model.pretrained: not used by this run's losses: {', '.join(unused)}")


# ------------------------------------------------------------------------------------------------------ the entry
def read_pretrained(url: str):
    """A ``ClipCheckpoint``, an ``IrraRun``, an ``IvtCheckpoint`` or a ``TbpsCheckpoint`` from ``model.pretrained``."""
    if is_tbps_checkpoint(url):
        return read_tbps_checkpoint(url)
    if is_irra_run(url):
        return read_irra_run(url)
    sd, fmt, activation, source = read_model_file(url)
    if is_ivt_state(sd):
        return ivt_checkpoint(sd, source)
    return checked_clip(sd, fmt, activation, source, "model.pretrained")


def fit_config(cfg, checkpoint, text: TextSpec) -> str:
    """Set the architecture fields of ``cfg.model`` from a checkpoint's weights (in place) so the saved config rebuilds
    the same model. Returns a one-line description."""
    if isinstance(checkpoint, IvtCheckpoint):
        return fit_ivt_config(cfg, checkpoint, text)
    if isinstance(checkpoint, TbpsCheckpoint):
        return fit_tbps_config(cfg, checkpoint, text)
    clip = checkpoint.clip if isinstance(checkpoint, IrraRun) else checkpoint
    a = clip.arch
    if cfg.model.text_tower != "clip":
        raise ConfigError(f"model.pretrained: {clip.source} is a CLIP checkpoint; it needs model.text_tower=clip "
                          f"(got {cfg.model.text_tower})")
    if a.vocab_size != text.vocab_size:
        raise ConfigError(f"model.pretrained: {clip.source} has a vocabulary of {a.vocab_size} tokens, the tokenizer "
                          f"{text.vocab_size}: use data.tokenizer=clip (CLIP's BPE with IRRA's mask token)")
    if text.length > a.context_length:
        raise ConfigError(f"data.text_length {text.length} exceeds the checkpoint's context length {a.context_length}")
    m = cfg.model
    if m.activation == "auto":
        m.activation = clip.activation
    m.image_tower = "vit_base_patch16_clip_224"  # a timm pre-norm CLIP ViT; the sizes below make it any CLIP ViT
    m.image_overrides = {**{k: v for k, v in m.image_overrides.items() if k not in ARCH_OVERRIDES},
                         "patch_size": a.patch_size, "embed_dim": a.vision_width, "depth": a.vision_layers,
                         "num_heads": a.vision_heads}
    m.text_width, m.text_layers, m.text_heads, m.embed_dim = a.text_width, a.text_layers, a.text_heads, a.embed_dim
    if isinstance(checkpoint, IrraRun) and isinstance(cfg.method, IrraMethodConfig):
        cfg.method.cross_heads = max(1, a.embed_dim // 64)  # IRRA: embed_dim // 64
    name = f"ViT-{'B' if a.vision_width == 768 else 'L' if a.vision_width == 1024 else a.vision_width}/{a.patch_size}"
    return (f"{checkpoint.format} checkpoint {clip.source}: CLIP {name} (image {a.vision_width}x{a.vision_layers}, "
            f"text {a.text_width}x{a.text_layers}, embedding {a.embed_dim}, {m.activation})")


def load_weights(method: Method, cfg, checkpoint=None, log=print) -> None:
    """Load ``checkpoint`` (from ``read_pretrained``) and the tower checkpoints of ``cfg.model`` into a built method:
    the towers after a CLIP checkpoint, before an IVT one (the official IVT order)."""
    towers = cfg.model.image_pretrained or cfg.model.text_pretrained
    if towers and isinstance(checkpoint, IvtCheckpoint):
        method.load_tower_weights(cfg.model.image_pretrained, cfg.model.text_pretrained)
    if isinstance(checkpoint, TbpsCheckpoint):
        load_tbps_checkpoint(method, checkpoint, log)
    elif checkpoint is not None:
        method.load_pretrained(checkpoint)
    if towers and not isinstance(checkpoint, IvtCheckpoint):
        method.load_tower_weights(cfg.model.image_pretrained, cfg.model.text_pretrained)


def create_method(cfg, text: TextSpec, num_classes: int, log=print, checkpoint=None) -> Method:
    """Read ``model.pretrained`` (fitting ``cfg.model`` to it), build the method, load every configured weight.
    ``checkpoint``: ``model.pretrained`` already read by ``read_pretrained`` (not read again)."""
    if cfg.model.pretrained:
        checkpoint = checkpoint or read_pretrained(cfg.model.pretrained)
        description = fit_config(cfg, checkpoint, text)
        if log:
            log(f"[tbps] model.pretrained: {description}")
    method = build_method(cfg, text, num_classes)
    load_weights(method, cfg, checkpoint, log)
    return method
