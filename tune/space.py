"""Sweep specifications: a YAML file naming the methods to compare, each with its preset, and a conditional search
space over tbps config keys. No Ray here: the sampling function is plain Optuna define-by-run, so it can be checked
(and used) without a cluster.

    name: smoke                     # experiment name: results under <storage_path>/<name>
    storage_path: ./runs/sweeps     # local path or s3:// URL
    data_url: ""                    # "" = the ToyPEDES demo set (generated on first use)
    metric: mAP                     # val metric the search, ASHA and the best checkpoint use: R1 R5 R10 mAP mINP
    num_samples: 4                  # trials
    seed: 0                         # Optuna sampler seed
    scheduler: {grace_period: 1, reduction_factor: 2}   # ASHA over epochs
    resources: {cpus: 0, gpus: 0}   # budget for concurrent trials (0 = what the Ray cluster has)
    overrides: {train.epochs: 4}    # tbps config keys set in every trial
    space:                          # shared: each method gets only the parameters it has
      method.temperature: {loguniform: [0.01, 0.1]}
    methods:
      irra:
        config: irra_tiny           # tbps preset or YAML file
        data_url: ""                # this method's copy of the dataset ("" = data_url), e.g. IVT's, written by
                                    # identity (shards.build --group-ids ...)
        overrides: {}               # this method only
        space:                      # this method only; a parameter it does not have is an error
          method.mask_ratio: {uniform: [0.1, 0.3]}
          loss.mlm: {uniform: [0.5, 2.0]}        # the weight of one of the method's loss terms

Distributions: ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}``, ``{choice: [a, b, ...]}``
or a constant.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


from tbps.config import (METHOD_CONFIGS, Config, ConfigError, check_values, from_dict, load_config, parse_override,
                         preset_path, read_yaml_mapping)
from tbps.eval.metrics import SELECT_METRICS  # the metrics a sweep can select on (R1_mAP: IVT's (R1 + mAP) / 2)

PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SECTIONS = typing.get_type_hints(Config)


Metric = Literal[SELECT_METRICS]  # type: ignore[valid-type]


# The sweep file's layout, read by tbps.config's typed machinery (unknown keys and wrong types are errors naming
# the key), then turned into a SweepSpec
@dataclass
class SchedulerFields:
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class ResourcesFields:
    cpus: float = 0.0
    gpus: float = 0.0


@dataclass
class MethodFields:
    config: str = ""
    data_url: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepFile:
    name: str = "sweep"
    storage_path: str = "./runs/sweeps"
    data_url: str = ""
    metric: Metric = "R1"
    num_samples: int = 8
    seed: int = 0
    scheduler: SchedulerFields = field(default_factory=SchedulerFields)
    resources: ResourcesFields = field(default_factory=ResourcesFields)
    max_concurrent: int = 0  # 0 = derived from resources
    driver_cpus: float = 1.0  # CPU held by each trial's driver (the Tune function that runs the TorchTrainer)
    seeds: int = 1  # > 1: after the search, each method's best configuration is trained again with this many seeds
    # (concurrently); results.md, the plot and best.yaml's choice then use their mean ± std and 95 % interval
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpace:
    name: str
    config: str  # tbps preset name or YAML path
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)  # key -> distribution, only this method's parameters
    # this method's copy of the sweep's dataset ("" = the sweep's data_url): the same dataset converted as its
    # preset needs (IVT's identity sampler: shards.build --group-ids; its ICFG-PEDES/RSTPReid caption rule)
    data_url: str = ""


@dataclass
class SweepSpec:
    """A validated sweep (defaults: SweepFile's, the one place they are written)."""
    name: str
    storage_path: str
    data_url: str
    metric: str
    num_samples: int
    seed: int
    grace_period: int
    reduction_factor: int
    cpus: float
    gpus: float
    max_concurrent: int
    driver_cpus: float
    seeds: int
    overrides: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, MethodSpace] = field(default_factory=dict)
    source: str = "<sweep>"

    # ------------------------------------------------------------------------------------------ trial configs
    def base_config(self, method: str, params: dict | None = None) -> Config:
        """The tbps Config of one trial: method preset <- sweep overrides <- method overrides <- sampled params."""
        m = self.methods[method]
        overrides = {"train.eval_every": 1, **self.overrides, **m.overrides}  # ASHA compares val every epoch
        if m.data_url or self.data_url:
            overrides["data.url"] = m.data_url or self.data_url
        overrides["train.select_metric"] = self.metric
        losses = {}
        for key, value in (params or {}).items():
            if key.startswith("loss."):
                losses[key[5:]] = float(value)
            else:
                overrides[key] = value
        cfg = load_config(m.config, values=overrides)
        if cfg.method.name != method:
            raise ConfigError(f"{self.source}: methods.{method}.config {m.config!r} is a {cfg.method.name!r} preset")
        if cfg.train.checkpoint_every_steps:
            raise ConfigError(f"{self.source}: train.checkpoint_every_steps is for training runs, not sweeps: a "
                              "mid-epoch checkpoint is reported without val metrics, which Tune and ASHA compare "
                              "every epoch; leave it 0 (checkpoints at epoch ends)")
        present = {t.name for t in cfg.method.losses}
        for name, weight in losses.items():
            if name not in present:
                raise ConfigError(f"{self.source}: loss.{name} is not a loss term of {method} "
                                  f"(its losses: {', '.join(sorted(present))})")
            next(t for t in cfg.method.losses if t.name == name).weight = weight
        check_values(cfg)  # the loss weights set here
        return cfg

    def params_for(self, method: str) -> dict[str, Any]:
        return dict(self.methods[method].space)

    def epochs(self) -> int:
        return max(self.base_config(m).train.epochs for m in self.methods)

    # ------------------------------------------------------------------------------------------ sampling
    def define_by_run(self, trial) -> None:
        """Optuna define-by-run: the method first, then only that method's parameters (named ``<method>.<key>``)."""
        method = trial.suggest_categorical("method", sorted(self.methods))
        for key, dist in self.params_for(method).items():
            suggest(trial, f"{method}.{key}", dist)

    @staticmethod
    def split(config: dict) -> tuple[str, dict]:
        """(method, {key: value}) from a trial config produced by ``define_by_run``."""
        method = config["method"]
        prefix = method + "."
        return method, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        d = dict(d)
        d["methods"] = {k: MethodSpace(**v) for k, v in d["methods"].items()}
        return cls(**d)


def suggest(trial, name: str, dist):
    if not isinstance(dist, dict):
        return trial.suggest_categorical(name, [dist])
    (kind, arg), = dist.items()
    if kind == "uniform":
        return trial.suggest_float(name, float(arg[0]), float(arg[1]))
    if kind == "loguniform":
        return trial.suggest_float(name, float(arg[0]), float(arg[1]), log=True)
    if kind == "int":
        return trial.suggest_int(name, int(arg[0]), int(arg[1]))
    return trial.suggest_categorical(name, list(arg))


# ---------------------------------------------------------------------------------------------- loading
def _check_distribution(where: str, dist) -> None:
    if not isinstance(dist, dict):
        return  # a constant
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{uniform|loguniform|int: [lo, hi]}}, {{choice: [..]}} or a "
                          f"constant, got {dist!r}")
    (kind, arg), = dist.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: choice needs a non-empty list, got {arg!r}")
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {arg!r}")
    lo, hi = arg
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}: int needs integer bounds, got [{lo}, {hi}]")


def _representatives(dist) -> list:
    if not isinstance(dist, dict):
        return [dist]
    (kind, arg), = dist.items()
    if kind == "choice":
        return list(arg)
    if kind == "int":
        return [int(arg[0]), int(arg[1])]
    return [float(arg[0]), float(arg[1])]


def applies(method: str, key: str, cfg: Config) -> bool:
    """Whether config key ``key`` (or ``loss.<name>``) is a parameter of ``method`` configured as ``cfg``."""
    if key.startswith("loss."):
        return key[5:] in {t.name for t in cfg.method.losses}
    section, _, name = key.partition(".")
    if section == "method":
        return name in type(cfg.method).hyperparameters(cfg.method.losses)
    return True


def _check_key(where: str, key: str) -> None:
    if key.startswith("loss."):
        return
    section, _, name = key.partition(".")
    classes = METHOD_CONFIGS.values() if section == "method" else [SECTIONS.get(section)]  # any method's field
    if section not in SECTIONS or "." in name or not any(name in {f.name for f in dataclasses.fields(c)}
                                                         for c in classes):
        raise ConfigError(f"{where}: {key!r} is not a tbps config key (section.field, e.g. method.temperature) "
                          f"nor loss.<name>")
    if key in ("method.name", "method.losses"):
        raise ConfigError(f"{where}: {key} is chosen by the sweep itself (list methods under `methods:`; tune loss "
                          f"weights as loss.<name>)")


def load_sweep(path_or_name: str, cli: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep YAML (a path or a preset name in tune/configs), applying ``key=value`` overrides:
    sweep fields (``num_samples=8``, ``data_url=...``) or, for any other dotted key, tbps config overrides for every
    trial (``train.num_workers=4``); ``methods.<name>.data_url=URL`` and ``methods.<name>.<tbps key>=value`` set one
    listed method's dataset copy and overrides."""
    path = preset_path(path_or_name, PRESET_DIR, "sweep")
    tree = read_yaml_mapping(path)
    simple = {f.name for f in dataclasses.fields(SweepSpec)} - {"overrides", "methods", "source"}
    for text in cli or []:
        key, value = parse_override(text)
        if key == "data.url":  # the sweep's dataset is its data_url field; as a trial override the demo would win
            key = "data_url"
        if key.startswith("methods."):
            _, name, leaf = (key.split(".", 2) + [""])[:3]
            methods = tree.get("methods") or {}
            if name not in methods:
                raise ConfigError(f"override {text!r}: {name!r} is not a method of {path} (it lists "
                                  f"{', '.join(methods) or 'none'}); give methods.<method>.data_url=URL or "
                                  "methods.<method>.<section.key>=value")
            if not isinstance(methods[name] or {}, dict):
                raise ConfigError(f"{path}: methods.{name} must be a mapping (config, data_url, overrides, space)")
            body = methods[name] = dict(methods[name] or {})
            if leaf in ("data_url", "data.url"):
                body["data_url"] = value
            else:
                _check_key(f"override {text!r}", leaf)
                body["overrides"] = {**(body.get("overrides") or {}), leaf: value}
            continue
        if key in simple or key in ("scheduler.grace_period", "scheduler.reduction_factor", "resources.cpus",
                                    "resources.gpus"):
            section, _, leaf = key.rpartition(".")
            (tree.setdefault(section, {}) if section else tree)[leaf] = value
        else:
            _check_key(f"override {text!r}", key)
            tree.setdefault("overrides", {})[key] = value
    return _build(tree, path)


def _typed(cls, tree: dict, source: str, prefix: str = ""):
    try:
        return from_dict(cls, tree, prefix)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _build(tree: dict, source: str) -> SweepSpec:
    allowed = {f.name for f in dataclasses.fields(SweepFile)}
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown sweep key {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
    tree = {k: ({} if v is None and k in ("scheduler", "resources", "overrides", "space", "methods") else v)
            for k, v in tree.items()}
    f: SweepFile = _typed(SweepFile, tree, source)
    spec = SweepSpec(name=f.name, storage_path=f.storage_path, data_url=f.data_url, metric=f.metric,
                     num_samples=f.num_samples, seed=f.seed, grace_period=f.scheduler.grace_period,
                     reduction_factor=f.scheduler.reduction_factor, cpus=f.resources.cpus, gpus=f.resources.gpus,
                     max_concurrent=f.max_concurrent, driver_cpus=f.driver_cpus, seeds=f.seeds, source=source)
    for key in ("num_samples", "seed", "max_concurrent", "grace_period", "reduction_factor", "cpus", "gpus",
                "driver_cpus", "seeds"):
        if getattr(spec, key) < 0:
            raise ConfigError(f"{source}: {key} must be non-negative, got {getattr(spec, key)!r}")
    if spec.metric not in SELECT_METRICS:
        raise ConfigError(f"{source}: metric must be one of {', '.join(SELECT_METRICS)}, got {spec.metric!r}")
    if spec.num_samples < 1:
        raise ConfigError(f"{source}: num_samples must be at least 1")
    if spec.seeds < 1:
        raise ConfigError(f"{source}: seeds must be at least 1")
    if spec.reduction_factor < 2:
        raise ConfigError(f"{source}: scheduler.reduction_factor must be at least 2")
    spec.overrides = dict(f.overrides)
    for key in spec.overrides:
        _check_key(f"{source}: overrides", key)
    if "data.url" in spec.overrides:
        raise ConfigError(f"{source}: overrides: data.url: a sweep's dataset is its data_url field (data_url: URL)")
    shared = dict(f.space)
    for key, dist in shared.items():
        _check_key(f"{source}: space", key)
        _check_distribution(f"{source}: space.{key}", dist)
    methods = f.methods
    if not methods:
        raise ConfigError(f"{source}: methods is empty: list at least one method with its config")
    for name, body in methods.items():
        where = f"{source}: methods.{name}"
        if name not in METHOD_CONFIGS:
            raise ConfigError(f"{where}: unknown method {name!r}; valid: {', '.join(sorted(METHOD_CONFIGS))}")
        body = _typed(MethodFields, {k: ({} if v is None and k != "config" else v)
                                     for k, v in _mapping(body, where).items()}, source, f"methods.{name}.")
        config = body.config or name
        preset_path(config)  # raises naming the preset
        ms = MethodSpace(name, config, dict(body.overrides), dict(body.space), body.data_url)
        for key in ms.overrides:
            _check_key(where + ".overrides", key)
        if "data.url" in ms.overrides:  # base_config would replace it with data_url, silently
            raise ConfigError(f"{where}.overrides: data.url: a method's copy of the dataset is its data_url field "
                              f"(methods.{name}.data_url: URL)")
        spec.methods[name] = ms
        cfg = spec.base_config(name)  # validates the preset + overrides
        for key, dist in ms.space.items():
            _check_key(where + ".space", key)
            _check_distribution(f"{where}.space.{key}", dist)
            if not applies(name, key, cfg):
                have = sorted(f"method.{f}" for f in type(cfg.method).hyperparameters(cfg.method.losses)) + \
                    sorted(f"loss.{t.name}" for t in cfg.method.losses)
                raise ConfigError(f"{where}.space: {key} is not a parameter of {name} as configured "
                                  f"(its method parameters: {', '.join(have)}; or any model/data/optim/train key)")
        # shared parameters go to the methods that have them, unless the method sets its own
        for key, dist in shared.items():
            if key not in ms.space and applies(name, key, cfg):
                ms.space[key] = dist
        for key, dist in ms.space.items():  # every value the space can produce must make a valid config
            for value in _representatives(dist):
                try:
                    spec.base_config(name, {key: value})
                except ConfigError as e:
                    raise ConfigError(f"{where}: {key}={value!r} does not make a valid config: {e}") from None
    # a shared parameter no listed method has would be dropped, and the sweep would not vary it at all
    for key in shared:
        if not any(key in ms.space for ms in spec.methods.values()):  # (merged above where it applies)
            raise ConfigError(f"{source}: space.{key} is not a parameter of any method of this sweep "
                              f"({', '.join(spec.methods)}), so no trial would vary it: move it under the method that "
                              "has it, or list that method")
    if not any(ms.space for ms in spec.methods.values()) and spec.num_samples > len(spec.methods):
        print(f"[tune] warning: {source}: the sweep has no search space, so its {spec.num_samples} trials train the "
              f"same {len(spec.methods)} configuration(s) again; set `seeds: N` to repeat a configuration with "
              "other seeds, or add a space", file=sys.stderr)
    return spec


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)
