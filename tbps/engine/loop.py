"""One worker's training run, free of Ray: :class:`TrainRun` builds the DeepSpeed engine, the streaming loaders and the
evaluation copy, and runs ``train_one_epoch`` / ``validate_and_checkpoint`` / ``final_test``. The Ray Train shell
(tbps/engine/worker.py) gives it a rank, a device, a ``report`` function and the checkpoint to resume from; a test
gives it a 1-rank gloo group and a list.

Determinism (what makes a resumed run the run it would have been): the data of an epoch is a function of (seed,
epoch, rank) and a position in it (tbps/data/stream.py ``TrainLoader.position``); the random state of each optimizer
step (dropout, drop path) is seeded from (seed, step, rank). A checkpoint, at the end of an epoch or every
``train.checkpoint_every_steps`` optimizer steps within one, holds the engine (weights, optimizer, schedule), the
data position and the epoch's running loss sums.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist

from tbps.checkpoint import load_model_state, write_model_dir
from tbps.config import Config, dump_yaml
from tbps.data import build_eval_loader, build_train_loader, load_manifest, load_tokenizer
from tbps.data.stream import Mixture, keeps_last_batch
from tbps.distributed import world
from tbps.eval import evaluate
from tbps.gradcache import grad_cache_step
from tbps.methods import TextSpec, build_method, create_method
from tbps.methods.base import eval_dtype, fp16_weights
from tbps.optim import build_optimizer, build_scheduler

from .checkpoint import DS_TAG, RunOutputs, full_state_dict
from .console import format_event, progress_line

# report(metrics, checkpoint_dir or None): hands a result (and a checkpoint directory, valid during the call) to
# whoever runs the loop -- ray.train.report in a Ray Train worker
Report = Callable[[dict, "str | None"], None]


def tokenizer_path(cfg: Config) -> str:
    from shards.storage import join

    return cfg.data.tokenizer or join(cfg.data.url, "tokenizer")


def as_saved(cfg: Config) -> Config:
    """``cfg`` as a run saves it in its config.yaml (and checkpoints): ``data.tokenizer`` explicit, so the checkpoints
    stay usable with other data URLs. Changes ``cfg`` in place and returns it."""
    cfg.data.tokenizer = tokenizer_path(cfg)
    return cfg


def epoch_steps(batches: int, train) -> int:
    """Optimizer steps an epoch of ``batches`` loader batches makes (``train``: the TrainConfig): whole steps of
    ``train.grad_accum`` micro-batches (none carries over an epoch), at most ``train.max_steps_per_epoch``."""
    accum = train.grad_accum
    if train.max_steps_per_epoch:
        batches = min(batches, train.max_steps_per_epoch * accum)
    if batches < accum:
        raise ValueError(f"train.grad_accum {accum} needs at least {accum} batches per epoch; this rank has {batches}")
    return batches // accum


def resolve_precision(cfg: Config) -> str:
    """``train.precision: auto``: bf16 autocast over fp32 weights on GPUs, fp32 on CPU. (Not DeepSpeed's bf16 mode:
    at ZeRO-0 with tbps's torch optimizer DeepSpeed wraps it in its unfused fp16 optimizer, which reads every
    parameter's overflow flag back to the host each step -- one device synchronisation per parameter.)"""
    p = cfg.train.precision
    if p == "auto":
        return "bf16-autocast" if cfg.train.use_gpu else "fp32"
    return p


# precisions in which DeepSpeed runs tbps's torch optimizer on the parameters as they are (no fp16/bf16 optimizer of
# its own): fp32, bf16 autocast over fp32 weights, IRRA's fp16 weights trained directly, and torch's AMP (fp16
# autocast over fp32 weights, the optimizer stepped through torch's GradScaler at ZeRO-0)
TORCH_OPTIMIZER_PRECISIONS = ("fp32", "bf16-autocast", "fp16-weights", "fp16-autocast")


def forward_autocast(precision: str) -> torch.dtype | None:
    """The dtype the training forward runs under ``torch.autocast`` in, where tbps applies it itself: fp16 for
    ``fp16-weights`` (IRRA's fp16 weights with fp32 LayerNorms and embeddings need it to mix; DeepSpeed's own
    ``torch_autocast`` section would add a loss scaler, which IRRA does not have). bf16-autocast is DeepSpeed's
    section (``deepspeed_config``)."""
    return torch.float16 if precision == "fp16-weights" else None


def tbps_clips(cfg: Config) -> bool:
    """Whether tbps clips the gradients itself (``optimizer_step``) instead of DeepSpeed: at ZeRO-0 where DeepSpeed
    runs tbps's torch optimizer on the parameters as they are (``TORCH_OPTIMIZER_PRECISIONS``), where DeepSpeed's
    clipping takes one norm kernel per parameter and two blocking host-to-device copies per step, and torch's
    ``clip_grad_norm_`` computes the same norm with its multi-tensor kernels and no synchronisation. (ZeRO 1-3 and
    DeepSpeed's bf16/fp16 optimizers own the gradients and clip them.)"""
    return (cfg.optim.grad_clip > 0 and cfg.train.zero_stage == 0
            and resolve_precision(cfg) in TORCH_OPTIMIZER_PRECISIONS)


def tbps_clip_norm(cfg: Config) -> float:
    """The norm ``optimizer_step`` clips at: ``optim.grad_clip`` where tbps clips (``tbps_clips``), else 0 (DeepSpeed
    clips, or nothing does)."""
    return cfg.optim.grad_clip if tbps_clips(cfg) else 0.0


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
        # (fp16-autocast: the same in fp16, and DeepSpeed then scales the loss with torch's GradScaler at ZeRO-0, as
        # torch's AMP does)
        "torch_autocast": {"enabled": precision in ("bf16-autocast", "fp16-autocast"),
                           "dtype": "float16" if precision == "fp16-autocast" else "bfloat16"},
        "zero_allow_untested_optimizer": True,  # our optimizer is a plain torch one with parameter groups
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # always explicit: left out, DeepSpeed clips at norm 1.0 (its default), which optim.grad_clip=0 means not to;
        # 0 where tbps clips itself (tbps_clips)
        "gradient_clipping": 0.0 if tbps_clips(cfg) else max(0.0, cfg.optim.grad_clip),
    }
    return ds


STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU communication op builds in about 40 s on 2 cores


def clear_stale_build_lock(max_age_s: float = STALE_BUILD_LOCK_S, blocking: bool | None = None,
                           log: Callable[[str], None] = print) -> str | None:
    """DeepSpeed on CPU builds its shared-memory communication op (``deepspeed_shm_comm``) with torch's just-in-time
    extension builder on first use. Before torch 2.14 that builder guards a build with a lock file whose mere
    existence blocks: a process killed mid-build (a worker lost during the first run) leaves the file behind, and
    every later run on the machine then waits on it forever without a word. Torch 2.14 holds an OS lock instead,
    released with its holder (``blocking`` False; None: read from torch). With a blocking lock file older than
    ``max_age_s`` -- longer than any build of that op takes -- it is removed, and that is logged. Returns the path
    removed, if any."""
    import torch.utils.cpp_extension as extension

    if blocking is None:
        blocking = hasattr(extension, "FileBaton")  # torch < 2.14: the existence-based lock
    if not blocking:
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or extension.get_default_build_root()
    pattern = os.path.join("deepspeed_shm_comm", "lock")  # under the root, or its <python>_<cuda> folder
    for lock in glob.glob(os.path.join(root, pattern)) + glob.glob(os.path.join(root, "*", pattern)):
        try:
            age = time.time() - os.path.getmtime(lock)
            if age <= max_age_s:
                continue
            os.remove(lock)
        except FileNotFoundError:  # released meanwhile
            continue
        log(f"[tbps] removed {lock}: a lock file {age / 60:.0f} min old, left by a DeepSpeed op build that was "
            f"killed (torch before 2.14 would wait on it forever)")
        return lock
    return None


def prefer_environment_ninja(bin_dir: str | None = None, environ=None) -> str | None:
    """Torch builds DeepSpeed's CPU communication op with the first ``ninja`` on PATH, and ninja releases hash build
    commands differently (Debian's 1.11 against the pip wheel's 1.13 that DeepSpeed installs): a process whose PATH
    finds the system's ninja and one whose PATH finds the environment's each take the other's build for stale and
    rebuild it, about 30 s on 2 cores, turn about for as long as both kinds run on the machine (a venv's python run
    without activating it, beside Ray jobs or a ``ray start`` from the activated shell). Where the interpreter's
    environment (``bin_dir``, default: its directory) has its own ninja and PATH finds another, that directory goes
    first on PATH (``environ``, default: this process's), as activating the environment would. Returns it, or None."""
    bin_dir = bin_dir or os.path.dirname(sys.executable)
    environ = os.environ if environ is None else environ
    own = os.path.join(bin_dir, "ninja")
    if not (os.path.isfile(own) and os.access(own, os.X_OK)):
        return None
    found = shutil.which("ninja", path=environ.get("PATH", ""))
    if found and os.path.realpath(found) == os.path.realpath(own):
        return None
    environ["PATH"] = os.pathsep.join(p for p in (bin_dir, environ.get("PATH", "")) if p)
    return bin_dir


def initialize_engine(cfg: Config, method, optimizer, scheduler=None):
    """`deepspeed.initialize` with the config's JSON. With one data-parallel rank at ZeRO-0 and fp32 gradients (fp32,
    or bf16 autocast over fp32 weights) there is nothing to reduce, but DeepSpeed would still flatten every gradient
    into a buffer, all-reduce it with itself and copy it back after each backward (~5 % of a small model's step on
    CPU): that pass is switched off. (DeepSpeed's bf16 and fp16 modes keep it: their optimizers reduce there.) On CPU
    a lock file left by a killed build of DeepSpeed's communication op is cleared first (``clear_stale_build_lock``),
    and the op is built with this environment's ninja (``prefer_environment_ninja``)."""
    import deepspeed

    if not cfg.train.use_gpu:
        clear_stale_build_lock()
        prefer_environment_ninja()
    engine, optimizer, _, scheduler = deepspeed.initialize(model=method, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg))
    if engine.dp_world_size == 1 and cfg.train.zero_stage == 0 and resolve_precision(cfg) in TORCH_OPTIMIZER_PRECISIONS:
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def engine_scaler(engine):
    """DeepSpeed's ZeRO-0 loss scaler (torch's GradScaler) under ``train.precision: fp16-autocast``, else None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


def optimizer_step(engine, clip: float = 0.0) -> None:
    """``engine.step()`` (the optimizer and the lr schedule, at accumulation boundaries), the gradients first clipped
    to norm ``clip`` at a boundary where tbps clips (``tbps_clip_norm``; 0 = DeepSpeed's clipping or none). Under
    ``fp16-autocast`` the loss scaler unscales the gradients before they are clipped (torch's AMP recipe); its step
    then takes the unscaled gradients and the overflow it found while unscaling."""
    if clip > 0 and engine.is_gradient_accumulation_boundary():
        scaler = engine_scaler(engine)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)  # parameters without a gradient skipped
    engine.step()


def train_step(engine, group: list[dict], grad_cache: bool, clip: float = 0.0, device=None,
               autocast: torch.dtype | None = None) -> dict:
    """One call of the training step: the forward, backward and ``optimizer_step`` of one batch (``group[0]``), or
    with ``grad_cache`` of a group of micro-batches (contrastive losses over all of them, tbps/gradcache.py). Returns
    the detached loss and its parts; reads nothing back to the host. ``autocast``: the forwards (both of grad_cache's
    passes) run under ``torch.autocast`` in that dtype (``forward_autocast``), the backward outside it."""
    def forward(batch, **kwargs):
        if autocast is None:
            return engine(batch, **kwargs)
        with torch.autocast(next(engine.module.parameters()).device.type, dtype=autocast):
            return engine(batch, **kwargs)

    if grad_cache:
        def step_backward(surrogate, _):
            """each micro-batch's surrogate already carries the whole batch's scale (no 1/accum)"""
            engine.backward(surrogate, scale_wrt_gas=False)
            optimizer_step(engine, clip)

        return grad_cache_step(engine.module, group, forward=forward, backward=step_backward, device=device)
    out = forward(group[0])
    engine.backward(out["loss"])
    optimizer_step(engine, clip)
    return {k: v.detach() for k, v in out.items()}


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


def _maybe_hold(run: str, epoch: int) -> None:
    """Fault-injection hook for the node-loss test: TBPS_FAULT_HOLD="run:epoch:path[,run:epoch:path...]" makes every
    rank wait at the start of that (0-based) epoch while ``path`` exists, so a test can change the cluster at a
    known point of the run. Unset, it costs one environment lookup per epoch."""
    for spec in filter(None, os.environ.get("TBPS_FAULT_HOLD", "").split(",")):
        name, e, path = spec.split(":", 2)
        if (name, int(e)) == (run, epoch):
            while os.path.exists(path):
                time.sleep(0.2)


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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank (dropout and drop path differ across ranks and steps, and a
    resumed run draws what the uninterrupted one drew)."""
    from tbps.data.stream import _seed_int

    return _seed_int(seed, "step", step, rank)


TEST_SELECTED = "test-selected (the papers' protocol)"
DIVERGED = "diverged.json"  # run outputs: what diverged, and under which config (see TrainRun.check_finite)


class DivergedError(RuntimeError):
    """The weights stopped being finite (NaN or inf): the run diverged. A user error -- a config to change (lr,
    clipping, precision), not a bug -- so commands print its message alone (``shards.cli.describe``)."""

    is_user_error = True


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def improves(value: float, best: float, ties: str = "first") -> bool:
    """Whether an epoch's ``value`` replaces the ``best`` so far: above it, or equal to it with ``train.select_ties:
    last`` (IVT's loop keeps ``acc_test >= last_acc_val``; IRRA's ``best_top1 < top1`` keeps the first)."""
    return value > best or (ties == "last" and value == best)


def test_selected(history: list[dict], metric: str, ties: str = "first") -> dict | None:
    """The papers' protocol (``eval.test_every_epoch``): the epoch with the best *test* ``metric`` and its test
    metrics, labelled as such. Ours stays the test of the best val epoch; this one has seen the test split. Ties
    are kept as val selection keeps them (``train.select_ties``)."""
    epochs = [h for h in history if f"test_{metric}" in h]
    if not epochs:
        return None
    best = epochs[0]
    for h in epochs[1:]:
        if improves(h[f"test_{metric}"], best[f"test_{metric}"], ties):
            best = h
    return {"label": TEST_SELECTED, "epoch": best["epoch"],
            "metrics": {k[5:]: v for k, v in best.items() if k.startswith("test_")}}


class TrainRun:
    """One worker's part of a training run (every rank builds one). ``report`` receives each epoch's metrics (with a
    checkpoint directory), each mid-epoch checkpoint (``train.checkpoint_every_steps``) and the final test metrics.
    ``on_batch(epoch, index, batch)``, if given, sees every training micro-batch as it is used (audits, tests)."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, report: Report,
                 node_id: str = "", on_batch: Callable[[int, int, dict], None] | None = None,
                 progress: str = "lines", label: str = ""):
        """``label``: names the run in its lines (``[tbps seed 1] …``, several runs in one output). ``progress``: rank 0's report every train.log_every steps -- ``lines`` (plain [tbps] lines) or ``events``
        (``tbps.engine.console.progress_line``, rendered by the driver's console as a progress bar)."""
        if progress not in ("lines", "events"):
            raise ValueError(f"progress must be lines or events, got {progress!r}")
        self.progress, self.label = progress, label
        as_saved(cfg)
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.report, self.node_id, self.on_batch = report, node_id, on_batch
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.tok = load_tokenizer(cfg.data.tokenizer)
        self.manifest = manifest = load_manifest(cfg.data.url)
        # a mixture's members are read once, here: the ID classifier spans the union of their identities
        self.mixture = Mixture(cfg.data.mix, cfg.data.train_split) if cfg.data.mix else None
        self.num_classes = self.mixture.num_train_ids if self.mixture else int(manifest["num_train_ids"])
        text = TextSpec.from_tokenizer(self.tok, cfg.data.text_length)
        method = create_method(cfg, text, self.num_classes, log=self.log)  # fits cfg.model to pretrained
        self.precision = precision = resolve_precision(cfg)
        if precision == "fp16-weights":  # before the optimizer and the engine see the parameters
            converted = fp16_weights(method)
            self.log(f"[tbps] fp16 weights (IRRA's convert_weights): {len(converted)} linear, conv and attention "
                     "weights and biases stored and trained in fp16, no fp32 master copy, no loss scaling")
        if cfg.train.activation_checkpointing:
            switched = method.set_activation_checkpointing(True)
            self.log(f"[tbps] activation checkpointing: {', '.join(switched)}")
        keep_last, why_not = keeps_last_batch(cfg, world_size)
        if cfg.data.last_batch == "keep":
            self.log("[tbps] the epoch's last, partial batch: " +
                     ("kept (data.last_batch=keep)" if keep_last else f"dropped: data.last_batch=keep applies to one "
                      f"rank with train.grad_accum=1 and data.sampler=random, not {why_not}"))
        self.train_loader = build_train_loader(cfg.data, self.tok, method.data_needs(), rank, world_size, manifest,
                                               mixture=self.mixture, pin_memory=device.type == "cuda",
                                               keep_last=keep_last)
        if method.data_needs().mla:  # which of IVT's loaders the word level follows (data.mla_words)
            self.log(f"[tbps] MLA word level: {self.train_loader.stream.mla_words_summary()}")
        accum = cfg.train.grad_accum
        self.steps_per_epoch = epoch_steps(len(self.train_loader), cfg.train)
        self.batches = self.steps_per_epoch * accum  # whole optimizer steps: no micro-batch carries over an epoch
        self.group_size = accum if cfg.train.grad_cache else 1  # micro-batches per call of the step
        # fp16-weights: torch's default (foreach) Adam, IRRA's, keeps its moments in the parameters' fp16
        optimizer = build_optimizer(method, cfg.optim, fused=cfg.train.use_gpu and precision != "fp16-weights")
        scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.engine, self.optimizer, self.scheduler = initialize_engine(cfg, method, optimizer, scheduler)
        self.clip = tbps_clip_norm(cfg)
        self.method = method

        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # batches cast to the weights'
        self.train_autocast = forward_autocast(precision)
        # evaluation on GPUs: under autocast to eval.precision (auto: as the official code evaluates this precision)
        self.autocast = eval_dtype(precision, cfg.eval.precision) if cfg.train.use_gpu else None
        # plain copy for evaluation (no ZeRO collectives); its weights come from the training copy, not from storage
        self.eval_model = build_method(cfg, text, self.num_classes).to(device)
        if cfg.train.compile:  # after DeepSpeed has placed the parameters; graphs are built on the first step
            method.compile_step(replay_random=cfg.train.grad_cache)  # grad_cache's two passes draw alike
            self.eval_model.compile_encoders()
            self.log("[tbps] torch.compile: the training forward and the evaluation encoders (compiled on first use)")
        self.outputs = RunOutputs(cfg.train.storage_path, cfg.train.run_name)
        self.config_yaml = dump_yaml(cfg)
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.outputs.path("tensorboard"))
            with open(self.outputs.path("config.yaml"), "w") as f:
                f.write(self.config_yaml)
            self.outputs.sync("config.yaml")

        self.start_epoch, self.global_step, self.best, self.best_epoch, self.history = 0, 0, -1.0, -1, []
        self.saved = ""  # the last checkpoint this run has (for the message of a divergence)
        self.resume_position: dict | None = None  # the data position of a mid-epoch checkpoint
        self.resume_sums: dict = {}  # and the epoch's loss sums up to it ({"sums": {name: sum}, "steps": n})
        self.placement: list[dict] = []
        self.niceness, self.threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()

    def log(self, message: str) -> None:
        # Ray Train V2 patches print() in workers to tee into both stdout and the root logger (every line twice in
        # the driver's output): write the progress line once, directly
        if self.rank == 0:
            if self.label:
                message = message.replace("[tbps]", f"[tbps {self.label}]", 1)
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    # ----------------------------------------------------------------------------------------------- resume
    def _load_engine(self, checkpoint_dir: str) -> dict:
        """The engine's state from a checkpoint; returns the client state. A ZeRO-1/2 checkpoint saved by another
        number of ranks (elastic workers) is resharded: DeepSpeed's universal-checkpoint conversion
        (``deepspeed.checkpoint.ds_to_universal``) into a private folder, loaded with ``load_universal``."""
        saved = len(glob.glob(os.path.join(checkpoint_dir, DS_TAG, "*_optim_states.pt")))
        if self.cfg.train.zero_stage not in (1, 2) or saved in (0, self.world_size):
            return self.engine.load_checkpoint(checkpoint_dir, tag=DS_TAG)[1]
        import contextlib
        import io
        import types

        from deepspeed.checkpoint import ds_to_universal

        work = tempfile.mkdtemp(prefix="tbps-universal-")
        try:
            args = types.SimpleNamespace(input_folder=os.path.join(checkpoint_dir, DS_TAG),
                                         output_folder=os.path.join(work, "universal"), num_extract_workers=1,
                                         num_merge_workers=1, keep_temp_folder=False, strict=True,
                                         inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)  # its own progress lines stay out of the run's output
            self.log(f"[tbps] ZeRO-{self.cfg.train.zero_stage} optimizer state of {saved} rank(s) resharded for "
                     f"{self.world_size} (DeepSpeed universal checkpoint)")
            self.engine._config.load_universal_checkpoint = True
            try:
                return self.engine.load_checkpoint(work, tag="universal")[1]
            finally:
                self.engine._config.load_universal_checkpoint = False
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @property
    def scaler(self):
        """DeepSpeed's ZeRO-0 loss scaler under ``train.precision: fp16-autocast``, else None (``engine_scaler``)."""
        return engine_scaler(self.engine)

    def scaler_state(self) -> dict:
        """``train.precision: fp16-autocast``: the loss scaler's state (its scale and growth count), for the engine's
        client state. DeepSpeed keeps the ZeRO-0 scaler out of its checkpoints, and a resumed run would restart at
        scale 65,536 and skip steps while it falls back: not the steps of the uninterrupted run."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def resume(self, checkpoint_dir: str) -> None:
        """Continue from a checkpoint this run reported: after its epoch, or, for a mid-epoch one, at its step."""
        client = self._load_engine(checkpoint_dir)
        if self.scaler is not None and client.get("grad_scaler"):
            self.scaler.load_state_dict(client["grad_scaler"])
        self.global_step = client["step"]
        self.saved = f"the checkpoint at step {self.global_step} it resumed from"
        self.best, self.best_epoch, self.history = client["best"], client["best_epoch"], client["history"]
        saved_world = client.get("world_size", self.world_size)
        if saved_world != self.world_size:  # elastic workers: a node was lost, or capacity came back
            # data positions are per rank: a mid-epoch checkpoint restarts its epoch on the new world
            self.start_epoch = client["epoch"] + (0 if client.get("mid_epoch") else 1)
            self._rebase_schedule(self.start_epoch * self.steps_per_epoch)
            self.log(f"[tbps] world size changed: {saved_world} -> {self.world_size} worker(s); global batch now "
                     f"{self.world_size} x {self.cfg.data.batch_size} x accum {self.cfg.train.grad_accum}, "
                     f"{self.steps_per_epoch} steps/epoch; resuming at the start of epoch {self.start_epoch + 1}"
                     + (" (its batches before the checkpoint are trained again)" if client.get("mid_epoch") else "")
                     + f", lr schedule at {self.start_epoch}/{self.cfg.train.epochs} of the run")
            return
        if not client.get("mid_epoch"):
            self.start_epoch = client["epoch"] + 1
            self.log(f"[tbps] resumed from checkpoint of epoch {client['epoch'] + 1} (step {self.global_step})")
            return
        path = os.path.join(checkpoint_dir, self.rank_state_file(self.rank))
        try:
            with open(path) as f:
                mine = json.load(f)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"mid-epoch checkpoint {checkpoint_dir}: cannot read rank {self.rank}'s data position "
                               f"({e}); it continues only on the number of workers that saved it "
                               f"({client.get('world_size')})") from None
        self.start_epoch = client["epoch"]
        self.resume_position, self.resume_sums = mine["position"], mine["sums"]
        position = mine["position"]
        self.log(f"[tbps] resumed mid-epoch {client['epoch'] + 1}: after batch {position['count']} of "
                 f"{self.batches} (step {self.global_step})")

    def _rebase_schedule(self, step: int) -> None:
        """The lr schedule at optimizer step ``step`` of this world size's epochs (LambdaLR, closed form): after a
        change of world size the steps per epoch differ, and the schedule follows the fraction of the run done."""
        sched = self.scheduler
        sched.last_epoch = step
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(step)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    # ------------------------------------------------------------------------------------------------ train
    def train_one_epoch(self, epoch: int) -> dict:
        """One epoch of optimizer steps (from the resumed position, if any); returns its metrics."""
        cfg, engine, rank = self.cfg, self.engine, self.rank
        loader = self.train_loader
        position, self.resume_position = self.resume_position, None
        loader.set_epoch(epoch, position)
        engine.train()
        first = position["count"] if position else 0
        # loss sums stay on the device: values are read every log_every steps (and at checkpoints), not per step
        restored, n = self.resume_sums.get("sums", {}), self.resume_sums.get("steps", 0)
        sums = {k: torch.tensor(v, device=self.device) for k, v in restored.items()}
        self.resume_sums = {}
        seen, t0, group, read_shards = 0, time.time(), [], set()
        every = cfg.train.checkpoint_every_steps

        for i, batch in enumerate(loader, start=first):
            if i >= self.batches:
                break
            if epoch == self.start_epoch:  # the placement record (metrics.json "workers") is of the first epoch
                read_shards.update(batch["shards"])
            if self.on_batch is not None:
                self.on_batch(epoch, i, batch)
            if i % cfg.train.grad_accum == 0:  # a new optimizer step: its own random state
                torch.manual_seed(step_seed(cfg.train.seed, engine.global_steps, rank))
            group.append(_to_device(batch, self.device, self.dtype))
            if len(group) < self.group_size:
                continue
            # the epoch's last, partial batch (data.last_batch=keep) runs eagerly: a graph for its size would make
            # the batch dimension dynamic in the graphs of every later step
            short = cfg.train.compile and len(batch["pids"]) != cfg.data.batch_size
            with self.method.eager() if short else contextlib.nullcontext():
                out = train_step(engine, group, cfg.train.grad_cache, self.clip, self.device, self.train_autocast)
            self.global_step = engine.global_steps
            for k, v in out.items():
                sums[k] = sums[k].to(v.dtype) + v if k in sums else v
            n += 1
            seen += sum(len(b["pids"]) for b in group) * self.world_size
            group = []
            _maybe_inject_fault(cfg.train.run_name, rank, epoch, i)
            if rank == 0 and ((i // self.group_size) % cfg.train.log_every == 0 or i == self.batches - 1):
                event = {"epoch": epoch + 1, "epochs": cfg.train.epochs, "step": i + 1, "steps": self.batches,
                         "loss": float(out["loss"]), "lr": float(self.scheduler.get_last_lr()[0]),
                         "samples_per_s": seen / max(time.time() - t0, 1e-9),
                         "parts": {k.replace("loss_", ""): float(v) for k, v in out.items() if k != "loss"}}
                self.log(progress_line(event) if self.progress == "events" else format_event(event))
            step_in_epoch = (i + 1) // cfg.train.grad_accum
            if every and (i + 1) % cfg.train.grad_accum == 0 and step_in_epoch % every == 0 and i + 1 < self.batches:
                self._checkpoint_mid_epoch(epoch, i + 1, {"sums": {k: float(v) for k, v in sums.items()},
                                                          "steps": n})
        if epoch == self.start_epoch:  # where each rank runs and which train shards it read (metrics.json)
            self.placement = _gather_placement({"rank": rank, "node_id": self.node_id,
                                                "hostname": socket.gethostname(), "pid": os.getpid(),
                                                "niceness": self.niceness, "torch_threads": self.threads,
                                                "epoch": epoch + 1, "shards": sorted(read_shards)}, self.world_size)
        # one collective for the loss means and the skipped-shard count (its mean x world size = the sum)
        train = _mean_across_ranks({**{k: float(v) / max(n, 1) for k, v in sums.items()},
                                    "skipped_shards": float(len(loader.skipped))})
        skipped = train.pop("skipped_shards") * self.world_size
        metrics = {"epoch": epoch + 1, "step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
                   "world_size": self.world_size, "samples_per_s": seen / max(time.time() - t0, 1e-9),
                   **{f"train_{k}": v for k, v in train.items()}}
        if skipped or cfg.data.on_bad_shard == "skip":  # data.on_bad_shard=skip: train shards skipped, all ranks
            metrics["train_skipped_shards"] = int(round(skipped))
            if skipped:
                self.log(f"[tbps] epoch {epoch + 1}: {int(round(skipped))} bad train shard(s) skipped "
                         f"({', '.join(sorted(loader.skipped))} on rank 0)")
        return metrics

    @staticmethod
    def rank_state_file(rank: int) -> str:
        return f"data_position_rank{rank}.json"

    def _checkpoint_mid_epoch(self, epoch: int, batches_done: int, sums: dict) -> None:
        """Engine, data position and the epoch's loss sums so far; the model directory too, so that every checkpoint
        of a run can be evaluated the same way. Not a new best/, not a metrics.json line."""
        state = full_state_dict(self.engine, self.cfg.train.zero_stage)
        self.check_finite(state, f"epoch {epoch + 1}, batch {batches_done} of {self.batches}",
                          sums["sums"].get("loss", 0.0) / max(sums["steps"], 1))
        meta = {"epoch": epoch, "step": self.global_step, "method": self.cfg.method.name,
                "num_classes": self.num_classes, "mid_epoch": epoch + 1,
                "batches_done": batches_done}
        with tempfile.TemporaryDirectory() as tmp:
            # the engine's client state is rank 0's; each rank's data position and loss sums go in a file of its own
            self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state={
                "epoch": epoch, "step": self.global_step, "best": self.best, "best_epoch": self.best_epoch,
                "history": self.history, "mid_epoch": True, "world_size": self.world_size, **self.scaler_state()})
            with open(os.path.join(tmp, self.rank_state_file(self.rank)), "w") as f:
                json.dump({"position": self.train_loader.position(), "sums": sums}, f)
            if self.rank == 0:
                write_model_dir(tmp, state, self.config_yaml, meta)
            self.log(f"[tbps] checkpoint in epoch {epoch + 1} after batch {batches_done}/{self.batches} "
                     f"(step {self.global_step})")
            self.report({"epoch": epoch, "step": self.global_step, "mid_epoch": epoch + 1,
                         "batches_done": batches_done}, tmp)
        self.saved = f"the checkpoint in epoch {epoch + 1} after batch {batches_done} (step {self.global_step})"

    def check_finite(self, state: dict, where: str, loss: float) -> None:
        """Stop a diverged run: when a weight holds a NaN or an infinity, every later step, metric and checkpoint
        would be NaN -- and a NaN similarity ranks every correct image first (all comparisons with NaN are false),
        so such a run used to report R1 100 and be picked as the best epoch, or a sweep's best trial. Raises
        :class:`DivergedError` on every rank (``state`` is the full state, the same on all), before anything of
        this point is saved. Rank 0 first records the divergence and the config in ``diverged.json``: a retry of
        the same config (Ray Train's ``train.max_failures``, a re-run) stops at once instead of training the
        epochs before the divergence again."""
        bad = nonfinite_tensors(state)
        if not bad:
            return
        cfg = self.cfg
        total = sum(1 for v in state.values() if v.is_floating_point())
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        hints = [f"lower optim.lr (now {cfg.optim.lr:g})"]
        if not cfg.optim.grad_clip:
            hints.append("clip the gradients (optim.grad_clip, now 0: off)")
        message = (f"training diverged: after step {self.global_step} ({where}) {len(bad)} of {total} weight "
                   f"tensors hold NaN or inf values ({names}); the epoch's mean loss so far is {loss:.4g}. The run "
                   "stops: nothing from this point on is saved ("
                   + (f"its last checkpoint is {self.saved}" if self.saved else "no checkpoint was saved before it")
                   + f"). To go on, "
                   f"{' or '.join(hints)} and train again under a new train.run_name")
        if self.rank == 0:
            self.outputs.write_json(DIVERGED, {"message": message, "step": self.global_step, "where": where,
                                               "tensors": bad, "config": self.config_yaml})
        if self.world_size > 1:
            dist.barrier()  # the record is on storage before any rank fails (the group is torn down at the first)
        raise DivergedError(message)

    def refuse_a_diverged_config(self) -> None:
        """A run recorded as diverged (``diverged.json``) under this very config stops at once: the attempt would
        diverge again (same weights, data order and random state). Under another config the record is dropped."""
        record = self.outputs.read_json(DIVERGED)
        if record is None:
            return
        if record.get("config") == self.config_yaml:
            raise DivergedError(f"{record.get('message')} [recorded in {self.outputs.url}/{DIVERGED}: the same "
                                "config would diverge again, so this attempt stops at once; delete that file to "
                                "train it again anyway]")
        if self.rank == 0:
            self.outputs.remove(DIVERGED)

    # -------------------------------------------------------------------------------- validate and checkpoint
    def run_eval(self, split: str, state: dict) -> dict:
        self.eval_model.load_state_dict(state)
        loader = build_eval_loader(self.cfg.data, self.tok, split, self.cfg.eval.batch_size, self.rank,
                                   self.world_size, self.manifest)
        return evaluate(self.eval_model, loader, self.device, self.cfg.eval.query_chunk, self.autocast)

    def validate_and_checkpoint(self, epoch: int, metrics: dict) -> None:
        """Val (every ``train.eval_every`` epochs and after the last), best/, the end-of-epoch checkpoint, TensorBoard
        and metrics.json, then the report."""
        cfg = self.cfg
        metric = cfg.train.select_metric
        state = full_state_dict(self.engine, cfg.train.zero_stage)
        self.check_finite(state, f"the end of epoch {epoch + 1}", metrics.get("train_loss", 0.0))
        is_best = False
        evaluate_now = (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0) or \
            epoch == cfg.train.epochs - 1
        if evaluate_now:
            val = self.run_eval(cfg.data.val_split, state)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            self.log(f"[tbps] epoch {epoch + 1} val ({cfg.data.val_split}): R1 {val['R1']:.2f} R5 {val['R5']:.2f} "
                     f"R10 {val['R10']:.2f} mAP {val['mAP']:.2f} mINP {val['mINP']:.2f} (chance R1 "
                     f"{val['chance_R1']:.2f})")
            if improves(val[metric], self.best, cfg.train.select_ties):
                self.best, self.best_epoch, is_best = val[metric], epoch + 1, True
            if cfg.eval.test_every_epoch:  # the papers' protocol needs test every epoch; never used to select ours
                test = self.run_eval(cfg.data.test_split, state)
                metrics.update({f"test_{k}": v for k, v in test.items()})
                self.log(f"[tbps] epoch {epoch + 1} test ({cfg.data.test_split}): R1 {test['R1']:.2f} "
                         f"mAP {test['mAP']:.2f} (for the test-selected row only)")
        metrics.update({f"best_val_{metric}": self.best, "best_epoch": self.best_epoch})
        self.history.append(dict(metrics))
        meta = {"epoch": epoch + 1, "step": self.global_step, "metrics": metrics, "method": cfg.method.name,
                "num_classes": self.num_classes}
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state={
                "epoch": epoch, "step": self.global_step, "best": self.best, "best_epoch": self.best_epoch,
                "history": self.history, "world_size": self.world_size, **self.scaler_state()})
            if self.rank == 0:
                write_model_dir(tmp, state, self.config_yaml, meta)
                if is_best:
                    self.outputs.replace_dir("best", lambda p: write_model_dir(p, state, self.config_yaml, meta))
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(k.replace("_", "/", 1), v, self.global_step)
                self.writer.flush()
                self.outputs.sync("tensorboard")
                self.write_metrics()
            self.report(metrics, tmp)
        self.saved = f"the one at the end of epoch {epoch + 1} (step {self.global_step})"

    def write_metrics(self, test: dict | None = None) -> None:
        """metrics.json (rank 0): the epochs so far, the best val epoch, the workers; with the final ``test``, the
        best epoch's val metrics and the test metrics."""
        metric = self.cfg.train.select_metric
        doc = {"run": self.cfg.train.run_name, "history": self.history,
               "best_val": {"epoch": self.best_epoch, metric: self.best}}
        if test is not None:
            best_val = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
            doc["val"] = {k[4:]: v for k, v in best_val.items() if k.startswith("val_")}
            doc["test"] = test
            selected = test_selected(self.history, metric, self.cfg.train.select_ties)
            if selected is not None:
                doc["test_selected"] = selected
        doc["workers"] = self.placement
        self.outputs.write_json("metrics.json", doc)

    # ------------------------------------------------------------------------------------------- final test
    def final_test(self) -> dict:
        """The test split with the best val checkpoint (best/); reports and returns the final metrics."""
        cfg = self.cfg
        metric = cfg.train.select_metric
        if self.best_epoch < 0:
            raise RuntimeError("no validation result: set train.eval_every or train.epochs so val runs at least once")
        if self.world_size > 1:
            dist.barrier()  # rank 0 has published best/ before its last report; make sure before everyone reads it
        url = self.outputs.url
        test = self.run_eval(cfg.data.test_split,
                             load_model_state(url + "/best" if "://" in url else os.path.join(url, "best")))
        self.log(f"[tbps] test ({cfg.data.test_split}) with the best val checkpoint (epoch {self.best_epoch}): "
                 f"R1 {test['R1']:.2f} R5 {test['R5']:.2f} R10 {test['R10']:.2f} mAP {test['mAP']:.2f} "
                 f"mINP {test['mINP']:.2f} (chance R1 {test['chance_R1']:.2f})")
        final = {"epoch": cfg.train.epochs, "step": self.global_step, f"best_val_{metric}": self.best,
                 "best_epoch": self.best_epoch, **{f"test_{k}": v for k, v in test.items()}}
        best_val = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
        final.update({k: v for k, v in best_val.items() if k.startswith("val_")})
        if self.rank == 0:
            self.write_metrics(test)
            for k, v in test.items():
                self.writer.add_scalar(f"test/{k}", v, self.global_step)
            self.writer.close()
            self.outputs.sync("tensorboard")
        self.report(final, None)
        return final

    def run(self) -> dict:
        """Every remaining epoch, then the final test."""
        cfg = self.cfg
        self.refuse_a_diverged_config()
        self.log(f"[tbps] {cfg.method.name}: {sum(p.numel() for p in self.method.parameters()) / 1e6:.2f}M "
                 f"parameters, {self.world_size} worker(s) x batch {cfg.data.batch_size} x accum "
                 f"{cfg.train.grad_accum}, {self.steps_per_epoch} steps/epoch, ZeRO-{cfg.train.zero_stage}, "
                 f"{self.precision}, {self.threads} torch thread(s) per worker at nice {self.niceness}")
        for epoch in range(self.start_epoch, cfg.train.epochs):
            _maybe_hold(cfg.train.run_name, epoch)
            metrics = self.train_one_epoch(epoch)
            self.validate_and_checkpoint(epoch, metrics)
        return self.final_test()
