"""The Ray Train shell around :class:`tbps.engine.loop.TrainRun`: rank, device, the checkpoint to resume from and
``ray.train.report``. Everything else -- the engine, the loaders, the epochs -- is in tbps/engine/loop.py."""

from __future__ import annotations

import torch

from tbps.config import Config, from_dict

from .loop import TrainRun


def train_loop_per_worker(loop_config: dict) -> None:
    import warnings

    import ray
    import ray.train

    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
    cfg: Config = from_dict(Config, loop_config["config"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run = TrainRun(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, report,
                   node_id=ray.get_runtime_context().get_node_id(), progress=loop_config.get("progress", "lines"),
                   label=loop_config.get("label", ""))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            run.resume(d)
    run.run()
