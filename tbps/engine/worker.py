"""The per-worker training loop (runs inside each Ray Train worker): DeepSpeed engine, streaming loaders,
per-iteration schedule, evaluation on val every N epochs, checkpoints reported to Ray, final test evaluation."""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from tbps.config import Config, dump_yaml, from_dict
from tbps.data import build_eval_loader, build_train_loader, load_manifest, load_tokenizer
from tbps.distributed import world
from tbps.eval import evaluate
from tbps.gradcache import grad_cache_step
from tbps.methods import TextSpec, build_method, create_method
from tbps.optim import build_optimizer, build_scheduler

from .checkpoint import DS_TAG, RunOutputs, full_state_dict, load_model_state, write_model_dir


def tokenizer_path(cfg: Config) -> str:
    from shards.storage import join

    return cfg.data.tokenizer or join(cfg.data.url, "tokenizer")


def resolve_precision(cfg: Config) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if cfg.train.use_gpu else "fp32"
    return p


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON, built from the config (never a module global)."""
    precision = resolve_precision(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # fp32 weights and optimizer, the forward under torch.autocast (matmuls, convolutions, attention in bf16)
        "torch_autocast": {"enabled": precision == "bf16-autocast", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,  # our optimizer is a plain torch one with parameter groups
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # always explicit: left out, DeepSpeed clips at norm 1.0 (its default), which optim.grad_clip=0 means not to
        "gradient_clipping": max(0.0, cfg.optim.grad_clip),
    }
    return ds


def initialize_engine(cfg: Config, method, optimizer, scheduler=None):
    """`deepspeed.initialize` with the config's JSON. With one data-parallel rank at ZeRO-0 in fp32 there is nothing
    to reduce, but DeepSpeed would still flatten every gradient into a buffer, all-reduce it with itself and copy it
    back after each backward (~5 % of a small model's step on CPU): that pass is switched off."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=method, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg))
    if engine.dp_world_size == 1 and cfg.train.zero_stage == 0 and resolve_precision(cfg) == "fp32":
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and dtype is not None:
                v = v.to(dtype)
        out[k] = v
    return out


def _maybe_inject_fault(run: str, rank: int, epoch: int, step: int) -> None:
    """Fault-injection hook for the fault-tolerance test: TBPS_FAULT_KILL="run:rank:epoch:step" kills this worker
    process (SIGKILL, no clean-up) once; TBPS_FAULT_MARKER names the file that records it happened."""
    spec = os.environ.get("TBPS_FAULT_KILL")
    marker = os.environ.get("TBPS_FAULT_MARKER")
    if not spec or not marker or os.path.exists(marker):
        return
    name, r, e, s = spec.rsplit(":", 3)
    if (name, int(r), int(e), int(s)) == (run, rank, epoch, step):
        with open(marker, "w") as f:
            f.write(f"killed rank {rank} pid {os.getpid()} at epoch {epoch} step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world()[1] for k, v in zip(keys, t)}


def _gather_placement(record: dict, world_size: int) -> list[dict]:
    if world_size == 1:
        return [record]
    out = [None] * world_size
    dist.all_gather_object(out, record)
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    import warnings

    import ray.train

    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
    cfg: Config = from_dict(Config, loop_config["config"])
    cfg.data.tokenizer = tokenizer_path(cfg)  # saved explicitly, so checkpoints stay usable with other data URLs
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    def log(message: str) -> None:
        # Ray Train V2 patches print() in workers to tee into both stdout and the root logger (every line twice in
        # the driver's output): write the progress line once, directly
        if rank == 0:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    tok = load_tokenizer(tokenizer_path(cfg))
    manifest = load_manifest(cfg.data.url)
    text = TextSpec.from_tokenizer(tok, cfg.data.text_length)
    method = create_method(cfg, text, manifest["num_train_ids"], log=log)  # fits cfg.model to model.pretrained
    if cfg.train.activation_checkpointing:
        switched = method.set_activation_checkpointing(True)
        log(f"[tbps] activation checkpointing: {', '.join(switched)}")
    train_loader = build_train_loader(cfg.data, tok, method.data_needs(), rank, world_size, manifest)
    accum = cfg.train.grad_accum
    batches = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        batches = min(batches, cfg.train.max_steps_per_epoch * accum)
    if batches < accum:
        raise ValueError(f"train.grad_accum {accum} needs at least {accum} batches per epoch; this rank has {batches}")
    steps_per_epoch = batches // accum
    batches = steps_per_epoch * accum  # whole optimizer steps only: no micro-batch carries over into the next epoch
    group_size = accum if cfg.train.grad_cache else 1  # micro-batches per call of the step
    optimizer = build_optimizer(method, cfg.optim, fused=cfg.train.use_gpu)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    engine, optimizer, scheduler = initialize_engine(cfg, method, optimizer, scheduler)

    def step_backward(surrogate, _):
        """grad_cache: each micro-batch's surrogate already carries the whole batch's scale (no 1/accum)."""
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()

    precision = resolve_precision(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # batches cast to the weights' dtype
    # evaluation: under autocast in the training precision on GPUs (bf16-autocast included)
    autocast = (torch.bfloat16 if precision == "bf16-autocast" else dtype) if cfg.train.use_gpu else None
    # plain copy for evaluation (no ZeRO collectives); its weights come from the training copy, not from storage
    eval_model = build_method(cfg, text, manifest["num_train_ids"]).to(device)
    if cfg.train.compile:  # after DeepSpeed has placed the parameters; graphs are built on the first step
        method.compile_step()
        eval_model.compile_encoders()
        log("[tbps] torch.compile: the training forward and the evaluation encoders (compiled on first use)")
    outputs = RunOutputs(cfg.train.storage_path, cfg.train.run_name)
    config_yaml = dump_yaml(cfg)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(outputs.path("tensorboard"))
        with open(outputs.path("config.yaml"), "w") as f:
            f.write(config_yaml)
        outputs.sync("config.yaml")

    def run_eval(split: str, state: dict) -> dict:
        eval_model.load_state_dict(state)
        loader = build_eval_loader(cfg.data, tok, split, cfg.eval.batch_size, rank, world_size, manifest)
        return evaluate(eval_model, loader, device, cfg.eval.query_chunk, autocast)

    # ---------------------------------------------------------------------------------------- resume
    start_epoch, global_step, best, best_epoch, history = 0, 0, -1.0, -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=DS_TAG)
        start_epoch, global_step = client["epoch"] + 1, client["step"]
        best, best_epoch, history = client["best"], client["best_epoch"], client["history"]
        log(f"[tbps] resumed from checkpoint of epoch {client['epoch'] + 1} (step {global_step})")
    metric = cfg.train.select_metric
    last_epoch = cfg.train.epochs - 1
    niceness, threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()
    log(f"[tbps] {cfg.method.name}: {sum(p.numel() for p in method.parameters()) / 1e6:.2f}M parameters, "
        f"{world_size} worker(s) x batch {cfg.data.batch_size} x accum {cfg.train.grad_accum}, "
        f"{steps_per_epoch} steps/epoch, ZeRO-{cfg.train.zero_stage}, {precision}, {threads} torch thread(s) "
        f"per worker at nice {niceness}")

    placement, read_shards = [], set()
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        engine.train()
        # loss sums stay on the device: values are read every log_every steps, not synchronised per step
        sums, n, seen, t0 = {}, 0, 0, time.time()
        group = []
        for i, batch in enumerate(train_loader):
            if i >= batches:
                break
            if epoch == start_epoch:
                read_shards.update(batch["shards"])
            group.append(_to_device(batch, device, dtype))
            if len(group) < group_size:
                continue
            if cfg.train.grad_cache:  # one optimizer step over the group, contrastive losses over all of it
                out = grad_cache_step(engine.module, group, forward=engine, backward=step_backward, device=device)
            else:
                out = engine(group[0])
                engine.backward(out["loss"])
                engine.step()  # applies the optimizer and the lr schedule at accumulation boundaries
                out = {k: v.detach() for k, v in out.items()}
            global_step = engine.global_steps
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v
            n += 1
            seen += sum(len(b["pids"]) for b in group) * world_size
            group = []
            _maybe_inject_fault(cfg.train.run_name, rank, epoch, i)
            if rank == 0 and ((i // group_size) % cfg.train.log_every == 0 or i == batches - 1):
                rate = seen / max(time.time() - t0, 1e-9)
                parts = " ".join(f"{k.replace('loss_', '')} {float(v):.3f}" for k, v in out.items() if k != "loss")
                log(f"[tbps] epoch {epoch + 1}/{cfg.train.epochs} step {i + 1}/{batches} loss "
                    f"{float(out['loss']):.4f} ({parts}) lr {scheduler.get_last_lr()[0]:.2e} {rate:.0f} samples/s")
        if epoch == start_epoch:  # where each rank runs and which train shards it read (metrics.json "workers")
            placement = _gather_placement({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                           "hostname": socket.gethostname(), "pid": os.getpid(),
                                           "niceness": niceness, "torch_threads": threads,
                                           "epoch": epoch + 1, "shards": sorted(read_shards)}, world_size)
        # one collective for the loss means and the skipped-shard count (its mean x world size = the sum)
        train = _mean_across_ranks({**{k: float(v) / max(n, 1) for k, v in sums.items()},
                                    "skipped_shards": float(len(train_loader.skipped))})
        skipped = train.pop("skipped_shards") * world_size
        metrics = {"epoch": epoch + 1, "step": global_step, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": seen / max(time.time() - t0, 1e-9),
                   **{f"train_{k}": v for k, v in train.items()}}
        if skipped or cfg.data.on_bad_shard == "skip":  # data.on_bad_shard=skip: train shards skipped, all ranks
            metrics["train_skipped_shards"] = int(round(skipped))
            if skipped:
                log(f"[tbps] epoch {epoch + 1}: {int(round(skipped))} bad train shard(s) skipped "
                    f"({', '.join(sorted(train_loader.skipped))} on rank 0)")
        state = full_state_dict(engine, cfg.train.zero_stage)
        is_best = False
        evaluate_now = (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0) or epoch == last_epoch
        if evaluate_now:
            val = run_eval(cfg.data.val_split, state)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            log(f"[tbps] epoch {epoch + 1} val ({cfg.data.val_split}): R1 {val['R1']:.2f} R5 {val['R5']:.2f} "
                f"R10 {val['R10']:.2f} mAP {val['mAP']:.2f} mINP {val['mINP']:.2f} (chance R1 "
                f"{val['chance_R1']:.2f})")
            if val[metric] > best:
                best, best_epoch, is_best = val[metric], epoch + 1, True
        metrics.update({f"best_val_{metric}": best, "best_epoch": best_epoch})
        history.append({k: v for k, v in metrics.items()})
        meta = {"epoch": epoch + 1, "step": global_step, "metrics": metrics, "method": cfg.method.name,
                "num_classes": manifest["num_train_ids"]}
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={
                "epoch": epoch, "step": global_step, "best": best, "best_epoch": best_epoch, "history": history})
            if rank == 0:
                write_model_dir(tmp, state, config_yaml, meta)
                if is_best:
                    outputs.replace_dir("best", lambda p: write_model_dir(p, state, config_yaml, meta))
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(k.replace("_", "/", 1), v, global_step)
                writer.flush()
                outputs.sync("tensorboard")
                outputs.write_json("metrics.json", {"run": cfg.train.run_name, "history": history,
                                                    "best_val": {"epoch": best_epoch, metric: best},
                                                    "workers": placement})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # -------------------------------------------------------------------------------------- final test
    if best_epoch < 0:
        raise RuntimeError("no validation result: set train.eval_every or train.epochs so val runs at least once")
    if world_size > 1:
        dist.barrier()  # rank 0 has published best/ before its last report; make sure before everyone reads it
    best_state = load_model_state(outputs.url + "/best" if "://" in outputs.url else os.path.join(outputs.url, "best"))
    test = run_eval(cfg.data.test_split, best_state)
    log(f"[tbps] test ({cfg.data.test_split}) with the best val checkpoint (epoch {best_epoch}): "
        f"R1 {test['R1']:.2f} R5 {test['R5']:.2f} R10 {test['R10']:.2f} mAP {test['mAP']:.2f} "
        f"mINP {test['mINP']:.2f} (chance R1 {test['chance_R1']:.2f})")
    final = {"epoch": cfg.train.epochs, "step": global_step, f"best_val_{metric}": best, "best_epoch": best_epoch,
             **{f"test_{k}": v for k, v in test.items()}}
    best_val = next((h for h in history if h["epoch"] == best_epoch), {})
    final.update({k: v for k, v in best_val.items() if k.startswith("val_")})
    if rank == 0:
        outputs.write_json("metrics.json", {"run": cfg.train.run_name, "history": history,
                                            "best_val": {"epoch": best_epoch, metric: best},
                                            "val": {k[4:]: v for k, v in best_val.items() if k.startswith("val_")},
                                            "test": test, "workers": placement})
        for k, v in test.items():
            writer.add_scalar(f"test/{k}", v, global_step)
        writer.close()
        outputs.sync("tensorboard")
    ray.train.report(final)
