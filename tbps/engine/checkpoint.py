"""The engine's side of checkpoints, and run outputs.

A Ray checkpoint directory holds ``ds/`` — DeepSpeed's state (model, optimizer and scheduler; one optimizer shard per
rank under ZeRO), written by every rank and merged by Ray into one directory on storage — beside a model directory
(``model.pt``, ``config.yaml``, ``meta.json``: the format of ``tbps.checkpoint``, which reads it back).

Run outputs beside Ray's checkpoints, under ``<storage_path>/<run_name>/``: ``best/`` (model.pt + config.yaml +
meta.json of the best val epoch), ``metrics.json`` (history, best val, final test) and ``tensorboard/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from shards.storage import filesystem, is_local, join, with_retries

DS_TAG = "ds"


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The complete fp32 state dict on every rank (ZeRO-3 gathers partitioned parameters; all ranks must call)."""
    module = engine.module

    def copy():
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()


class RunOutputs:
    """``<storage_path>/<run_name>/`` on any fsspec storage; writes go through a local staging dir when remote."""

    def __init__(self, storage_path: str, run_name: str):
        self.url = join(storage_path, run_name)
        self.fs, self.root = filesystem(self.url)
        self.local = self.root if is_local(self.fs) else tempfile.mkdtemp(prefix="tbps-run-")
        os.makedirs(self.local, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def sync(self, *parts: str) -> None:
        """Upload a staged file or directory to remote storage (no-op when storage is local)."""
        if is_local(self.fs):
            return
        src = self.path(*parts)
        dst = "/".join([self.root, *parts])
        label = join(self.url, *parts)
        if os.path.isdir(src):
            with_retries("upload", label, lambda: self.fs.put(src.rstrip("/") + "/", dst, recursive=True))
        elif os.path.exists(src):
            with_retries("upload", label, lambda: self.fs.put(src, dst))

    def write_json(self, name: str, data) -> None:
        tmp = self.path(name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path(name))
        self.sync(name)

    def read_json(self, name: str):
        """A JSON file of the run outputs as the storage holds it, or None when there is none."""
        from shards.storage import read_json

        try:
            return read_json(join(self.url, name))
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        """Delete a file of the run outputs, here and on the storage (nothing when it is not there)."""
        if os.path.exists(self.path(name)):
            os.remove(self.path(name))
        if not is_local(self.fs) and self.fs.exists(f"{self.root}/{name}"):
            with_retries("delete", join(self.url, name), lambda: self.fs.rm(f"{self.root}/{name}"))

    def replace_dir(self, name: str, build, marker: str = "meta.json") -> None:
        """Build a directory in staging, swap it in, upload it. On object storage, where a directory of several
        objects cannot be replaced at once, the old ``marker`` (a file readers need: a checkpoint directory without
        meta.json is refused) is deleted first and the new one uploaded last: a reader meets the old directory,
        the new one, or one that is refused while it is written -- never new weights with old metadata."""
        tmp = self.path(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(self.path(name), ignore_errors=True)
        os.replace(tmp, self.path(name))
        if is_local(self.fs):
            return
        src, dst, label = self.path(name), f"{self.root}/{name}", join(self.url, name)
        files = sorted(os.listdir(src))
        if marker in files:
            def unpublish():
                if self.fs.exists(f"{dst}/{marker}"):
                    self.fs.rm(f"{dst}/{marker}")
            with_retries("unpublish", f"{label}/{marker}", unpublish)
            files = [f for f in files if f != marker] + [marker]
        for f in files:
            path = os.path.join(src, f)
            if os.path.isdir(path):
                with_retries("upload", f"{label}/{f}", lambda: self.fs.put(path.rstrip("/") + "/", f"{dst}/{f}",
                                                                           recursive=True))
            else:
                with_retries("upload", f"{label}/{f}", lambda: self.fs.put(path, f"{dst}/{f}"))
