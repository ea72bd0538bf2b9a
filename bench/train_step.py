"""Training-step throughput per method: samples/s, peak memory and model FLOPs utilisation (MFU) of forward +
backward + optimizer step on one device, eager and compiled (``train.compile``'s ``Method.compile_step``).

    python bench/train_step.py                          # CPU presets (clip_tiny, irra_tiny, ivt_tiny, pcc_tiny)
    python bench/train_step.py --paper --json OUT.json  # paper configs (ViT-B/16, 384x128) on a GPU: batch 64, 128,
                                                        # 256, eager and compiled, bf16 autocast
    python bench/train_step.py --paper --max-batch      # largest IRRA batch that fits, with and without
                                                        # activation checkpointing / grad_cache
    python bench/train_step.py --quick                  # 2 steps per method, small batch: checks everything runs (CI)
    python bench/train_step.py [--paper] --engine         # the same step plain and through DeepSpeed's engine in
                                                        # one process, interleaved (goal: <= 5 % over plain)
    python bench/train_step.py --paper --profile irra --batches 64 [--compile on]
                                                        # where one step's time goes: host synchronisations, graph
                                                        # breaks, kernels launched, device busy time, top operators
                                                        # (on CPU, eager: the synchronisations a CUDA step would
                                                        # make, found by tbps.syncs)

Inputs are synthetic batches with the exact shapes and fields each method trains on (IRR masks, IVT's three views
and three text levels, 4 images per identity), built without the data pipeline, so the script runs where only
torch, timm and transformers are installed (the GPU machine); bench/data.py measures the loader. FLOPs per step are
counted with torch.utils.flop_counter on one eager step (matmuls, convolutions, attention; forward + backward);
MFU = achieved FLOP/s over the device's dense bf16 peak. Every attention runs through PyTorch SDPA (tested in
tests/test_step_options.py). ``--json`` writes the rows (method, preset, batch, compiled, precision, samples_per_s,
mfu, peak_mem_gb, device, ...) for docs/bench/train_step_<gpu>.json.

Goal (issue #15): >= 45 % MFU for IRRA's paper step on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # bench/overhead.py's paired ratios

CPU_PRESETS = ("clip_tiny", "irra_tiny", "ivt_tiny", "pcc_tiny")
PAPER_PRESETS = ("irra", "clip", "pcc", "ivt")
# Synthetic captions are at most this long: the ivt preset pads to BERT's 512 positions (as IVT's tokenizer call does
# not truncate) and its forward cuts the padding, so its step costs what its captions' lengths make it; 100 was the
# preset's data.text_length until 2026-12-07, which keeps earlier measurements comparable
BENCH_TEXT_LENGTH = 100
COMPILED = {"off": [False], "on": [True], "both": [False, True]}  # --compile: the rows' eager/compiled steps
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}
# paper configs' tokenizers: size, pad, mask, bos, eos (tbps's CLIP tokenizer with IRRA's mask; BERT-base uncased)
VOCAB = {"clip": (49408, 0, 49405, 49406, 49407), "bert": (30522, 0, 103, 101, 102)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synthetic_batch(cfg, method, text, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A training batch of the shapes ``method`` trains on: normalised images (3 views for IVT), captions padded to
    data.text_length, of random lengths from a quarter of to all of ``BENCH_TEXT_LENGTH`` (or data.text_length, the
    shorter), with their masks, IRR's masked captions, IVT's three text levels, 4 images per identity."""
    from tbps.data.text import mlm_rows

    g = torch.Generator().manual_seed(seed)
    needs = method.data_needs()
    h, w = cfg.data.image_size
    shape = (batch_size, needs.views, 3, h, w) if needs.views > 1 else (batch_size, 3, h, w)
    L = cfg.data.text_length
    longest = min(L, BENCH_TEXT_LENGTH)

    def texts(n):
        lengths = torch.randint(longest // 4, longest + 1, (n,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        low = min(1000, text.vocab_size // 2)  # ordinary words, clear of the special tokens at either end
        ids = torch.randint(low, text.vocab_size - 10, (n, L), generator=g) * mask
        ids[:, 0] = text.bos_id
        ids[torch.arange(n), lengths - 1] = text.eos_id
        return ids, mask

    ids, mask = texts(batch_size)
    pids = torch.arange(batch_size) // 4
    batch = {"images": torch.randn(shape, generator=g), "text_ids": ids, "text_mask": mask, "pids": pids,
             "train_ids": pids % max(1, method.num_classes)}
    if needs.mlm_ratio > 0:
        chosen = (torch.rand(ids.shape, generator=g) < needs.mlm_ratio) & mask.bool()
        chosen[:, 0] = False
        batch["mlm_ids"] = ids.masked_fill(chosen, text.mask_id)
        batch["mlm_labels"] = ids.masked_fill(~chosen, -100)  # as mask_tokens: -100 where not chosen
        batch["mlm_rows"] = mlm_rows(batch["mlm_labels"])  # as the loader: the rows the MLM head scores
    if needs.mla:
        level_ids, level_mask = zip(*(texts(batch_size) for _ in range(3)))
        batch["mla_ids"], batch["mla_mask"] = torch.stack(level_ids, 1), torch.stack(level_mask, 1)
        batch["mla_length"] = int(batch["mla_mask"].sum(-1).max())
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def setup(preset: str, batch_size: int, device: torch.device, overrides=()):
    from tbps.config import load_config
    from tbps.methods import TextSpec, build_method

    cfg = load_config(preset, [f"data.batch_size={batch_size}", *overrides])
    if preset in PAPER_PRESETS:
        size, pad, mask, bos, eos = VOCAB[cfg.model.text_tower if cfg.method.name != "ivt" else "bert"]
        text = TextSpec(size, cfg.data.text_length, pad, mask, bos, eos)
    else:  # the tiny presets train with ToyPEDES' word-level tokenizer (generated into the cache on first use)
        from tbps.data import load_tokenizer
        from tbps.demo import demo_dataset

        text = TextSpec.from_tokenizer(load_tokenizer(os.path.join(demo_dataset("tiny"), "tokenizer")),
                                       cfg.data.text_length)
    torch.manual_seed(0)
    method = build_method(cfg, text, 11003 if preset in PAPER_PRESETS else 40).to(device)
    batch = synthetic_batch(cfg, method, text, batch_size, device)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-5, fused=True)
    return cfg, method, batch, opt


def step_fn(method, batch, opt, device: torch.device, autocast: bool, grad_cache_micro: int = 0, host_batch=None,
            clip: float = 0.0, scheduler=None, dtype: torch.dtype = torch.bfloat16, scaler=None):
    """One training step on ``batch``; with ``host_batch`` (a copy in host memory), each step first copies it to the
    device with ``non_blocking=True``, as the training loop copies every loader batch. ``clip`` > 0: the gradients'
    norm clipped (as DeepSpeed's ``gradient_clipping``); ``scheduler``: stepped after the optimizer. ``autocast``: the
    forward under autocast in ``dtype`` (bf16, or fp16 for the fp16 precisions); ``scaler``: a torch GradScaler
    (``fp16-autocast``, torch's AMP)."""
    params = [p for p in method.parameters() if p.requires_grad]

    def step():
        nonlocal batch
        if host_batch is not None:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in host_batch.items()}
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
            if grad_cache_micro:
                from tbps.gradcache import grad_cache_step

                n = len(batch["pids"]) // grad_cache_micro
                micro = [{k: (v[i * grad_cache_micro:(i + 1) * grad_cache_micro] if torch.is_tensor(v) else v)
                          for k, v in batch.items()} for i in range(n)]
                loss = grad_cache_step(method, micro, device=device)["loss"]
            else:
                loss = method(batch)["loss"]
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if clip > 0:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def compile_options(mode: str | None) -> dict:
    """torch.compile's keyword arguments for ``--compile-mode`` (None: torch's default mode, what ``train.compile``
    uses). ``reduce-overhead`` replays the step's kernels as CUDA graphs: the candidate against a launch-bound step."""
    return {"mode": mode} if mode else {}


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


PRECISIONS = ("auto", "bf16-autocast", "fp16-autocast", "fp16-weights", "fp32")


def precision_step(method, precision: str, device: torch.device, opt):
    """What the step runs in for ``--precision`` (``train.precision``'s names; auto = bf16-autocast on a GPU, fp32
    on CPU): (resolved name, autocast on, its dtype, a GradScaler or None, the optimizer). ``fp16-weights`` converts
    the method as IRRA does (``tbps.methods.base.fp16_weights``) and steps it with torch's default Adam (IRRA's, eps
    1e-3: its moments fp16 too); ``fp16-autocast`` is torch's AMP (IVT's)."""
    if precision == "auto":
        precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    if precision == "fp16-weights":
        from tbps.methods.base import fp16_weights

        fp16_weights(method)
        opt = torch.optim.Adam(method.parameters(), lr=1e-5, eps=1e-3)
    from tbps.methods.base import compute_dtype

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-autocast" else None
    dtype = compute_dtype(precision)
    return precision, dtype is not None, dtype or torch.bfloat16, scaler, opt


def measure(preset: str, batch_size: int, steps: int, warmup: int, device: torch.device, compiled: bool,
            mode: str | None = None, copy: str | None = None, precision: str = "auto") -> dict:
    """``copy``: each step also copies its batch from host memory, ``pageable`` (as a loader hands batches over
    without pinning) or ``pinned`` (page-locked, as the DataLoader's pinning thread leaves them; GPU only).
    ``precision``: see ``precision_step``."""
    cfg, method, batch, opt = setup(preset, batch_size, device)
    precision, autocast, dtype, scaler, opt = precision_step(method, precision, device, opt)
    flops = count_flops(step_fn(method, batch, opt, device, autocast, dtype=dtype, scaler=scaler))  # model FLOPs
    if compiled:
        method.compile_step(**compile_options(mode))
    host = None
    if copy:
        host = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        if copy == "pinned":
            host = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in host.items()}
    step = step_fn(method, batch, opt, device, autocast, host_batch=host, dtype=dtype, scaler=scaler)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"{preset}: non-finite loss {float(loss)}")
    peak = peak_flops(device)
    return {"method": cfg.method.name, "preset": preset, "batch": batch_size, "compiled": compiled,
            "compile_mode": (mode or "default") if compiled else None, "batch_copy": copy or "none",
            "precision": precision, "image": "x".join(map(str, cfg.data.image_size)),
            "params_m": sum(p.numel() for p in method.parameters()) / 1e6, "step_ms": seconds * 1000,
            "samples_per_s": batch_size / seconds, "tflop_per_sample": flops / batch_size / 1e12,
            "tflops": flops / seconds / 1e12, "mfu": (flops / seconds / peak) if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "device": device_name(device), "torch": torch.__version__}


def fits(preset: str, batch_size: int, device: torch.device, checkpointing: bool, micro: int) -> bool:
    """One step of ``batch_size`` (with grad_cache: ``micro``-sized micro-batches) runs without running out of
    memory."""
    try:
        cfg, method, batch, opt = setup(preset, batch_size, device)
        if checkpointing:
            method.set_activation_checkpointing(True)
        step_fn(method, batch, opt, device, device.type == "cuda", micro)()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        method = batch = opt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_batch(preset: str, device: torch.device, limit: int) -> list[dict]:
    """Largest batch (a power of two up to ``limit``) one step fits, per memory option."""
    rows = []
    for checkpointing, micro in ((False, 0), (True, 0), (False, 64), (True, 64)):
        best, b = 0, 64
        while b <= limit and fits(preset, b, device, checkpointing, micro):
            best, b = b, b * 2
        rows.append({"method": preset, "preset": preset, "activation_checkpointing": checkpointing,
                     "grad_cache_micro_batch": micro or None, "max_batch": best, "limit": limit,
                     "device": device_name(device)})
        print(f"| {preset} | {'yes' if checkpointing else 'no'} | {micro or '—'} | {best}"
              f"{'+' if best == limit else ''} |", flush=True)
    return rows


def host_syncs(step, device: torch.device, compiled: bool) -> list[str] | None:
    """The host synchronisations one call of ``step`` makes. On CUDA: each one torch's sync debug mode reports. On
    CPU, eager: those ``tbps.syncs`` finds that a CUDA step would make (BMM's draws on the host left out). None for
    a compiled step on CPU (the audit does not look into compiled graphs)."""
    import warnings

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    if compiled:
        return None
    from tbps.syncs import HostSyncAudit

    with HostSyncAudit(host_side=("tbps/models/shared.py:bmm_keep",)) as audit:
        step()
    return [str(s) for s in audit.syncs]


def profile(preset: str, batch_size: int, device: torch.device, compiled: bool, steps: int, top: int = 25,
            overrides=(), mode: str | None = None) -> dict:
    """Where a step's time goes: the host synchronisations one step makes, the compiled graph's breaks, the number of
    device kernels (CPU: operators) launched per step, the fraction of the wall time the device is busy, and the
    operators that take the most time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg, method, batch, opt = setup(preset, batch_size, device, overrides)
    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()
        method.compile_step(**compile_options(mode))
    step = step_fn(method, batch, opt, device, device.type == "cuda")
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    syncs = host_syncs(step, device, compiled)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6 / steps  # microseconds -> seconds, per step
        launched = len(kernels) / steps
    else:
        busy, launched = None, sum(1 for e in prof.events() if e.cpu_parent is None) / steps
    breaks = None
    if compiled:
        from torch._dynamo.utils import counters

        breaks = {str(k): v for k, v in counters["graph_break"].items()}
    sort = "device_time_total" if cuda else "cpu_time_total"
    print(f"\n## profile: {preset}, batch {batch_size}, {'compiled' if compiled else 'eager'}, {device_name(device)}")
    print(f"step {wall * 1000:.1f} ms; " + (f"device busy {busy * 1000:.1f} ms ({100 * busy / wall:.0f} %); "
                                           f"{launched:.0f} kernels per step; " if cuda else
                                           f"{launched:.0f} top-level operators per step; ")
          + (f"{len(syncs)} host synchronisations per step" if syncs is not None else ""))
    for line in sorted(set(syncs or [])):
        print(f"  sync: {line} (x{syncs.count(line)})")
    if breaks is not None:
        print(f"graph breaks: {sum(breaks.values())}")
        for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  break x{n}: {reason[:200]}")
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=60))
    return {"method": cfg.method.name, "preset": preset, "batch": batch_size, "compiled": compiled,
            "compile_mode": (mode or "default") if compiled else None, "step_ms": wall * 1000,
            "device_busy_ms": busy * 1000 if busy is not None else None,
            "kernels_per_step" if cuda else "operators_per_step": launched,
            "host_syncs_per_step": len(syncs) if syncs is not None else None, "syncs": sorted(set(syncs or [])),
            "graph_breaks": breaks, "device": device_name(device), "torch": torch.__version__}


ENGINE_ARMS = ("plain", "deepspeed")  # + "deepspeed-bf16" on a GPU


def failed_row(preset: str, batch_size: int, compiled: bool, device: torch.device, error: Exception, **extra) -> dict:
    """The row of a measurement that raised: its traceback printed, its error kept, the device's cache emptied so
    that the next measurement starts clean. A failure, not a measurement: docs/bench/ keeps only measured rows."""
    import traceback

    traceback.print_exception(error)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "batch": batch_size, "compiled": compiled, **extra,
            "error": f"{type(error).__name__}: {error}"[:500], "device": device_name(device), "torch": torch.__version__}


def _single_process_group(device: torch.device) -> None:
    """A one-rank torch process group, without a launcher; DeepSpeed's communication layer starts on it inside
    ``initialize_engine`` (which first clears a stale build lock of its CPU op, as in a Train worker)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def engine_arm(arm: str, preset: str, batch_size: int, device: torch.device, compiled: bool, zero_stage: int = 0):
    """One contender of ``engine_compare``, built from the same seed, weights and batch as the others: the step
    function and its description. ``plain``: forward + backward under bf16 autocast on a GPU (fp32 on CPU), the
    config's gradient clipping, tbps's optimizer (``build_optimizer``: parameter groups, fused as on a GPU) and lr
    schedule. ``deepspeed``: the same through DeepSpeed's engine, built as tbps.train builds it (``initialize_engine``
    with the config's JSON) at the same precision (``bf16-autocast``, tbps's default on GPUs; fp32 on CPU), stepped by
    the worker's ``train_step`` (tbps's gradient clipping). ``deepspeed-bf16``: the engine in DeepSpeed's bf16 mode
    (bf16 weights, fp32 master copy; the GPU default before 2026-11-24)."""
    from tbps.optim import build_optimizer, build_scheduler

    cuda = device.type == "cuda"
    cfg, method, batch, _ = setup(preset, batch_size, device)
    cfg.train.use_gpu, cfg.train.zero_stage = cuda, zero_stage
    optimizer = build_optimizer(method, cfg.optim, fused=True)  # as on a GPU (CPU too: its step counts stay tensors)
    scheduler = build_scheduler(optimizer, cfg.optim, 10**6, cfg.train.epochs)
    if arm == "plain":
        if compiled:
            method.compile_step()
        step = step_fn(method, batch, optimizer, device, cuda, clip=cfg.optim.grad_clip, scheduler=scheduler)
        return step, "bf16-autocast" if cuda else "fp32", cfg.method.name

    from tbps.engine.loop import initialize_engine, tbps_clip_norm, train_step

    _single_process_group(device)
    cfg.train.precision = "bf16" if arm == "deepspeed-bf16" else "bf16-autocast" if cuda else "fp32"
    engine, _, _ = initialize_engine(cfg, method, optimizer, scheduler)
    if compiled:  # as the worker does: after DeepSpeed has placed the parameters
        method.compile_step()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    if dtype is not None:  # the worker casts batches to the weights' precision
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}

    clip = tbps_clip_norm(cfg)

    def engine_step():
        return train_step(engine, [batch], grad_cache=False, clip=clip)["loss"]
    return engine_step, cfg.train.precision, cfg.method.name


def engine_compare(preset: str, batch_size: int, device: torch.device, compiled: bool, rounds: int, block: int,
                   warmup: int, zero_stage: int = 0) -> list[dict]:
    """The same training step, plain PyTorch against DeepSpeed's engine in one process (issue #15: <= 5 % over the
    plain step). The contenders run interleaved, a block of steps each per round in a rotating order, and each
    engine's ratio pairs its block with the plain block of the same round (bench/overhead.py's method). First, as a
    check that they compute the same step: every contender's first loss from the shared initial weights. An engine
    that fails to build or step gives a row with its ``error`` instead; the others are still compared."""
    from statistics import median

    from overhead import paired_ratio

    arms = list(ENGINE_ARMS) + (["deepspeed-bf16"] if device.type == "cuda" else [])
    built, first, syncs, failed = {}, {}, {}, []
    for arm in arms:
        try:
            built[arm] = engine_arm(arm, preset, batch_size, device, compiled, zero_stage)
            step = built[arm][0]
            torch.manual_seed(1)
            first[arm] = float(step().detach())  # the step from the shared initial weights
            for _ in range(warmup):
                step()
            syncs[arm] = host_syncs(step, device, compiled)
        except Exception as e:  # an engine that cannot run here costs its own row, not the comparison's others
            if arm == "plain":
                raise
            built.pop(arm, None)
            failed.append(failed_row(preset, batch_size, compiled, device, e, step=arm, zero_stage=zero_stage))
    arms = [arm for arm in arms if arm in built]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step, n):  # one block: its mean step, synchronised at the block's ends only (as ``measure``)
        sync()
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return [(time.perf_counter() - t) / n]

    blocks = {arm: [] for arm in arms}
    for r in range(rounds):
        for k in range(len(arms)):
            arm = arms[(r + k) % len(arms)]  # no contender always goes first
            blocks[arm].append(timed(built[arm][0], block))
    rows = []
    for arm in arms:
        ratio, lo, hi = paired_ratio(blocks[arm], blocks["plain"]) if arm != "plain" else (1.0, 1.0, 1.0)
        step_s = median(t for b in blocks[arm] for t in b)
        rows.append({"method": built[arm][2], "preset": preset, "batch": batch_size, "compiled": compiled,
                     "step": arm, "precision": built[arm][1], "zero_stage": zero_stage if arm != "plain" else None,
                     "step_ms": step_s * 1000, "samples_per_s": batch_size / step_s, "vs_plain": ratio,
                     "vs_plain_interval": [lo, hi], "first_loss": first[arm],
                     "first_loss_vs_plain": abs(first[arm] - first["plain"]) / max(abs(first["plain"]), 1e-12),
                     "host_syncs_per_step": len(syncs[arm]) if syncs[arm] is not None else None,
                     "syncs": sorted(set(syncs[arm] or [])),
                     "rounds": rounds, "block": block, "device": device_name(device), "torch": torch.__version__})
    return rows + failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paper", action="store_true", help="paper configs (needs a GPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", nargs="*", help="override the preset list")
    ap.add_argument("--batches", nargs="*", type=int,
                    help="batch sizes (default: 32 on CPU presets, 64 128 256 on paper configs)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default=None,
                    help="eager, compiled or both (default: both on a GPU, off on CPU)")
    ap.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune",
                                               "max-autotune-no-cudagraphs"),
                    help="torch.compile's mode for the compiled rows (default: torch's default, as train.compile)")
    ap.add_argument("--copy", nargs="+", choices=("none", "pageable", "pinned"), default=["none"],
                    help="each step first copies its batch from host memory: pageable or pinned (GPU), or not")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["auto"],
                    help="the step's precision(s), train.precision's names (auto: bf16-autocast on a GPU, fp32 on "
                         "CPU); fp16-weights and fp16-autocast are the irra/clip and ivt presets' own")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-batch", action="store_true", help="largest IRRA batch per memory option (GPU)")
    ap.add_argument("--max-batch-limit", type=int, default=8192)
    ap.add_argument("--profile", nargs="+", metavar="PRESET",
                    help="profile one step of these presets (at --batches, eager unless --compile on/both)")
    ap.add_argument("--engine", action="store_true",
                    help="the same step plain and through DeepSpeed's engine in one process, interleaved (needs "
                         "deepspeed; default presets: irra_tiny clip_tiny, or irra with --paper)")
    ap.add_argument("--zero-stage", type=int, default=0, help="--engine: the engine's ZeRO stage")
    ap.add_argument("--rounds", type=int, default=12, help="--engine: interleaved rounds")
    ap.add_argument("--block", type=int, default=5, help="--engine: timed steps per contender and round")
    ap.add_argument("--json", help="write the rows as a JSON list here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if (args.paper or args.max_batch) and device.type != "cuda":
        print("--paper / --max-batch need a GPU (the paper configs are ViT-B/16 at 384x128, bf16)", file=sys.stderr)
        return 2
    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    rows = []

    def save():  # after every row: a run cut off by a time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    mode = None if args.compile_mode in (None, "default") else args.compile_mode
    if "pinned" in args.copy and device.type != "cuda":
        print("--copy pinned needs a GPU (page-locked memory is a device driver's)", file=sys.stderr)
        return 2
    if args.profile:
        batches = args.batches or ([64] if args.paper else [32])
        modes = COMPILED[args.compile or "off"]
        for preset in args.profile:
            for batch in batches:
                for compiled in modes:
                    try:
                        rows.append(profile(preset, batch, device, compiled, 2 if args.quick else args.steps,
                                            mode=mode))
                    except Exception as e:  # one cell's failure costs that cell, not the rest of a device call
                        rows.append(failed_row(preset, batch, compiled, device, e))
                        print(f"## profile: {preset}, batch {batch}: failed: {rows[-1]['error']}", flush=True)
                    save()
    elif args.engine:
        presets = args.presets or (["clip_tiny"] if args.quick else ["irra"] if args.paper
                                   else ["irra_tiny", "clip_tiny"])
        batches = args.batches or ([4] if args.quick else [128] if args.paper else [32])
        modes = COMPILED[args.compile or ("on" if device.type == "cuda" and not args.quick else "off")]
        rounds, block, warmup = (2, 2, 1) if args.quick else (args.rounds, args.block, args.warmup)
        print("| preset | step | precision | batch | compiled | step ms | samples/s | vs plain | 90 % interval | "
              "host syncs | first loss vs plain |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for preset in presets:
            for batch in batches:
                for compiled in modes:
                    for r in engine_compare(preset, batch, device, compiled, rounds, block, warmup, args.zero_stage):
                        rows.append(r)
                        step = r["step"] if r["zero_stage"] is None else f"{r['step']} ZeRO-{r['zero_stage']}"
                        if "error" in r:
                            print(f"| {preset} | {step} | | {batch} | {'yes' if compiled else 'no'} | failed: "
                                  f"{r['error'][:200]} |", flush=True)
                            continue
                        lo, hi = r["vs_plain_interval"]
                        print(f"| {preset} | {step} | {r['precision']} | {batch} | {'yes' if compiled else 'no'} | "
                              f"{r['step_ms']:.1f} | {r['samples_per_s']:.1f} | {r['vs_plain']:.3f} | "
                              f"{lo:.3f}-{hi:.3f} | {'—' if r['host_syncs_per_step'] is None else r['host_syncs_per_step']}"
                              f" | {r['first_loss_vs_plain']:.1e} |", flush=True)
                    save()
    elif args.max_batch:
        print("| preset | activation checkpointing | grad_cache micro-batch | largest batch |\n|---|---|---|---|")
        for preset in args.presets or ("irra",):
            rows += max_batch(preset, device, args.max_batch_limit)
            save()
    else:
        presets = args.presets or (PAPER_PRESETS if args.paper else CPU_PRESETS)
        batches = args.batches or ([4] if args.quick else [64, 128, 256] if args.paper else [32])
        compile_modes = COMPILED[
            args.compile or ("both" if device.type == "cuda" and not args.quick else "off")]
        steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
        print("| preset | method | image | batch | compiled | params (M) | step ms | samples/s | TFLOP/sample | "
              "TFLOP/s | MFU | peak GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        cells = [(p, b, c, k, q) for p in presets for b in batches for c in compile_modes for k in args.copy
                 for q in args.precision]
        for preset, batch, compiled, copy, precision in cells:
            try:
                r = measure(preset, batch, steps, warmup, device, compiled, mode, None if copy == "none" else copy,
                            precision)
            except torch.OutOfMemoryError:
                print(f"| {preset} | | | {batch} | {compiled} | out of memory |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            except Exception as e:  # one cell's failure costs that cell, not the rest of a device call
                rows.append(failed_row(preset, batch, compiled, device, e, copy=copy, compile_mode=mode,
                                       precision=precision))
                save()
                print(f"| {preset} | | | {batch} | {compiled} | failed: {rows[-1]['error'][:200]} |", flush=True)
                continue
            rows.append(r)
            save()
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
            mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "—"
            shown = (mode or "yes") if compiled else "no"
            name = preset if copy == "none" else f"{preset} ({copy} copy)"
            if precision != "auto":
                name = f"{name} ({r['precision']})"
            print(f"| {name} | {r['method']} | {r['image']} | {batch} | {shown} | "
                  f"{r['params_m']:.1f} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | "
                  f"{r['tflop_per_sample']:.4f} | {r['tflops']:.3f} | {mfu} | {mem} |", flush=True)
    if args.json:
        save()
        print(f"wrote {len(rows)} rows to {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
