"""Step-time overhead of Ray Train + DeepSpeed (1 worker, ZeRO 0) against a plain single-process PyTorch loop:
same tiny model (clip_tiny preset), same fixed batch, same optimizer and gradient clipping.

    python bench/overhead.py [--rounds 24] [--block 5] [--threads N ...] [--quick]

Goal (issue #4): Ray Train + DeepSpeed step time <= 1.10x the plain loop.

Step times on small shared machines drift by tens of percent between minutes, more than the effect measured, so
the contenders run interleaved, a block of steps at a time, under the same conditions: the plain loop in this
process and the Ray Train worker (which waits on a FIFO between its blocks) both stay alive, and each round runs
 1. the plain loop with every Ray process stopped (SIGSTOP): plain PyTorch, no Ray on the machine;
 2. the plain loop with Ray running beside it (its daemons and the idle Train controller and actors);
 3. a block of the Ray Train worker's DeepSpeed steps, this process idle,
in a rotating order. 2 against 1 is what Ray's control plane costs a process beside it; 3 against 2 is the
per-step cost of the Train worker and the DeepSpeed engine. Ratios pair each block with the plain loop's block of
the same round (seconds apart) and come with a 90 % bootstrap interval over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import select
import shutil
import signal
from statistics import median
import threading
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


def plain_step(preset: str, batch_size: int):
    """One plain PyTorch training step: zero_grad, forward, backward, clip (as the DeepSpeed config does), step."""
    from tbps.optim import build_optimizer

    cfg, method, batch = make(preset, batch_size)
    opt = build_optimizer(method, cfg.optim)
    params = [p for p in method.parameters() if p.requires_grad]

    def step():
        opt.zero_grad()
        method(batch)["loss"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
    return step


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def ray_worker(config):
    """The Ray Train worker: builds the engine as tbps.train does, then runs a block of timed steps for every
    number read from the `go` FIFO (0 ends), answering each with a JSON line of step times on `done`."""
    import torch

    from tbps.engine.loop import initialize_engine
    from tbps.optim import build_optimizer

    torch.set_num_threads(config["threads"])
    cfg, method, batch = make(config["preset"], config["batch_size"])
    cfg.train.zero_stage = 0
    engine, *_ = initialize_engine(cfg, method, build_optimizer(method, cfg.optim))  # as tbps.train builds it

    def step():
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
    timed(step, config["warmup"])
    with open(config["go"]) as go, open(config["done"], "w") as done:
        for line in go:
            if int(line) == 0:
                break
            done.write(json.dumps(timed(step, int(line))) + "\n")
            done.flush()


SETTLE_S = 1.0  # pause after continuing the Ray processes


class RayContender:
    """A local Ray (dashboard on, as tbps starts one) running the Train worker in the background, driven block by
    block through two FIFOs."""

    def __init__(self, preset, batch_size, warmup, threads, timeout=600):
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from tbps.config import load_config
        from tbps.engine.launcher import worker_runtime_env

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.dir = tempfile.mkdtemp(prefix="tbps-overhead-")
        self.go_path, self.done_path = os.path.join(self.dir, "go"), os.path.join(self.dir, "done")
        os.mkfifo(self.go_path)
        os.mkfifo(self.done_path)
        self.timeout = timeout
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
                                           "RAY_AUTH_MODE": "disabled"}})
        trainer = TorchTrainer(
            ray_worker, train_loop_config={"preset": preset, "batch_size": batch_size, "warmup": warmup,
                                           "threads": threads, "go": self.go_path, "done": self.done_path},
            # as many CPUs as the plain loop has threads: Ray sizes a worker's thread pools by its CPUs
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            torch_config=TorchConfig(backend="gloo"),
            # as tbps.train runs its workers (tbps.engine.launcher.build_trainer): at the configured niceness
            run_config=RunConfig(name="overhead", storage_path=os.path.join(self.dir, "runs"),
                                 worker_runtime_env=worker_runtime_env(load_config(preset))))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        self.thread.start()
        # the worker opens `go` for reading, then `done` for writing; open ours in the same order
        self.go = self._open(self.go_path, os.O_WRONLY)
        self.done = self._open(self.done_path, os.O_RDONLY)
        self.buffer = b""

    def _fit(self, trainer):
        try:
            trainer.fit()
        except BaseException as e:  # reported to the caller instead of hanging on the FIFOs
            self.error = e

    def _open(self, path, flags):
        deadline = time.time() + self.timeout
        while True:
            try:  # non-blocking: opening a FIFO for writing fails (ENXIO) until its reader is there
                fd = os.open(path, flags | os.O_NONBLOCK)
                os.set_blocking(fd, flags == os.O_WRONLY)  # reads go through select()
                return fd
            except OSError:
                pass
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the Ray Train worker did not start: {self.error!r}")
            time.sleep(0.05)

    def run(self, n: int) -> list[float]:
        os.write(self.go, f"{n}\n".encode())
        deadline = time.time() + self.timeout
        while b"\n" not in self.buffer:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the Ray Train worker stopped answering: {self.error!r}")
            if select.select([self.done], [], [], 0.5)[0]:
                chunk = os.read(self.done, 65536)
                self.buffer += chunk
                if not chunk:  # no writer yet (or any more): EOF
                    time.sleep(0.05)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    @contextlib.contextmanager
    def stopped(self):
        """Every Ray process (gcs, raylet, dashboard, agents, workers: all this driver's descendants) stopped with
        SIGSTOP for the duration, continued afterwards."""
        import psutil

        procs = psutil.Process().children(recursive=True)
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for p in procs:
                try:
                    p.send_signal(signal.SIGCONT)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(SETTLE_S)  # the daemons' timers that came due meanwhile fire now, not in a timed block

    def close(self):
        import ray

        try:
            os.write(self.go, b"0\n")
            self.thread.join(timeout=120)
        finally:
            os.close(self.go)
            os.close(self.done)
            ray.shutdown()
            shutil.rmtree(self.dir, ignore_errors=True)


ROWS = ("plain PyTorch", "plain PyTorch beside Ray", "Ray Train + DeepSpeed ZeRO-0")


def compare(args, threads: int) -> list[list[list[float]]]:
    """Per contender, the step times of each round's block (blocks[contender][round] = [seconds, ...])."""
    torch.set_num_threads(threads)
    step = plain_step(args.preset, args.batch_size)
    timed(step, args.warmup)
    ray_side = RayContender(args.preset, args.batch_size, args.warmup, threads)
    blocks: list[list[list[float]]] = [[], [], []]
    try:
        time.sleep(3)  # let Ray's daemons finish starting up
        for r in range(args.rounds):
            for which in [(r + k) % 3 for k in range(3)]:  # rotate the order: no contender always goes first
                if which == 0:
                    with ray_side.stopped():
                        blocks[0].append(timed(step, args.block))
                elif which == 1:
                    blocks[1].append(timed(step, args.block))
                else:
                    blocks[2].append(ray_side.run(args.block))
    finally:
        ray_side.close()
    return blocks


def paired_ratio(num: list[list[float]], den: list[list[float]], resamples: int = 2000, seed: int = 0):
    """Median over rounds of (median step of `num`'s block / median step of `den`'s block in the same round), and a
    90 % bootstrap interval over rounds. Pairing blocks that ran seconds apart cancels the machine's slow drift."""
    ratios = [median(a) / median(b) for a, b in zip(num, den)]
    rng = random.Random(seed)
    boot = sorted(median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return median(ratios), boot[int(0.05 * resamples)], boot[int(0.95 * resamples) - 1]


def report(tables) -> None:
    ratios = {threads: (paired_ratio(blocks[2], blocks[0]), paired_ratio(blocks[1], blocks[0]),
                        paired_ratio(blocks[2], blocks[1])) for threads, blocks in tables}
    print(f"\n{'loop':<32}{'torch threads':>14}{'median step ms':>16}{'ratio':>8}{'90 % interval':>16}")
    for threads, blocks in tables:
        total, control, _ = ratios[threads]
        for name, contender, (r, lo, hi) in zip(ROWS, blocks, [(1.0, None, None), control, total]):
            interval = f"{lo:.2f}-{hi:.2f}" if lo is not None else ""
            steps = [t for block in contender for t in block]
            print(f"{name:<32}{threads:>14}{1000 * median(steps):>16.1f}{r:>8.2f}{interval:>16}")
    print("(ratio: median over rounds of each block's median step against the plain loop's block of the same round)")
    for threads, (total, control, worker) in ratios.items():
        print(f"{threads} thread(s): Ray Train + DeepSpeed vs plain {total[0]:.2f}x ({total[1]:.2f}-{total[2]:.2f}); "
              f"Ray's control plane beside the plain loop {control[0]:.2f}x ({control[1]:.2f}-{control[2]:.2f}); the "
              f"Train worker + DeepSpeed engine against the plain loop beside the same control plane {worker[0]:.2f}x "
              f"({worker[1]:.2f}-{worker[2]:.2f}); goal <= 1.10x: {'met' if total[0] <= 1.10 else 'NOT met'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="clip_tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=24, help="interleaved rounds (one block of each contender)")
    ap.add_argument("--block", type=int, default=5, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*",
                    help="torch threads (= the Ray worker's CPUs) to compare at; default: every core, and one "
                         "(tbps's default: train.cpus_per_worker=1, so each worker runs one torch thread)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    threads_list = args.threads or sorted({cores, 1}, reverse=True)
    if args.quick:
        args.rounds, args.block, args.warmup, args.batch_size = 2, 2, 1, 8
        threads_list = args.threads or [1]
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; {args.preset}, batch "
          f"{args.batch_size}; {args.rounds} interleaved rounds of {args.block} timed steps per contender after "
          f"{args.warmup} warm-up", flush=True)
    report([(threads, compare(args, threads)) for threads in threads_list])
    return 0


if __name__ == "__main__":
    sys.exit(main())
