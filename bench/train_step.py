"""Training-step throughput per method: samples/s of forward + backward + optimizer step on one device, and — on a
GPU — model FLOPs utilisation (MFU) of the paper configs.

    python bench/train_step.py                  # CPU presets (clip_tiny, irra_tiny, ivt_tiny, pcc_tiny)
    python bench/train_step.py --paper          # paper configs (ViT-B/16, 384x128, batch 64, bf16) on a GPU
    python bench/train_step.py --quick          # 2 steps per method, small batch: checks everything runs (CI)

Batches come from the real data pipeline (SynthPEDES tiny, generated into the cache on first use) so every method
gets the inputs it trains on (IRR masks, IVT's three views and multi-level texts); one batch is reused, so the
numbers are model compute only (bench/data.py measures the loader). FLOPs per step are counted with
torch.utils.flop_counter on one step (matmuls/convolutions/attention, forward + backward); MFU = achieved FLOP/s
over the device's dense bf16 peak. Attention runs through PyTorch SDPA (timm's fused attention, transformers'
"sdpa" implementation); on GPU the step runs under bf16 autocast.

Goal (issue #7): >= 45 % MFU for IRRA's paper config on an H100.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPU_PRESETS = ("clip_tiny", "irra_tiny", "ivt_tiny", "pcc_tiny")
PAPER_PRESETS = ("irra", "clip", "pcc", "ivt")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def setup(preset: str, batch_size: int, data_url: str, device: torch.device):
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.methods import TextSpec, build_method

    overrides = [f"data.url={data_url}", f"data.batch_size={batch_size}", "data.loader_workers=0",
                 "data.shuffle_buffer=0"]
    cfg = load_config(preset, overrides)
    tok = load_tokenizer(os.path.join(data_url, "tokenizer"))
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40).to(device)
    loader = build_train_loader(cfg.data, tok, method.data_needs())
    batch = next(iter(loader))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    opt = torch.optim.AdamW(method.parameters(), lr=1e-5, fused=device.type == "cuda")
    return cfg, method, batch, opt


def step_fn(method, batch, opt, device: torch.device, bf16: bool):
    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def measure(preset: str, batch_size: int, steps: int, warmup: int, data_url: str, device: torch.device,
            compile_model: bool) -> dict:
    cfg, method, batch, opt = setup(preset, batch_size, data_url, device)
    bf16 = device.type == "cuda"
    if compile_model:
        method = torch.compile(method)
    step = step_fn(method, batch, opt, device, bf16)
    flops = count_flops(step_fn(method, batch, opt, device, bf16))
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"{preset}: non-finite loss {float(loss)}")
    peak = peak_flops(device)
    return {"preset": preset, "method": cfg.method.name, "batch": batch_size,
            "image": "x".join(map(str, cfg.data.image_size)), "params_m": sum(p.numel() for p in
                                                                              method.parameters()) / 1e6,
            "step_ms": seconds * 1000, "samples_s": batch_size / seconds, "tflop_step": flops / 1e12,
            "tflops": flops / seconds / 1e12, "mfu": (flops / seconds / peak) if peak else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paper", action="store_true", help="paper configs (needs a GPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", nargs="*", help="override the preset list")
    ap.add_argument("--batch", type=int, help="batch size (default: 32 on CPU presets, 64 on paper configs)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the method")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from tbps.demo import demo_dataset

    device = torch.device(args.device)
    if args.paper and device.type != "cuda":
        print("--paper needs a GPU (the paper configs are ViT-B/16 at 384x128, batch 64, bf16)", file=sys.stderr)
        return 2
    presets = args.presets or (PAPER_PRESETS if args.paper else CPU_PRESETS)
    batch = args.batch or (4 if args.quick else 64 if args.paper else 32)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    data = demo_dataset("tiny")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{'; torch.compile' if args.compile else ''}")
    print("| preset | method | image | batch | params (M) | step ms | samples/s | TFLOP/step | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        r = measure(preset, batch, steps, warmup, data, device, args.compile)
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
        print(f"| {preset} | {r['method']} | {r['image']} | {r['batch']} | {r['params_m']:.1f} | {r['step_ms']:.1f} | "
              f"{r['samples_s']:.1f} | {r['tflop_step']:.4f} | {r['tflops']:.3f} | {mfu} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
