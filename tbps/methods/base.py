"""What every method shares: the registry, loss weights from config, global-negative contrastive losses,
parameter groups for the optimizer. A method = one file that subclasses ``Method`` and registers itself."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tbps import losses as L
from tbps.config import LOGIT_SCALE_MAX, METHOD_CONFIGS, ConfigError, MethodConfig, method_config_class
from tbps.data.batch import TrainBatch
from tbps.data.needs import DataNeeds
from tbps.distributed import gather_no_grad, gather_with_grad, row_offset, world
from tbps.models import WeightLoadError

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        cls.config_class = METHOD_CONFIGS[name]
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class TextSpec:
    """What a method needs to know of the tokenizer."""

    vocab_size: int
    length: int
    pad_id: int
    mask_id: int
    bos_id: int | None = None  # start token ([CLS] / <|startoftext|>)
    eos_id: int | None = None  # end token ([SEP] / <|endoftext|>)

    @classmethod
    def from_tokenizer(cls, tok, length: int) -> "TextSpec":
        bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return cls(len(tok), length, tok.pad_token_id, tok.mask_token_id, bos, eos)


class Method(nn.Module):
    """Base class. Subclasses set ``backbone_prefixes`` and implement the encoders, ``similarity``, ``features`` and
    ``batch_losses``. Each is built from its own typed config (``config_class``, chosen by ``method.name``: its loss
    terms, temperature and method fields) plus the architecture fields it reads, by ``build_method``."""

    name = "base"
    config_class: type[MethodConfig] = MethodConfig  # set by ``register``
    backbone_prefixes: tuple[str, ...] = ()  # parameters at the base lr; everything else is "new" (lr x mult)
    head_prefixes: tuple[str, ...] = ()  # new modules whose biases also learn at the new-module lr (IRRA's heads)
    default_gather = True  # method.gather: null picks this (global negatives unless the paper used local batches)
    # "longest": the method's official tokenizer pads each batch of captions to its longest one, and right padding
    # does not change its text features; evaluation and search then cut the padding (``tbps.retrieval``), so a long
    # ``data.text_length`` costs nothing there. "fixed": captions are encoded at data.text_length.
    text_padding = "fixed"

    @classmethod
    def hyperparameters(cls, losses) -> set[str]:
        """The method.* fields that change this method's training with these loss terms (from its config class)."""
        return cls.config_class.hyperparameters(losses)

    def __init__(self, config: MethodConfig, text: TextSpec, num_classes: int):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{self.name} is built from a {self.config_class.__name__}, got "
                              f"{type(config).__name__} (method.name={getattr(config, 'name', '?')})")
        self.config = config
        self.text = text
        self.num_classes = num_classes
        self.loss_weights = {term.name: term.weight for term in config.losses}  # checked when the config loaded
        scale = torch.tensor([math.log(1.0 / config.temperature)])  # shape [1]: DeepSpeed dislikes 0-dim params
        if config.learnable_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    # -- interface
    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """[num_texts, num_images] scores; default: cosine of single embeddings."""
        return F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).t()

    def search_vectors(self, emb: torch.Tensor, side: str) -> torch.Tensor:
        """Vectors whose inner products equal ``similarity`` (text side · image side), so a gallery can live in a
        vector index (FAISS). Default: the L2-normalised embeddings (cosine)."""
        return F.normalize(emb, dim=-1)

    def features(self, batch: TrainBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward of a training batch, split by how its losses depend on the batch: ``(feats, local)``.

        ``feats``: the tensors the batch-level (contrastive) losses read, each with one row per item, so features of
        several micro-batches concatenate along dim 0 into those of the whole batch (identity labels included);
        ``local``: the per-sample losses (ID, MLM), means over this batch. ``train.grad_cache`` relies on this split
        (tbps/gradcache.py)."""
        raise NotImplementedError

    def batch_losses(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch-level losses of ``features``' first output (possibly of several micro-batches concatenated)."""
        raise NotImplementedError

    def fp32_batch_losses(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch_losses`` in float32 with autocast off, whatever precision the features come in (as IRRA's code
        computes SDM: ``.float()`` features). Under bf16 autocast the similarity matmul would otherwise run in bf16:
        SDM's gradient at s = 50 came out 9 % off the float32 one (synthetic 512-d features, batch 128), against 0.5 %
        for bf16 features scored in float32 (tests/test_methods.py); the B x B products cost nothing next to the
        towers."""
        device_type = next(v for v in feats.values() if torch.is_tensor(v)).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.batch_losses({k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                      for k, v in feats.items()})

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The unweighted loss parts of one batch."""
        feats, local = self.features(batch)
        return {**self.fp32_batch_losses(feats), **local}

    def batch_loss_parameters(self) -> list[nn.Parameter]:
        """Parameters the batch-level losses use directly (not through ``features``): a learnable temperature."""
        return [self.log_scale] if isinstance(self.log_scale, nn.Parameter) else []

    def weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss_weights[k] * v for k, v in parts.items())

    def forward(self, batch: TrainBatch, stage: str = "loss"):
        """``stage="loss"``: ``{"loss": weighted total, "loss_<part>": detached part, ...}``; ``stage="features"``:
        ``features(batch)`` (so that engines wrapping the method, e.g. DeepSpeed's, see a forward)."""
        if stage == "features":
            return self.features(batch)
        if stage != "loss":
            raise ValueError(f"unknown forward stage {stage!r}")
        parts = self.losses(batch)
        out = {"loss": self.weighted(parts)}
        out.update({f"loss_{k}": v.detach() for k, v in parts.items()})
        return out

    # -- helpers
    @property
    def logit_scale(self) -> torch.Tensor:
        """s = 1 / tau. A learnable scale is capped at 100, as CLIP's; a fixed one is the configured 1 / tau (IRRA's
        fixed 1 / temperature, never capped: tau = 0.005 is s = 200, not a silent 100)."""
        scale = self.log_scale.exp()
        return (scale.clamp(max=LOGIT_SCALE_MAX) if isinstance(self.log_scale, nn.Parameter) else scale)[0]

    def wants(self, name: str) -> bool:
        return name in self.loss_weights

    @property
    def gathers(self) -> bool:
        """``method.gather``, or the method's own choice when it is null."""
        return self.default_gather if self.config.gather is None else bool(self.config.gather)

    def contrastive(self, kind: str, v: torch.Tensor, t: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """sdm / itc / cmpm of image features ``v`` and text features ``t``; with ``method.gather`` (``gathers``)
        and several ranks, local rows are scored against the features of the whole global batch."""
        gather = self.gathers and world()[1] > 1
        V, T = (gather_with_grad(v), gather_with_grad(t)) if gather else (v, t)
        P = gather_no_grad(pids) if gather else pids
        if kind == "sdm":
            return L.sdm_rows(v, T, pids, P, self.logit_scale) + L.sdm_rows(t, V, pids, P, self.logit_scale)
        if kind == "cmpm":
            norm = self.config.cmpm_norm
            return L.cmpm_rows(v, T, pids, P, norm=norm) + L.cmpm_rows(t, V, pids, P, norm=norm)
        if kind == "itc":
            targets = torch.arange(len(v), device=v.device) + (row_offset(len(v)) if gather else 0)
            return (L.itc_rows(v, T, targets, self.logit_scale) + L.itc_rows(t, V, targets, self.logit_scale)) / 2
        raise ValueError(kind)

    def compile_step(self, replay_random: bool = False, **kwargs) -> None:
        """``train.compile``: torch.compile the training forward's heavy part, ``features`` (towers, heads, per-sample
        losses); the batch-level losses (cheap, with their collectives) and the loss bookkeeping stay eager. Compiling
        all of ``forward`` returns a total loss without its graph when it equals a detached output (one loss of weight
        1, torch 2.14).

        ``replay_random`` (``train.grad_cache``): random layers (dropout, drop path) draw through eager's kernels
        (inductor's ``fallback_random``), so that the same random state gives the same masks in every compiled graph.
        grad_cache runs ``features`` without autograd, then again with it, under one recorded random state; inductor
        compiles the two as different graphs, and its own random lowering does not promise the same draws across
        graphs (PCC with drop path drew other masks: gradients 78 % off the step they stand for, on CPU)."""
        if replay_random:
            kwargs["options"] = {**kwargs.get("options", {}), "fallback_random": True}
        self.features = torch.compile(self.features, **kwargs)
        self.compiled_draws_replayed = replay_random  # grad_cache_step refuses compiled draws it cannot replay

    @contextlib.contextmanager
    def eager(self):
        """The training forward uncompiled inside the block (``compile_step``'s graphs kept for afterwards): the
        epoch's last, short batch (``data.last_batch=keep``), for which a graph would make the batch dimension dynamic
        in the graphs of every later step."""
        compiled = self.__dict__.get("features")  # compile_step's instance attribute over the class's method
        if compiled is None:
            yield
            return
        del self.features
        try:
            yield
        finally:
            self.features = compiled

    def compile_encoders(self, **kwargs) -> None:
        """torch.compile the retrieval encoders (evaluation)."""
        self.encode_image = torch.compile(self.encode_image, **kwargs)
        self.encode_text = torch.compile(self.encode_text, **kwargs)

    def set_activation_checkpointing(self, enable: bool = True) -> list[str]:
        """``train.activation_checkpointing``: every tower and block stack recomputes its activations in the
        backward (tbps/models/checkpointing.py). Returns the modules switched."""
        from tbps.models.checkpointing import set_activation_checkpointing

        return set_activation_checkpointing(self, enable)

    # -- weights (called by tbps.methods.pretrained after the method is built)
    def load_tower_weights(self, image_url: str, text_url: str) -> None:
        """``model.image_pretrained`` / ``model.text_pretrained``."""
        raise WeightLoadError(f"{self.name} cannot load model.image_pretrained / model.text_pretrained")

    def load_pretrained(self, checkpoint) -> None:
        """``model.pretrained``: a whole-model checkpoint read by ``tbps.methods.pretrained``."""
        raise WeightLoadError(f"model.pretrained: {self.name} cannot start from a {checkpoint.format} checkpoint "
                              f"({checkpoint.source})")

    # -- optimisation
    def param_groups(self, optim) -> list[dict]:
        """Optimizer groups by IRRA's solver rule (solver/build.py), which every method uses:

        - parameters of new modules (not under ``backbone_prefixes``) learn at lr x ``new_module_lr_mult``;
        - biases learn at lr x ``bias_lr_mult`` with weight decay ``bias_weight_decay`` -- except those of head modules
          (``head_prefixes``: classifiers, MLM head), which keep the head's lr x ``new_module_lr_mult``;
        - other parameters decay with ``weight_decay``; norm weights, embeddings and other 1-D parameters
          (``no_weight_decay``) only when ``optim.decay_norms`` (IRRA decays everything but biases).
        The optimizer factory asks this; nothing matches parameter names elsewhere."""
        skip = self.no_weight_decay()
        groups: dict[tuple, dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            role = "backbone" if name.startswith(self.backbone_prefixes) else \
                "head" if name.startswith(self.head_prefixes) else "new"
            bias = name.endswith("bias")  # also nn.MultiheadAttention's in_proj_bias
            if bias:
                mult = optim.new_module_lr_mult if role == "head" else optim.bias_lr_mult
                decay = optim.bias_weight_decay
            else:
                mult = 1.0 if role == "backbone" else optim.new_module_lr_mult
                exempt = p.ndim <= 1 or name in skip or any(name.endswith(s) for s in skip)
                decay = 0.0 if exempt and not optim.decay_norms else optim.weight_decay
            key = (role, bias, decay)
            g = groups.setdefault(key, {"params": [], "lr": optim.lr * mult, "weight_decay": decay,
                                        "name": f"{role}{'_bias' if bias else ''}{'' if decay else '_no_decay'}"})
            g["params"].append(p)
        return list(groups.values())

    def no_weight_decay(self) -> set[str]:
        """Parameter names (or suffixes) exempt from weight decay beyond biases and norms."""
        return {"pos_embed", "cls_token", "log_scale", "embeddings.weight", "type_embed", "part_tokens"}


FP16_MODULE_PARAMS = {nn.Conv1d: ("weight", "bias"), nn.Conv2d: ("weight", "bias"), nn.Linear: ("weight", "bias"),
                      nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                              "in_proj_bias", "bias_k", "bias_v")}


# train.precision -> the dtype its matmuls compute in (autocast's, or the weights' in DeepSpeed's bf16/fp16 modes);
# fp32 and auto (resolved first) have none
COMPUTE_DTYPES = {"bf16-autocast": torch.bfloat16, "bf16": torch.bfloat16, "fp16-autocast": torch.float16,
                  "fp16-weights": torch.float16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype | None:
    """The low-precision dtype a resolved ``train.precision`` computes in, or None (fp32): what
    ``bench/train_step.py`` autocasts its step to."""
    return COMPUTE_DTYPES.get(precision)


EVAL_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def eval_dtype(precision: str, setting: str = "auto") -> torch.dtype | None:
    """What evaluation autocasts to on a GPU (None: fp32) for a resolved ``train.precision`` and ``eval.precision``.
    ``auto``: as the official code evaluates such a model -- IRRA its fp16 weights (fp16), IVT outside the autocast of
    its AMP training (fp32: ``fp16-autocast``); the other precisions their own compute dtype."""
    if setting != "auto":
        return EVAL_DTYPES[setting]
    return None if precision == "fp16-autocast" else compute_dtype(precision)


def fp16_weights(module: nn.Module) -> list[str]:
    """IRRA's ``convert_weights`` (model/clip_model.py, applied by ``build_model`` to the whole IRRA model), by module
    type: the weights and biases of every Conv1d, Conv2d and Linear (nn.MultiheadAttention's output projection, the
    CLIP projections, ID classifier and MLM head included) and nn.MultiheadAttention's input projection are stored
    in fp16; LayerNorms, embeddings, position tables and scalars stay fp32. ``train.precision: fp16-weights`` trains
    them so, as IRRA does. Converts in place (the same Parameter objects) and returns the converted names."""
    converted = []
    for prefix, m in module.named_modules():
        names = next((n for kind, n in FP16_MODULE_PARAMS.items() if isinstance(m, kind)), ())
        for name in names:
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter) and p.dtype != torch.float16:
                p.data = p.data.half()
                converted.append(f"{prefix}.{name}" if prefix else name)
    return converted


def build_method(cfg, text: TextSpec, num_classes: int) -> Method:
    """The method ``cfg.method.name`` with fresh weights: its own config section, the architecture (``cfg.model``)
    and the image size; ``tbps.methods.pretrained.create_method`` also loads the configured weights."""
    from . import clip, irra, ivt, pcc  # noqa: F401  (register)

    method_config_class(cfg.method.name)  # an unknown name: the config error listing the methods
    return METHODS[cfg.method.name](cfg.method, cfg.model, tuple(cfg.data.image_size), text, num_classes)
