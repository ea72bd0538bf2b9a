"""Distributed training on a real local Ray cluster: ZeRO 1-3 across 2 workers, a full run with S3 storage that
survives a killed worker and resumes, and evaluating the saved checkpoint."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow
RUN = "fault-run"


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    import ray

    marker = str(tmp_path_factory.mktemp("fault") / "killed")
    env = {**s3_server["env"], "TBPS_FAULT_KILL": f"{RUN}:1:1:2", "TBPS_FAULT_MARKER": marker,
           "RAY_AUTH_MODE": "disabled",
           # workers unpickle test-defined train functions by module name
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": env})
    yield {"marker": marker}
    ray.shutdown()


def _zero_worker(config):
    """Runs in each Ray Train worker: every ZeRO stage trains a few steps, saves, and restores exactly."""
    import deepspeed
    import ray.train
    import torch

    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.engine.checkpoint import full_state_dict
    from tbps.engine.loop import deepspeed_config
    from tbps.methods import TextSpec, build_method
    from tbps.optim import build_optimizer

    rank = ray.train.get_context().get_world_rank()
    results = {}
    for stage in (1, 2, 3):
        cfg = load_config("clip_tiny", [f"data.url={config['url']}", "data.loader_workers=0", "data.batch_size=8",
                                        f"train.zero_stage={stage}", "optim.lr=1e-3", "optim.grad_clip=1.0"])
        # grad_clip 1.0: what these 6 steps at lr 1e-3 always ran with (DeepSpeed's default clipping applied
        # before #15 made optim.grad_clip=0 mean no clipping); without it the loss on one batch oscillates
        tok = load_tokenizer(os.path.join(config["url"], "tokenizer"))
        text = TextSpec.from_tokenizer(tok, cfg.data.text_length)
        batch = next(iter(build_train_loader(cfg.data, tok, rank=rank, world_size=2)))

        def make(seed):
            torch.manual_seed(seed)
            m = build_method(cfg, text, 40)
            engine, *_ = deepspeed.initialize(model=m, optimizer=build_optimizer(m, cfg.optim),
                                              config=deepspeed_config(cfg))
            return engine

        engine = make(0)
        losses = []
        for _ in range(6):
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        ckpt = os.path.join(config["dir"], f"stage{stage}")
        engine.save_checkpoint(ckpt, tag="t")
        before = full_state_dict(engine, stage)
        restored = make(123)
        restored.load_checkpoint(ckpt, tag="t")
        after = full_state_dict(restored, stage)
        same_weights = all(torch.equal(before[k], after[k]) for k in before)
        next_a = engine(batch)["loss"]
        next_b = restored(batch)["loss"]
        engine.backward(next_a)
        engine.step()
        restored.backward(next_b)
        restored.step()  # optimizer state restored too: the next update is identical
        again = float(engine(batch)["loss"].detach()), float(restored(batch)["loss"].detach())
        results[stage] = {"losses": losses, "same_weights": same_weights,
                          "same_next": abs(float(next_a) - float(next_b)) < 1e-6,
                          "same_after_step": abs(again[0] - again[1]) < 1e-5}
    with open(os.path.join(config["dir"], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_zero_stages_train_and_round_trip_across_two_workers(ray_cluster, synth_tiny, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(_zero_worker, train_loop_config={"url": synth_tiny, "dir": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="zero", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None, result.error
    for rank in (0, 1):
        results = json.load(open(tmp_path / f"rank{rank}.json"))
        for stage in ("1", "2", "3"):
            r = results[stage]
            assert r["losses"][-1] < r["losses"][0], (stage, r["losses"])
            assert r["same_weights"] and r["same_next"] and r["same_after_step"], (stage, r)


def test_run_survives_worker_kill_resumes_and_evaluates(ray_cluster, synth_tiny, tmp_path):
    import s3fs

    from shards.storage import read_json
    from tbps.config import load_config
    from tbps.engine.launcher import fit
    from tbps.evaluate import evaluate_checkpoint

    overrides = [f"data.url={synth_tiny}", "data.batch_size=8", f"train.run_name={RUN}",
                 "train.storage_path=s3://tbps/runs", "train.num_workers=2", "train.max_failures=1",
                 "train.num_to_keep=2", "train.log_every=5"]
    result = fit(load_config("irra_tiny", overrides + ["train.epochs=3"]))
    assert result.error is None, result.error
    assert os.path.exists(ray_cluster["marker"]), "the fault was not injected"
    run = read_json(f"s3://tbps/runs/{RUN}/metrics.json")
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3]  # epoch 2 redone once, from the epoch-1 checkpoint
    assert set(run["test"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert [w["niceness"] for w in run["workers"]] == [0, 0]  # train.worker_niceness, merged into the job's env
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert "run_name: fault-run" in fs.cat(f"tbps/runs/{RUN}/config.yaml").decode()  # resolved config saved
    assert fs.exists(f"tbps/runs/{RUN}/best/model.pt") and fs.exists(f"tbps/runs/{RUN}/tensorboard")

    # the same run name resumes: one more epoch, the first three untouched
    result = fit(load_config("irra_tiny", overrides + ["train.epochs=4"]))
    assert result.error is None, result.error
    again = read_json(f"s3://tbps/runs/{RUN}/metrics.json")
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3, 4]
    assert again["history"][:3] == run["history"]
    fs.invalidate_cache()
    checkpoints = [p for p in fs.ls(f"tbps/runs/{RUN}") if p.rsplit("/", 1)[1].startswith("checkpoint_2")]
    # num_to_keep=2: Ray deletes old checkpoints as new ones register; across the worker restart its checkpoint
    # manager is rebuilt and may leave one orphaned directory behind (seen intermittently), hence the +1
    assert 2 <= len(checkpoints) <= 3, checkpoints

    best = evaluate_checkpoint(f"s3://tbps/runs/{RUN}/best", split="test")
    assert best["gallery"] == 36 and best["queries"] == 72
    # one process over best/ reproduces the run's distributed (2-rank) test evaluation exactly
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert best[k] == pytest.approx(again["test"][k], abs=1e-9), k


def test_compiled_grad_cache_run_with_activation_checkpointing_trains_and_resumes(ray_cluster, synth_tiny, tmp_path):
    """#15's step options together in the real loop on 2 Ray workers: train.compile, train.grad_cache over
    train.grad_accum=2 micro-batches, train.activation_checkpointing; then the same run resumes for one more epoch."""
    from shards.storage import read_json
    from tbps.config import load_config
    from tbps.engine.launcher import fit

    base = [f"data.url={synth_tiny}", "data.batch_size=8", "train.run_name=compiled",
            f"train.storage_path={tmp_path}", "train.num_workers=2", "train.compile=true", "train.grad_cache=true",
            "train.grad_accum=2", "train.activation_checkpointing=true", "train.log_every=1",
            # one block per tower: the compile (each worker's own) is most of this test's time on a cold cache
            "model.image_overrides={patch_size: 8, embed_dim: 128, depth: 1, num_heads: 4}", "model.text_layers=1"]
    result = fit(load_config("clip_tiny", base + ["train.epochs=1"]))
    assert result.error is None, result.error
    first = read_json(str(tmp_path / "compiled" / "metrics.json"))
    result = fit(load_config("clip_tiny", base + ["train.epochs=2"]))
    assert result.error is None, result.error
    again = read_json(str(tmp_path / "compiled" / "metrics.json"))
    assert [h["epoch"] for h in again["history"]] == [1, 2] and again["history"][:1] == first["history"]
    steps = [h["step"] for h in again["history"]]
    assert steps[1] == 2 * steps[0] > 0  # optimizer steps: one per 2 micro-batches, counted across the resume
    assert all(h["train_loss"] == h["train_loss"] for h in again["history"])  # finite, not NaN
    assert set(again["test"]) >= {"R1", "mAP"}
