"""Step-time overhead of Ray Train + DeepSpeed (1 worker, ZeRO 0) against a plain single-process PyTorch loop:
same tiny model (clip_tiny preset), same fixed batch, same optimizer and gradient clipping.

    python bench/overhead.py [--steps 60] [--threads N ...] [--quick]

Goal (issue #4): Ray Train + DeepSpeed step time <= 1.10x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(preset: str, batch_size: int):
    from tbps.config import load_config
    from tbps.methods import TextSpec, build_method

    cfg = load_config(preset, [f"data.batch_size={batch_size}"])
    text = TextSpec(vocab_size=100, length=cfg.data.text_length, pad_id=0, mask_id=4, bos_id=2, eos_id=3)
    torch.manual_seed(0)
    method = build_method(cfg, text, num_classes=50)
    g = torch.Generator().manual_seed(0)
    B, L = batch_size, cfg.data.text_length
    ids = torch.randint(5, 100, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    batch = {"images": torch.randn(B, 3, *cfg.data.image_size, generator=g), "text_ids": ids,
             "text_mask": torch.ones(B, L, dtype=torch.long), "pids": torch.randint(0, 50, (B,), generator=g),
             "train_ids": torch.randint(0, 50, (B,), generator=g)}
    return cfg, method, batch


def timed_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def plain(preset, batch_size, steps, warmup):
    from tbps.optim import build_optimizer

    cfg, method, batch = make(preset, batch_size)
    opt = build_optimizer(method, cfg.optim)

    params = [p for p in method.parameters() if p.requires_grad]

    def step():
        opt.zero_grad()
        method(batch)["loss"].backward()
        if cfg.optim.grad_clip > 0:  # the same clipping DeepSpeed's config applies
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
    return timed_steps(step, steps, warmup)


def ray_worker(config):
    import torch

    from tbps.engine.worker import initialize_engine
    from tbps.optim import build_optimizer

    torch.set_num_threads(config["threads"])
    cfg, method, batch = make(config["preset"], config["batch_size"])
    cfg.train.zero_stage = 0
    engine, *_ = initialize_engine(cfg, method, build_optimizer(method, cfg.optim))  # as tbps.train builds it

    def step():
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
    times = timed_steps(step, config["steps"], config["warmup"])
    with open(config["out"], "w") as f:
        json.dump(times, f)


def under_ray(preset, batch_size, steps, warmup, threads):
    """Start a local Ray (dashboard on, as tbps starts it), time the plain loop in this driver while Ray's control
    plane idles beside it, then the Ray Train + DeepSpeed worker. Returns (beside, ray) step times."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
                                       "RAY_AUTH_MODE": "disabled"}})
    out = tempfile.mktemp(suffix=".json")
    try:
        time.sleep(3)  # let the daemons finish starting up
        beside = plain(preset, batch_size, steps, warmup)
        TorchTrainer(ray_worker, train_loop_config={"preset": preset, "batch_size": batch_size, "steps": steps,
                                                    "warmup": warmup, "out": out, "threads": threads},
                     # as many CPUs as the plain loop has threads: Ray sizes a worker's thread pools by its CPUs
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="overhead", storage_path=tempfile.mkdtemp())).fit()
        return beside, json.load(open(out))
    finally:
        ray.shutdown()


ROWS = ("plain PyTorch", "plain PyTorch beside idle Ray", "Ray Train + DeepSpeed ZeRO-0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="clip_tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="alternating plain/Ray rounds; best median of each")
    ap.add_argument("--threads", type=int, nargs="*",
                    help="torch threads (= the Ray worker's CPUs) to compare at; default: every core, and every "
                         "core but one (the control plane's own core, as on any multi-core node)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    threads_list = args.threads or sorted({cores, max(1, cores - 1)}, reverse=True)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.repeats = 5, 1, 8, 1
        threads_list = args.threads or [max(1, cores - 1)]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; {args.preset}, batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats} "
          f"alternating rounds", flush=True)
    tables = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        # this machine's step times drift by +-30 % between minutes: alternate the contenders, keep each one's best
        rounds = [(plain(args.preset, args.batch_size, args.steps, args.warmup),
                   *under_ray(args.preset, args.batch_size, args.steps, args.warmup, threads))
                  for _ in range(args.repeats)]
        best = [median(min((r[i] for r in rounds), key=median)) for i in range(3)]
        tables.append((threads, best))
    print(f"\n{'loop':<32}{'torch threads':>14}{'median step ms':>16}{'ratio':>8}")
    for threads, best in tables:
        for name, t in zip(ROWS, best):
            print(f"{name:<32}{threads:>14}{1000 * t:>16.1f}{t / best[0]:>8.2f}")
    for threads, (p, b, r) in tables:
        print(f"{threads} thread(s): Ray Train + DeepSpeed vs plain {r / p:.2f}x; of which Ray's idle control "
              f"plane beside the plain loop {b / p:.2f}x; the Ray Train worker + DeepSpeed engine vs the plain loop "
              f"beside the same control plane {r / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
