"""One typed configuration for everything: nested dataclasses, YAML presets in tbps/configs/, dotted CLI overrides.

    cfg = load_config("irra_tiny", ["method.sdm_temperature=0.03", "train.num_workers=2"])

Unknown keys, wrong types and numbers outside a field's valid values (``within``) are errors that name the key.
Every tunable a sweep touches is a field here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ConfigError(ValueError):
    """A configuration problem; the message names the key or path."""

    is_user_error = True  # shards.cli: one message and exit code 2, no traceback


# enum-like fields: checked when a config loads (a wrong value names the key and the valid ones)
OptimName = Literal["adam", "adamw", "sgd"]
Precision = Literal["auto", "bf16", "bf16-autocast", "fp16", "fp16-autocast", "fp16-weights", "fp32"]
OnBadShard = Literal["error", "skip"]
CmpmNorm = Literal["l2", "sum"]


@dataclass(frozen=True)
class Interval:
    """A numeric field's valid values, written as an interval (``"[0, 1)"``, ``"(0, inf)"``); ``note`` says why or
    what the edge means. Checked for every field that has one when a config loads (``check_values``): a negative
    temperature or learning rate, a flip probability of 2 or a text length of 1 would otherwise train (on nonsense)
    or fail deep inside a Ray worker."""

    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    note: str = ""
    length: int | None = None  # a list field: its number of elements

    @classmethod
    def parse(cls, spec: str, note: str = "", length: int | None = None) -> "Interval":
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", spec)
        if not m:
            raise ValueError(f"not an interval: {spec!r}")
        return cls(float(m[2]), float(m[3]), m[1] == "[", m[4] == "]", note, length)

    def holds(self, value) -> bool:  # False for NaN
        return (self.lo <= value if self.lo_closed else self.lo < value) and \
            (value <= self.hi if self.hi_closed else value < self.hi)

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.lo == -float("inf") and self.hi == float("inf"):
            text = "a finite number"
        elif self.hi == float("inf"):
            text = f"{'>=' if self.lo_closed else '>'} {num(self.lo)}"
        else:
            text = f"in {'[' if self.lo_closed else '('}{num(self.lo)}, {num(self.hi)}{']' if self.hi_closed else ')'}"
        return text + (f" ({self.note})" if self.note else "")


def within(spec: str, note: str = "", length: int | None = None) -> dict:
    """Field metadata: the field's valid values (``Interval``; for a list, each element's, and ``length`` elements)."""
    return {"within": Interval.parse(spec, note, length)}


def check_values(cfg, prefix: str = "") -> None:
    """Every field with valid values (``within``) of ``cfg`` and of the sections and list items under it, and each
    section's ``check_fields`` (relations between fields); the first problem is a ConfigError naming the key. Run
    when a config loads and again before a run starts (a config changed in code is checked too)."""
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        rule = f.metadata.get("within")
        if rule is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            if rule.length is not None and (not isinstance(value, (list, tuple)) or len(value) != rule.length):
                raise ConfigError(f"{key} must be a list of {rule.length} numbers, got {value!r}")
            for i, v in enumerate(items):
                if not rule.holds(v):
                    where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                    raise ConfigError(f"{where} must be {rule}, got {v!r}")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check_values(item, f"{key}[{i}]." if isinstance(value, list) else key + ".")
    if hasattr(cfg, "check_fields"):
        cfg.check_fields(prefix)


# ------------------------------------------------------------------------------------------------------ sections
@dataclass
class MixMember:
    """One dataset of a training mixture (``data.url: [{url: ..., weight: ...}, ...]``)."""

    url: str = ""
    weight: float = 1.0  # its share of each epoch's training samples (shares = weights / their sum)
    eval: bool = False  # val and test come from this member (exactly one)


@dataclass
class DataConfig:
    url: Union[str, list[MixMember]] = ""  # dataset URL (local dir, s3://...) holding manifest.json; "" = the
    # built-in ToyPEDES demo set. A list of {url, weight, eval} trains on a mixture: each epoch draws weight / sum
    # of weights of its samples from each member's train split (its shards repeated or a seeded subset), identities
    # kept apart; val/test, the tokenizer ("" = <url>/tokenizer) come from the member with eval: true, which url
    # then names (the members move to data.mix)
    mix: list[MixMember] = field(default_factory=list)  # the training mixture (set through data.url)
    train_split: str = "train"
    val_split: str = "val"  # checkpoints are selected on this split
    test_split: str = "test"  # reported once, at the end
    image_size: list[int] = field(default_factory=lambda: [384, 128], metadata=within("[1, inf)", length=2))
    # (height, width) fed to the image tower
    batch_size: int = field(default=64, metadata=within("[1, inf)"))  # per Ray worker, per step
    loader_workers: int = field(default=-1, metadata=within("[-1, inf)", "-1 = what the worker's CPUs allow"))
    # DataLoader processes per Ray worker; -1 = what the worker's CPUs allow:
    # train.cpus_per_worker - 1 (one CPU runs the training process), at least 1; 0 = load in the training process
    shuffle_buffer: int = field(default=1000, metadata=within("[0, inf)"))  # samples held for in-stream shuffling
    flip: float = field(default=0.5, metadata=within("[0, 1]"))  # horizontal flip probability
    pad: int = field(default=10, metadata=within("[0, inf)"))  # pad then random crop back to image_size (0 = off)
    random_erasing: float = field(default=0.5, metadata=within("[0, 1]"))  # probability of random erasing (0 = off)
    erasing_scale: list[float] = field(default_factory=lambda: [0.02, 0.4], metadata=within("[0, 1]", length=2))
    # (min, max) fraction of the image an erased box covers
    erasing_value: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0],
                                      metadata=within("(-inf, inf)", length=3))  # fill, in normalised units (IRRA:
    # the CLIP mean's numbers, as its RandomErasing(value=mean) after Normalize does)
    erasing_mode: Literal["constant", "pixel"] = "constant"  # constant (erasing_value) | pixel (per-pixel N(0, 1) noise: timm's mode
    # 'pixel', as IVT)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resize to image_size: bicubic | bilinear (IRRA: bilinear), PIL with antialias
    eval_interpolation: Optional[Literal["bicubic", "bilinear"]] = None  # the resize of val/test and search images;
    # null = interpolation (IRRA: bilinear for both) | bicubic | bilinear (IVT: T.Resize's default; bicubic in
    # training)
    decode: Literal["exact", "reduced"] = "exact"  # exact: every image fully decoded, then resized (the official
    # pipelines' pixels) | reduced: a JPEG at least twice image_size decoded at 1/2-1/8 scale by libjpeg (about 2x
    # faster on such images; other pixels: 35-47 dB PSNR to exact)
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073],
                             metadata=within("(-inf, inf)", length=3))  # CLIP statistics
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711],
                            metadata=within("(0, inf)", length=3))
    tokenizer: str = ""  # clip (CLIP BPE + IRRA's <|mask|>, built in) | a transformers tokenizer dir (local or
    # s3://) | "" = <url>/tokenizer
    sampling: Literal["pairs", "images"] = "pairs"  # pairs: every (image, caption) pair once per epoch (IRRA, IVT) | images: one random
    # caption per image per epoch
    sampler: Literal["random", "identity"] = "random"  # batch composition: random | identity (K units per identity, IVT's sampler; needs a
    # train split written with shards.build --group-ids)
    instances_per_id: int = field(default=4, metadata=within("[1, inf)"))
    # identity sampler: K pairs (or images) of one identity per group
    identity_blocks: int = field(default=1, metadata=within("[1, inf)"))
    # identity sampler: a batch = this many blocks of batch_size / blocks samples dealt
    # like ranks (IVT's 4-GPU run: 4 blocks of 7, identity groups split across blocks); 1 = whole groups of K
    last_batch: Literal["drop", "keep"] = "drop"  # the epoch's last batch, below batch_size (the rank's last
    # remainder once the loader workers' are joined): drop | keep (IRRA: its DataLoader's drop_last=False) -- kept on
    # one rank with train.grad_accum=1 and data.sampler=random; several ranks or micro-batches drop it
    on_bad_shard: OnBadShard = "error"  # a shard missing or differing from its manifest entry (size, sha256), or not a
    # readable tar: error (stop, naming it) | skip (log, count in metrics.json, go on; every rank keeps its batches)
    text_length: int = field(default=77, metadata=within("[3, inf)", "a start, an end and at least one word token"))
    # tokens per caption, [CLS]/[SEP] included
    mla_words: Literal["auto", "attributes", "clauses"] = "auto"  # IVT's word-level texts: attributes (CUHK-PEDES's
    # loader: attribute phrases, else split pieces) | clauses (ICFG-PEDES's and RSTPReid's: one comma clause) | auto =
    # the rule of IVT's loader for the dataset (its manifest's name): clauses on icfg-pedes and rstpreid
    seed: int = 0  # data order; epochs reshuffle deterministically from it

    def __post_init__(self):
        if isinstance(self.url, list):
            if self.mix:
                raise ConfigError("data.url is a list and data.mix is set: give the mixture once (data.url)")
            self.mix, members = list(self.url), self.url
            evals = [m for m in members if m.eval]
            if len(evals) != 1:
                raise ConfigError(f"data.url: a mixture needs exactly one member marked eval: true (its val and test "
                                  f"splits evaluate), got {len(evals)} of {len(members)}")
            self.url = evals[0].url
        for i, m in enumerate(self.mix):
            if not m.url:
                raise ConfigError(f"data.url[{i}]: a mixture member needs a url")
            if not m.weight > 0:
                raise ConfigError(f"data.url[{i}] ({m.url}): weight must be > 0, got {m.weight}")
        if len({m.url for m in self.mix}) != len(self.mix):
            raise ConfigError("data.url: a mixture lists the same dataset twice")
        if self.mix and self.sampler == "identity":
            raise ConfigError("data.sampler=identity works on one dataset, not a mixture (data.url list)")

    def check_fields(self, prefix: str) -> None:  # check_values
        lo, hi = self.erasing_scale
        if lo > hi:
            raise ConfigError(f"{prefix}erasing_scale must be [min, max] (the fraction of the image an erased box "
                              f"covers), got {self.erasing_scale}")


@dataclass
class LossTerm:
    name: str = "sdm"  # one of the method's supported_losses (itc, sdm, cmpm, id, mlm, cmr)
    weight: float = field(default=1.0, metadata=within("[0, inf)"))


def sweepable(*losses: str, within: str = "") -> dict:
    """Field metadata: a hyperparameter a sweep may vary, read only when one of ``losses`` is configured (none =
    always read). ``MethodConfig.hyperparameters`` collects them; nothing else lists a method's parameters.
    ``within``: its valid values, as ``within()``."""
    return {"sweep": losses, **({"within": Interval.parse(within)} if within else {})}


@dataclass
class MethodConfig:
    """``method.*``: what every method has. ``method.name`` picks the method's own class below (``METHOD_CONFIGS``),
    which adds its fields; keys another method has are rejected, naming the method's valid keys."""

    supported_losses: ClassVar[tuple[str, ...]] = ()

    name: str = "irra"  # clip | irra | ivt | pcc
    losses: list[LossTerm] = field(default_factory=list)  # loss terms and weights (the method's own default)
    temperature: float = field(default=0.02, metadata=sweepable("sdm", "itc", within="(0, inf)"))
    # SDM / ITC temperature tau
    # (logits = cos / tau)
    learnable_temperature: bool = field(default=False, metadata=sweepable("sdm", "itc"))  # CLIP-style learnable
    # logit scale, initialised from temperature
    gather: Optional[bool] = field(default=None, metadata=sweepable("sdm", "itc", "cmpm"))  # contrastive losses see
    # features gathered from all ranks (global negatives); null = the method's choice (IVT: local batches, as its
    # official code; clip/irra/pcc: global)

    def __post_init__(self):
        valid = self.supported_losses
        for i, term in enumerate(self.losses):
            if term.name not in valid:
                raise ConfigError(f"method.losses: {self.name} has no loss {term.name!r}; valid: {', '.join(valid)}")
        if not self.losses:
            raise ConfigError(f"method.losses is empty; {self.name} offers {', '.join(valid)}")

    def check_fields(self, prefix: str) -> None:  # check_values
        if self.learnable_temperature and 1 / self.temperature > LOGIT_SCALE_MAX:
            raise ConfigError(f"{prefix}temperature={self.temperature} with {prefix}learnable_temperature: a learnable "
                              f"logit scale is capped at {LOGIT_SCALE_MAX:g} as CLIP's (tau >= "
                              f"{1 / LOGIT_SCALE_MAX:g}), so it would start at the cap; a fixed temperature is not "
                              "capped")

    @classmethod
    def hyperparameters(cls, losses) -> set[str]:
        """The method.* fields that change this method's training with these loss terms (names or LossTerms): what a
        sweep may give it (a conditional search space)."""
        names = {getattr(t, "name", t) for t in losses}
        out = set()
        for f in dataclasses.fields(cls):
            if "sweep" in f.metadata and (not f.metadata["sweep"] or names & set(f.metadata["sweep"])):
                out.add(f.name)
        return out


LOGIT_SCALE_MAX = 100.0  # a learnable logit scale's cap (CLIP's): tau >= 0.01


def _losses(*terms):
    return field(default_factory=lambda: [LossTerm(n, w) for n, w in terms])


@dataclass
class ClipMethodConfig(MethodConfig):
    """The CLIP-style baseline: two towers, global features, ITC (or SDM) and an optional ID loss."""

    supported_losses: ClassVar[tuple[str, ...]] = ("itc", "sdm", "id")
    name: str = "clip"
    losses: list[LossTerm] = _losses(("itc", 1.0))


@dataclass
class IrraMethodConfig(MethodConfig):
    """IRRA: SDM + implicit relation reasoning (cross-modal MLM) + ID."""

    supported_losses: ClassVar[tuple[str, ...]] = ("sdm", "itc", "mlm", "id")
    name: str = "irra"
    losses: list[LossTerm] = _losses(("sdm", 1.0), ("mlm", 1.0), ("id", 1.0))
    mask_ratio: float = field(default=0.15, metadata=sweepable("mlm"))  # fraction of caption tokens masked for IRR
    cross_layers: int = field(default=4, metadata=sweepable("mlm", within="[1, inf)"))
    # transformer layers of the cross-modal encoder
    cross_heads: int = field(default=8, metadata=sweepable("mlm", within="[1, inf)"))  # heads of its cross-attention
    mlm_pad_mask: bool = False  # mask padding in the cross-modal encoder (the official code does not)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.mask_ratio < 1 or (self.mask_ratio == 0 and any(t.name == "mlm" for t in self.losses)):
            raise ConfigError(f"method.mask_ratio must be in (0, 1) with the mlm loss, got {self.mask_ratio}")


@dataclass
class IvtMethodConfig(MethodConfig):
    """IVT: one shared tower, multi-level alignment (CMPM over views and text levels), bidirectional mask modelling."""

    supported_losses: ClassVar[tuple[str, ...]] = ("cmpm", "sdm", "id")
    name: str = "ivt"
    losses: list[LossTerm] = _losses(("cmpm", 1.0))
    cmpm_norm: CmpmNorm = field(default="l2", metadata=sweepable("cmpm"))  # CMPM label rows: l2 (q = y / ||y||_2,
    # the official IVT/IRRA code) | sum (q = y / sum y)
    bmm_max_drop: float = field(default=0.2, metadata=sweepable(within="[0, 1)"))
    # BMM: per batch drop k ~ U{0..floor(this x N)}
    # of the N token positions
    linear_init: Literal["trunc_normal", "torch"] = "trunc_normal"  # the shared tower's Linear layers before any
    # weights load: trunc_normal (the official _init_weights: N(0, 0.02) weights, zero biases) | torch (PyTorch's
    # defaults, which train the tiny from-scratch preset much faster)


@dataclass
class PccMethodConfig(MethodConfig):
    """Park et al.: part-level correspondence, commonality-based margin ranking (CMR)."""

    supported_losses: ClassVar[tuple[str, ...]] = ("sdm", "itc", "cmr", "id")
    name: str = "pcc"
    losses: list[LossTerm] = _losses(("sdm", 1.0), ("cmr", 1.0), ("id", 0.5))
    num_parts: int = field(default=8, metadata=sweepable(within="[1, inf)"))
    # learnable part tokens shared by both modalities
    decoder_layers: int = field(default=2, metadata=sweepable(within="[1, inf)"))  # layers of the shared part decoder
    margin: float = field(default=0.2, metadata=sweepable("cmr", within="[0, inf)"))  # base margin of the CMR loss
    commonality: bool = field(default=True, metadata=sweepable("cmr"))  # scale each part's margin by its
    # distinctiveness (False = fixed margin)
    part_weight: float = field(default=0.5, metadata=sweepable(within="[0, inf)"))
    # weight of part similarity in retrieval
    # (similarity = global + w * parts)


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {"clip": ClipMethodConfig, "irra": IrraMethodConfig,
                                                 "ivt": IvtMethodConfig, "pcc": PccMethodConfig}


def method_config_class(name: str) -> type[MethodConfig]:
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"method.name: unknown method {name!r}; valid: {', '.join(sorted(METHOD_CONFIGS))}")
    return METHOD_CONFIGS[name]


@dataclass
class ModelConfig:
    pretrained: str = ""  # a whole model to start from (local path or s3://): a CLIP checkpoint (OpenAI .pt,
    # open_clip, transformers CLIPModel dir) or an IRRA run dir; sets the architecture fields below from it
    pretrained_grid: Literal["keep", "resize"] = "keep"  # an IVT checkpoint whose patch grid differs (IVT's pretrained model at stride 16
    # fine-tuned at 12): keep (the official: its position/type tables are skipped, the ones already there stay) |
    # resize (bilinear, CLS kept)
    activation: Literal["auto", "quick_gelu", "gelu"] = "auto"  # auto | quick_gelu | gelu: towers' MLP activation (auto: model.pretrained's, else the
    # towers' own defaults)
    image_tower: str = "vit_tiny_patch16_224"  # timm model name (no pretrained download)
    image_overrides: dict[str, Any] = field(default_factory=dict)  # timm constructor overrides (depth, embed_dim..)
    image_pretrained: str = ""  # local file/dir or s3:// URL of image-tower weights ("" = random init)
    patch_stride: int = field(default=0, metadata=within("[0, inf)", "0 = the patch size"))
    # 0 = patch size (no overlap); IVT uses 12 for overlapping patches
    image_pool: Literal["cls", "mean"] = "cls"  # global image feature: cls (the papers) | mean (of patch tokens; faster from scratch)
    text_tower: Literal["clip", "bert"] = "clip"  # clip | bert (transformers architectures)
    text_pool: Literal["eot", "mean"] = "eot"  # global text feature: eot (last real token, the papers) | mean (of real tokens)
    text_pretrained: str = ""  # local dir or s3:// URL of a transformers checkpoint ("" = random init)
    text_width: int = field(default=512, metadata=within("[1, inf)"))
    text_layers: int = field(default=12, metadata=within("[1, inf)"))
    text_heads: int = field(default=8, metadata=within("[1, inf)"))
    embed_dim: int = field(default=512, metadata=within("[1, inf)"))  # joint embedding size (IRRA/CLIP/PCC projection)
    shared_width: int = field(default=768, metadata=within("[1, inf)"))  # IVT shared tower width
    shared_layers: int = field(default=12, metadata=within("[1, inf)"))
    shared_heads: int = field(default=12, metadata=within("[1, inf)"))
    drop_path: float = field(default=0.0, metadata=within("[0, 1)"))
    # stochastic depth of the last block (linear from 0; IVT 0.1)
    text_dropout: float = field(default=0.0, metadata=within("[0, 1)"))
    # IVT: dropout after the text embeddings (BERT's hidden_dropout_prob; IVT 0.1);
    # a BERT text tower (PCC): its hidden and attention dropout (bert-base 0.1); the CLIP text tower has none


@dataclass
class OptimConfig:
    name: OptimName = "adam"  # adam | adamw | sgd
    lr: float = field(default=1e-5, metadata=within("(0, inf)"))
    new_module_lr_mult: float = field(default=5.0, metadata=within("[0, inf)"))
    # heads / cross-modal encoder / classifier learn faster (IRRA)
    bias_lr_mult: float = field(default=1.0, metadata=within("[0, inf)"))
    # biases outside head modules learn at lr x this (IRRA, IVT: 2)
    weight_decay: float = field(default=4e-5, metadata=within("[0, inf)"))
    bias_weight_decay: float = field(default=0.0, metadata=within("[0, inf)"))
    # weight decay of biases (IRRA 0; IVT: 1e-4)
    decay_norms: bool = False  # also decay norm weights, embeddings and other 1-D parameters (IRRA: true)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=within("[0, 1)", length=2))
    eps: float = field(default=1e-3, metadata=within("[0, inf)"))
    momentum: float = field(default=0.9, metadata=within("[0, inf)"))  # sgd
    warmup_epochs: float = field(default=5.0, metadata=within("[0, inf)"))
    warmup_start_factor: float = field(default=0.1, metadata=within("[0, 1]"))
    # lr starts at lr * this and rises linearly
    min_lr: float = field(default=0.0, metadata=within("[0, inf)"))  # cosine floor
    scheduler: Literal["cosine", "timm_cosine"] = "cosine"  # cosine: linear warm-up, then cosine over the remaining steps (IRRA) | timm_cosine:
    # timm's CosineLRScheduler as IVT runs it (epochs counted from 1, cosine over the whole run, warm-up start lr *
    # warmup_start_factor and floor min_lr the same absolute values for every group)
    schedule_per: Literal["iteration", "epoch"] = "iteration"  # iteration | epoch (the lr stays constant within an epoch: IRRA, IVT)
    grad_clip: float = field(default=0.0, metadata=within("[0, inf)", "0 = off"))  # max grad norm (0 = off)


@dataclass
class TrainConfig:
    run_name: str = "tbps"  # re-running with the same name resumes from its latest checkpoint
    storage_path: str = "./runs"  # local path or s3:// URL for checkpoints and results
    epochs: int = field(default=60, metadata=within("[1, inf)"))
    num_workers: Union[int, list[int]] = 2  # Ray Train workers; [min, max] = elastic (Ray Train's elastic scaling):
    # the run goes on with fewer workers (at least min) when a node is lost and grows back to max when capacity
    # returns; the per-worker batch stays data.batch_size, so the global batch follows the world size (logged)
    elastic_resize_interval_s: float = field(default=60.0, metadata=within("(0, inf)"))
    # elastic workers: seconds between Ray Train's checks for capacity
    # to grow back (ScalingConfig.elastic_resize_monitor_interval_s); a resize restarts from the last checkpoint
    use_gpu: bool = False
    cpus_per_worker: int = field(default=1, metadata=within("[1, inf)"))
    gpus_per_worker: float = field(default=1.0, metadata=within("(0, inf)"))
    zero_stage: int = field(default=0, metadata=within("[0, 3]"))  # DeepSpeed ZeRO stage 0-3
    precision: Precision = "auto"  # auto (bf16-autocast on GPU, fp32 on CPU) | bf16-autocast (fp32 weights,
    # torch.autocast forward) | fp16-autocast (the same in fp16 with dynamic loss scaling: torch's AMP, IVT's;
    # ZeRO-0) | bf16 (DeepSpeed: bf16 weights, fp32 master copy) | fp16 | fp32
    # | fp16-weights (IRRA's own: linear, conv and attention weights stored in fp16 and trained directly -- no fp32
    # master copy, no loss scaling -- the forward under fp16 autocast; ZeRO-0)
    grad_accum: int = field(default=1, metadata=within("[1, inf)"))  # micro-batches per optimizer step
    grad_cache: bool = False  # with grad_accum > 1: contrastive losses over the whole accumulated (and, with
    # method.gather, global) batch, one micro-batch's activations held at a time (tbps/gradcache.py); ZeRO 0-2;
    # with compile, random layers draw through eager's kernels so that both passes draw the same masks
    activation_checkpointing: bool = False  # towers and block stacks recompute activations in the backward
    compile: bool = False  # torch.compile the training forward (Method.features) and the eval encoders; ZeRO 0-2
    eval_every: int = field(default=1, metadata=within("[0, inf)", "0 = only at the end"))
    # epochs between val evaluations (0 = only at the end)
    select_metric: str = "R1"  # val metric that picks the best checkpoint: R1 | R5 | R10 | mAP | mINP | R1_mAP
    # ((R1 + mAP) / 2, IVT's)
    select_ties: Literal["first", "last"] = "first"  # of epochs with equal best values, the one kept: first (IRRA's
    # `best < value`) | last (IVT's `value >= best`)
    num_to_keep: int = field(default=2, metadata=within("[1, inf)"))  # checkpoints kept (mid-epoch ones included)
    checkpoint_every_steps: int = field(default=0, metadata=within("[0, inf)", "0 = at epoch ends only"))
    # also checkpoint every N optimizer steps within an epoch (0 = at epoch ends
    # only): engine, data position and loss sums, so a resume continues mid-epoch, no sample repeated or skipped
    max_failures: int = field(default=1, metadata=within("[-1, inf)", "-1 = no limit"))
    # worker failures survived (restart from the last checkpoint)
    log_every: int = field(default=20, metadata=within("[1, inf)"))  # steps between progress lines
    max_steps_per_epoch: int = field(default=0, metadata=within("[0, inf)", "0 = the whole epoch"))
    # 0 = the whole epoch (debug/bench knob)
    ray_address: str = ""  # "" = RAY_ADDRESS or a new local Ray
    ray_num_cpus: int = field(default=0, metadata=within("[0, inf)"))
    # logical CPUs for a local Ray (0 = max(cores, workers*cpus+2))
    worker_niceness: int = field(default=0, metadata=within("[0, 19]", "a process may only lower its own priority"))
    # nice value of the Train worker processes (Ray starts workers at 15), 0-19
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # train these seeds concurrently, one run each (<run_name>-seed<s>,
    # train.seed and data.seed = s), and summarise them: mean ± std and a 95 % interval (<run_name>/seeds.md)

    def worker_range(self) -> tuple[int, int]:
        """(min, max) Ray Train workers: equal for a fixed ``num_workers``."""
        n = self.num_workers
        if isinstance(n, int):
            lo = hi = n
        elif len(n) == 2:
            lo, hi = n
        else:
            raise ConfigError(f"train.num_workers: a number, or [min, max] for elastic workers; got {n!r}")
        if not 1 <= lo <= hi:
            raise ConfigError(f"train.num_workers must be >= 1 (and [min, max] with min <= max), got {n!r}")
        if self.elastic_resize_interval_s <= 0:
            raise ConfigError(f"train.elastic_resize_interval_s must be > 0 seconds, "
                              f"got {self.elastic_resize_interval_s}")
        return lo, hi


@dataclass
class EvalConfig:
    batch_size: int = field(default=256, metadata=within("[1, inf)"))
    query_chunk: int = field(default=1024, metadata=within("[1, inf)"))  # queries ranked at a time (bounds memory)
    test_every_epoch: bool = False  # also evaluate test whenever val is: metrics.json and the final table add the
    # best *test* epoch, labelled "test-selected (the papers' protocol)", beside ours (test at the best val epoch)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # what evaluation computes in on a GPU (on CPU: fp32),
    # under autocast | auto = as the official code evaluates a model trained in train.precision: fp16 for fp16-weights
    # (IRRA evaluates its fp16 model) and fp16, fp32 for fp16-autocast (IVT's inference runs outside its autocast) and
    # fp32, bf16 for bf16-autocast and bf16


@dataclass
class Config:
    method: MethodConfig = field(default_factory=IrraMethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------------------ loading
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        if tp is MethodConfig:  # the chosen method's own class
            name = value.get("name", MethodConfig.name)
            if not isinstance(name, str):
                raise ConfigError(f"{key}.name: expected a method name, got {name!r}")
            tp = method_config_class(name)
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:  # the first member the value fits
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        valid = typing.get_args(tp)
        if value not in valid:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, valid))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# keys earlier versions wrote into saved configs, with what replaced them: read with a warning and ignored, so
# checkpoints saved before still load
RETIRED = {"method.mla_word_max": "IVT's word level now follows the official code (attribute phrases)"}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types (messages name the key)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    retired = [k for k in data if k not in names and prefix + k in RETIRED]
    if retired:
        import warnings

        for k in retired:
            warnings.warn(f"config key {prefix}{k} is no longer used ({RETIRED[prefix + k]}); ignored")
        data = {k: v for k, v in data.items() if k not in retired}
    unknown = [k for k in data if k not in names]
    if unknown:
        if issubclass(cls, MethodConfig):
            other = sorted(n for n, c in METHOD_CONFIGS.items() if unknown[0] in {f.name for f in dataclasses.fields(c)})
            raise ConfigError(f"unknown config key {prefix}{unknown[0]} for method {cls.name}"
                              + (f" (a key of {', '.join(other)})" if other else "")
                              + f"; valid keys of {cls.name}: {', '.join(names)}")
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name_or_path: str, directory: str = PRESET_DIR, what: str = "config") -> str:
    """A YAML file path, or the preset of that name in ``directory``; the error lists the presets."""
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(directory, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.exists(candidate):
        return candidate
    names = sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".yaml"))
    raise ConfigError(f"{what} {name_or_path!r} not found: not a file, nor a preset ({', '.join(names)})")


def read_yaml_mapping(path: str) -> dict:
    """A YAML file whose top level is a mapping; errors name the file."""
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree


def read_yaml_tree(path: str) -> dict:
    """Read a config YAML; ``base: NAME`` inherits from another preset/file first."""
    tree = read_yaml_mapping(path)
    base = tree.pop("base", None)
    if base:
        inherited = read_yaml_tree(preset_path(base))
        if _method_name(tree) not in (None, _method_name(inherited, MethodConfig.name)):  # another method: its own section, afresh
            inherited.pop("method", None)
        tree = _deep_merge(inherited, tree)
    return tree


def _method_name(tree: dict, default=None):
    """The method a config tree names (``default`` when it names none)."""
    method = tree.get("method")
    return method.get("name", default) if isinstance(method, dict) else default


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. method.temperature=0.03)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(config: Optional[str] = None, overrides: Optional[list[str]] = None,
                values: Optional[dict[str, Any]] = None) -> Config:
    """Load a preset name or YAML path (None = defaults) and apply ``key=value`` overrides (text, as typed on a
    command line), then ``values`` (dotted key -> value, as a sweep samples them); every key and value is checked.
    An override naming another method than the preset's (``method.name=clip``) starts the method section from that
    method's defaults (the preset's method keys belong to its own method); the other method.* overrides apply."""
    tree = read_yaml_tree(preset_path(config)) if config else {}
    pairs = [parse_override(text) for text in overrides or []] + list((values or {}).items())
    names = [value for key, value in pairs if key == "method.name"]
    if names and names[-1] != _method_name(tree, MethodConfig.name):
        tree.pop("method", None)  # another method than the preset's: its section starts from that method's defaults
    for key, value in pairs:
        _set_dotted(tree, key, value)
    cfg = from_dict(Config, tree)
    check_values(cfg)
    return cfg


def saved_config(tree: dict, source: str = "config.yaml") -> Config:
    """A run's saved config (its config.yaml). Configs saved before methods had their own config classes held every
    method's fields in one flat section: the fields of other methods are dropped (they never applied). One saved
    before ``data.decode`` gets ``reduced``, the decoding that run trained with."""
    method = tree.get("method")
    if isinstance(method, dict):
        name = method.get("name", MethodConfig.name)
        own = {f.name for f in dataclasses.fields(method_config_class(name))}
        foreign = {f.name for c in METHOD_CONFIGS.values() for f in dataclasses.fields(c)} - own
        tree = {**tree, "method": {k: v for k, v in method.items() if k not in foreign}}
    data = tree.get("data")
    if isinstance(data, dict) and "decode" not in data:
        # saved before data.decode existed: that run decoded large JPEGs at reduced scale, and resumes and evaluates so
        tree = {**tree, "data": {**data, "decode": "reduced"}}
    try:
        cfg = from_dict(Config, tree)
        check_values(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# whole words of a key name ("aws_secret_access_key", "token"), not substrings ("tokenizer")
_SECRET = re.compile(r"(^|_)(secret|password|passwd|token|credentials?|access_key|private_key|api_key)(_|$)", re.I)
_URL_CREDS = re.compile(r"(://)([^/@:]+):([^/@]+)@")


def redact(tree):
    """Copy of a config tree with anything that looks like a credential replaced by '***'."""
    if isinstance(tree, dict):
        return {k: ("***" if _SECRET.search(str(k)) and v not in ("", None) else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return _URL_CREDS.sub(r"\1***:***@", tree)
    return tree


def flatten(tree: dict, keep: tuple[str, ...] = (), prefix: str = "") -> dict:
    """A nested mapping as {"a.b.c": value}; a mapping under a key in ``keep`` stays one value (a free-form field such
    as ``model.image_overrides``). For comparing two configs or specs key by key."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in keep:
            out.update(flatten(v, keep, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
