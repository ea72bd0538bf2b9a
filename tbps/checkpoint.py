"""Checkpoints: the model-directory format, and loading a method from any checkpoint tbps reads.

A model directory (a run's ``best/``, or a Ray ``checkpoint_*`` directory, beside DeepSpeed's ``ds/``) holds:
- ``model.pt`` — the full fp32 weights (``weights_only``-loadable), for evaluation/search without DeepSpeed;
- ``config.yaml`` — the resolved config (credentials redacted), so any result can be re-run and the model rebuilt;
- ``meta.json`` — epoch, global step, best val score so far, the metrics of that epoch, ``num_classes``.

``load_method(source)`` rebuilds a method, its config and its tokenizer from any of:
- a tbps model directory (local or on object storage);
- an official IRRA output directory (best.pth + configs.yaml, detected);
- an official IVT checkpoint file (``{"state_dict": ...}`` with encoder_vl.* keys, detected; built from the ivt
  preset, key=value ``overrides`` apply);
and ``load_method(config=PRESET, overrides=[...])`` builds a method from a preset and its configured pretrained
weights (``model.pretrained``: CLIP, IRRA runs, IVT; zero-shot). Used by ``tbps.evaluate`` and ``tbps.search``; the
engine writes the format (``tbps.engine.loop``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, NamedTuple

import torch
import yaml

from shards.storage import filesystem, join, read_bytes


class LoadedModel(NamedTuple):
    """What ``load_method`` returns (unpacks as ``method, cfg, tokenizer``): the method in eval mode on the device,
    its ``tbps.config.Config`` and the tokenizer its text side was built with."""

    method: Any
    config: Any
    tokenizer: Any


def write_model_dir(path: str, state: dict, config_yaml: str, meta: dict) -> None:
    """A model directory in the local folder ``path`` (the engine stages it, then publishes it atomically)."""
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "model.pt"))
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(config_yaml)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_model_state(url: str) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint directory (local or remote) or a model.pt file, with ``weights_only``."""
    target = url if url.endswith(".pt") else join(url, "model.pt")
    return torch.load(io.BytesIO(read_bytes(target)), map_location="cpu", weights_only=True)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_saved_config(directory: str):
    """The Config a run directory or a checkpoint saved (its config.yaml); errors name the file."""
    from tbps.config import ConfigError, saved_config

    source = join(directory, "config.yaml")
    tree = yaml.safe_load(read_text(source))
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a saved tbps config (a mapping), got {type(tree).__name__}")
    return saved_config(tree, source)


def _irra_run(run_dir: str, data_url: str | None, device: str = "cpu") -> LoadedModel:
    """(method, cfg, tokenizer) from an official IRRA output directory: the irra preset fitted to its configs.yaml."""
    from tbps.config import load_config
    from tbps.data import load_tokenizer
    from tbps.methods import TextSpec, build_method
    from tbps.methods.pretrained import fit_config, irra_args_to_config, load_weights, read_irra_run

    if not data_url:
        raise ValueError(f"{run_dir} is an IRRA run directory, which names no tbps dataset: give --data URL")
    run = read_irra_run(run_dir, "--checkpoint")
    cfg = load_config("irra", [f"data.url={data_url}", f"model.pretrained={run_dir}"])
    irra_args_to_config(cfg, run.args)
    tok = load_tokenizer(cfg.data.tokenizer)
    text = TextSpec.from_tokenizer(tok, cfg.data.text_length)
    fit_config(cfg, run, text)
    classifier = run.heads.get("classifier.weight")
    method = build_method(cfg, text, classifier.shape[0] if classifier is not None else 1)
    load_weights(method, cfg, run)
    return LoadedModel(method.to(device).eval(), cfg, tok)


def _from_config(config: str, overrides: list[str], data_url: str | None = None, device: str = "cpu",
                 checkpoint=None) -> LoadedModel:
    """(method, cfg, tokenizer) built from a preset and its configured pretrained weights, without training
    (``checkpoint``: model.pretrained already read)."""
    from tbps.config import load_config
    from tbps.data import load_manifest, load_tokenizer
    from tbps.methods import TextSpec, create_method

    cfg = load_config(config, overrides)
    if data_url:
        cfg.data.url = data_url
    if not cfg.data.url:
        raise ValueError("give the dataset with --data URL (or data.url=...)")
    tok = load_tokenizer(cfg.data.tokenizer or join(cfg.data.url, "tokenizer"))
    num_classes = load_manifest(cfg.data.url).get("num_train_ids", 1)
    method = create_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), num_classes,
                           log=lambda m: print(m, file=sys.stderr), checkpoint=checkpoint)
    return LoadedModel(method.to(device).eval(), cfg, tok)


def is_model_file(url: str) -> bool:
    """A single file (an official IVT checkpoint), not a directory."""
    from shards.storage import filesystem

    fs, path = filesystem(url)
    return fs.isfile(path)


def run_directory_hint(url: str) -> str | None:
    """For a training run's directory given where a model directory is wanted: the message that names its best/
    (the run's model directories are best/ and checkpoint_*/); None for anything else."""
    fs, path = filesystem(url)
    if fs.exists(join(path, "meta.json")) or not fs.exists(join(path, "best", "meta.json")):
        return None
    return (f"{url} is a training run's directory, not a checkpoint: give its best val epoch's weights, "
            f"{join(url, 'best')}, or one of its checkpoint_* directories")


def _from_checkpoint(checkpoint: str, data_url: str | None = None, device: str = "cpu",
                     overrides: list[str] | None = None) -> LoadedModel:
    """(method, cfg, tokenizer) rebuilt from a tbps checkpoint directory, an official IRRA run directory or an
    official IVT checkpoint file (``overrides`` apply to the last, built from the ivt preset)."""
    from tbps.data import load_tokenizer
    from tbps.methods import TextSpec, build_method
    from tbps.methods.pretrained import IvtCheckpoint, is_irra_run, read_pretrained

    if is_model_file(checkpoint):
        weights = read_pretrained(checkpoint)  # read once, handed on
        if not isinstance(weights, IvtCheckpoint):
            raise ValueError(f"{checkpoint} is a file but not an official IVT checkpoint; --checkpoint takes a tbps "
                             "checkpoint directory, an IRRA output directory or an IVT .pth (CLIP weights: --config "
                             "PRESET model.pretrained=FILE)")
        return _from_config("ivt", [f"model.pretrained={checkpoint}", *(overrides or [])], data_url, device,
                            weights)
    if overrides:
        raise ValueError(f"key=value overrides ({overrides[0]}) apply to --config and to official IVT checkpoint "
                         f"files; {checkpoint} is a directory whose config is fixed")
    if is_irra_run(checkpoint):
        return _irra_run(checkpoint, data_url, device)
    try:
        cfg = read_saved_config(checkpoint)
        meta = json.loads(read_text(join(checkpoint, "meta.json")))
    except FileNotFoundError as e:
        hint = run_directory_hint(checkpoint)
        if hint:
            raise FileNotFoundError(hint) from None
        raise FileNotFoundError(f"{checkpoint} is not a tbps checkpoint (config.yaml/meta.json missing; a best/ "
                                f"being replaced on object storage lacks meta.json until its upload ends): {e}"
                                ) from None
    if data_url:
        cfg.data.url = data_url
    tok = load_tokenizer(cfg.data.tokenizer)
    # the checkpoint holds every weight (cfg.model is already fitted to model.pretrained): nothing else is read
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), meta["num_classes"])
    method.load_state_dict(load_model_state(checkpoint))
    return LoadedModel(method.to(device).eval(), cfg, tok)


def load_method(source: str | None = None, *, config: str | None = None, overrides: list[str] | None = None,
                data_url: str | None = None, device: str = "cpu") -> LoadedModel:
    """A method ready for retrieval: from ``source`` (a tbps model directory, an IRRA output directory or an IVT
    checkpoint file; see the module doc) or, with ``config``, from a preset and its configured weights. ``data_url``
    replaces the dataset the config names (the tokenizer and the identity count of a preset come from it)."""
    if (source is None) == (config is None):
        raise ValueError("load_method: give a checkpoint (source) or a preset (config=...), not both")
    if config is not None:
        return _from_config(config, list(overrides or []), data_url, device)
    return _from_checkpoint(source, data_url, device, overrides)
