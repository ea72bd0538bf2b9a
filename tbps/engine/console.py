"""What a person sees in the driver's terminal.

Ray streams every worker's stdout/stderr to the driver, each line prefixed ``(RayTrainWorker pid=…)``: Ray Train's
per-report and checkpoint lines, its controller's worker-group lines, DeepSpeed's accelerator warning, torch's
``CUDA_HOME`` warning, and tbps's own lines. Unless ``--verbose``, the driver replaces Ray's printer with
``Console``: it drops that noise, prints the other lines without the prefix, and renders rank 0's progress events
(``progress_line``) as one progress bar per epoch (tqdm: loss parts, lr, samples/s, ETA), or as one plain line per
event when the output is not a terminal. Only the driver's printing changes: the workers' log files (Ray's session
``logs/worker-*.out|err``, and ``ray job logs``) keep every line.

No Ray import at module level: workers use ``progress_line`` from the training loop, which holds no Ray.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading

MAGIC = "__tbps_progress__ "

# lines of Ray, DeepSpeed and torch that say nothing a user acts on (all of them stay in the log files)
NOISE = re.compile("|".join([
    r"Reporting training result \d+",
    r"Checkpoint successfully created at",
    r"Requesting resources: ",
    r"Attempting to start training worker group",
    r"Started training worker group",
    r"^- \(ip=[^)]*\) world_rank=",
    r"Setting up process group for: ",
    r"PreemptionWatcher",
    r"Setting accelerator to CPU",  # DeepSpeed on a CPU machine
    r"real_accelerator\.py",
    r"No CUDA runtime is found, using CUDA_HOME",
    r"deepspeed\.ops\.comm\.\w+ built successfully",
    r"\[INFO\] \[[\w.]+\.py:\d+:",  # DeepSpeed's INFO logger lines
    r"^\s*warnings\.warn\($",  # the source line Python prints under a warning that was already shown
]))


def progress_line(event: dict) -> str:
    """A progress event (epoch, epochs, step, steps, loss, parts, lr, samples_per_s) as the line rank 0 prints."""
    return MAGIC + json.dumps(event, separators=(",", ":"))


def format_event(e: dict) -> str:
    """The plain line of a progress event (what --verbose and non-terminals show)."""
    parts = " ".join(f"{k} {v:.3f}" for k, v in e.get("parts", {}).items())
    return (f"[tbps] epoch {e['epoch']}/{e['epochs']} step {e['step']}/{e['steps']} loss {e['loss']:.4f} "
            f"({parts}) lr {e['lr']:.2e} {e['samples_per_s']:.0f} samples/s")


class Console:
    """Prints worker output on the driver (see the module doc). ``progress``: ``bar`` (tbps.train) renders rank 0's
    progress events; ``none`` (sweeps: Tune's table shows progress) drops them."""

    def __init__(self, progress: str = "bar", out=None, err=None, tty: bool | None = None):
        self.progress = progress
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tty = self.err.isatty() if tty is None else tty
        self.bar = None
        self.bar_epoch = None
        self.lock = threading.Lock()

    # -- Ray's stream dispatcher calls this with {"lines": [...], "is_err": bool, "pid": ..., ...}
    def handle(self, data: dict) -> None:
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # only its event summaries, as Ray's printer does
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        with self.lock:
            for line in lines:
                self.line(line, bool(data.get("is_err")))

    def line(self, line: str, is_err: bool = False) -> None:
        if line.startswith(MAGIC):
            try:
                event = json.loads(line[len(MAGIC):])
            except ValueError:
                return
            if self.progress == "bar":
                self.event(event)
            return
        if NOISE.search(line):
            return
        self.write(line, self.err if is_err else self.out)

    def write(self, text: str, stream) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(text, file=stream, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def event(self, e: dict) -> None:
        if not self.tty:
            self.write(format_event(e), self.out)
            return
        from tqdm import tqdm

        if self.bar is None or self.bar_epoch != e["epoch"]:
            self.close()
            sized = _columns(self.err) > 0  # a terminal of unknown size (a bare pty) reports 0 x 0, where tqdm
            # would hide the bar
            self.bar = tqdm(total=e["steps"], desc=f"epoch {e['epoch']}/{e['epochs']}", file=self.err,
                            dynamic_ncols=sized, ncols=None if sized else 120, nrows=None if sized else 40,
                            leave=True, unit="step")
            self.bar_epoch = e["epoch"]
        self.bar.update(e["step"] - self.bar.n)
        parts = " ".join(f"{k} {v:.3f}" for k, v in e.get("parts", {}).items())
        self.bar.set_postfix_str(f"loss {e['loss']:.4f} ({parts}) lr {e['lr']:.2e} "
                                 f"{e['samples_per_s']:.0f} samples/s", refresh=True)
        if e["step"] >= e["steps"]:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


_installed: Console | None = None


def install(progress: str = "bar") -> Console:
    """Replace Ray's printer of worker output on this (connected) driver with a ``Console``."""
    global _installed
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("tbps_console")
    _installed = Console(progress)
    dispatcher.add_handler("tbps_console", _installed.handle)
    return _installed


def installed() -> Console | None:
    return _installed
