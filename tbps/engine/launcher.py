"""Builds and runs the Ray Train (V2) TorchTrainer: pre-flight checks on the driver, Ray start/connect, fit."""

from __future__ import annotations

import os
import re
import sys

from tbps.config import Config, ConfigError, check_values, to_dict

from tbps.eval.metrics import SELECT_METRICS
FORWARDED_ENV = ("AWS_", "TBPS_", "GOOGLE_", "AZURE_", "HF_", "RAY_AUTH_MODE")
# never put into a runtime env: Ray writes runtime envs into its logs (runtime_env_agent.log) and job tables
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|ACCOUNT_KEY|_SAS|_KEY$", re.IGNORECASE)


def forwarded_env(environ=None) -> dict[str, str]:
    """The settings a locally started Ray passes on to its workers explicitly (endpoints, regions, TBPS_* knobs).
    Secrets are left out: the workers of a Ray started by this process inherit its environment anyway, and a
    cluster's nodes get credentials from their own environment or instance role (cluster/), never from the
    driver — so no credential is ever written into Ray's logs."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV) and not SECRET_ENV.search(k)}


def preflight(cfg: Config) -> dict:
    """Fail before any worker starts, naming the key or path: data, tokenizer, weights, method, sizes."""
    check_values(cfg)  # again: a config changed in code since it loaded
    resolve_worker_settings(cfg)
    from shards.readers import caption_rule_warning
    from shards.storage import filesystem
    from tbps.data import load_manifest
    from tbps.data.identity import check_identity_config, check_identity_layout
    from tbps.data.stream import check_pair_counts, epoch_coverage, first_epoch_shards, keeps_last_batch, \
        sampling_weight
    from tbps.data.clip_tokenizer import NAME as CLIP_TOKENIZER
    from tbps.checkpoint import run_directory_hint
    from tbps.engine.loop import tokenizer_path

    if cfg.train.precision == "fp16" and not cfg.train.use_gpu:
        raise ConfigError("train.precision=fp16 is DeepSpeed's fp16 mode, which needs a GPU (train.use_gpu=true); on "
                          "CPUs use fp32, bf16 or bf16-autocast")
    zero_refused = {  # train.precision -> why it runs at ZeRO-0 only
        "fp16-weights": "IRRA's fp16 weights trained directly: ZeRO's optimizers flatten the parameters into one "
                        "dtype and keep an fp32 master copy",
        "fp16-autocast": "torch's AMP, IVT's: DeepSpeed's ZeRO 1-3 skip a step whose gradients overflow without "
                         "telling torch's GradScaler, so its scale never falls and every later step is skipped too",
    }
    if cfg.train.precision in zero_refused:
        if cfg.train.zero_stage > 0:
            raise ConfigError(f"train.precision={cfg.train.precision} runs at ZeRO-0 only, and train.zero_stage="
                              f"{cfg.train.zero_stage} is set ({zero_refused[cfg.train.precision]}): use "
                              "train.zero_stage=0, or train.precision=bf16-autocast for ZeRO")
        tiny = 2.0 ** -14  # fp16's smallest normal number: below it eps is subnormal, and 1e-8 rounds to 0
        if cfg.train.precision == "fp16-weights" and cfg.optim.name in ("adam", "adamw") and cfg.optim.eps < tiny:
            raise ConfigError(f"optim.eps={cfg.optim.eps:g} is below fp16's smallest normal number ({tiny:.2g}): under "
                              "train.precision=fp16-weights Adam's moments are fp16, its denominator sqrt(v) + eps is "
                              "computed in fp16, and where v underflows to 0 the step divides by ~0; IRRA uses "
                              "optim.eps=1e-3")
    check_local_resources(cfg)
    if cfg.train.select_metric not in SELECT_METRICS:
        raise ConfigError(f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, got "
                          f"{cfg.train.select_metric!r}")
    if cfg.train.grad_cache and cfg.train.zero_stage == 3:
        raise ConfigError("train.grad_cache supports ZeRO stages 0-2 (its second pass reads the batch-level losses' "
                          "parameters outside the engine's forward, which ZeRO-3 partitions): use train.zero_stage=2")
    if cfg.train.compile and cfg.train.zero_stage == 3:
        raise ConfigError("train.compile supports ZeRO stages 0-2: ZeRO-3 gathers each module's parameters in forward "
                          "hooks that a compiled forward would have to trace (DeepSpeed's own compiler path is not "
                          "supported by tbps yet); use train.zero_stage=2")
    if 0 < cfg.train.epochs <= cfg.optim.warmup_epochs:
        print(f"[tbps] warning: optim.warmup_epochs={cfg.optim.warmup_epochs:g} covers all train.epochs="
              f"{cfg.train.epochs}: the whole run is warm-up, so the lr never reaches optim.lr and never decays; "
              "lower optim.warmup_epochs for a short run", file=sys.stderr)
    if cfg.train.grad_cache and cfg.train.grad_accum == 1:
        print("[tbps] warning: train.grad_cache with train.grad_accum=1 computes every step twice for nothing; set "
              "train.grad_accum to the number of micro-batches per step", file=sys.stderr)
    check_text_dropout(cfg)
    if cfg.data.mla_words != "auto" and cfg.method.name != "ivt":
        print(f"[tbps] warning: data.mla_words={cfg.data.mla_words} sets IVT's word-level texts; {cfg.method.name} has "
              "no multi-level alignment, so it changes nothing", file=sys.stderr)
    low, high = cfg.train.worker_range()
    if low < high and cfg.train.zero_stage == 3:
        raise ConfigError("elastic workers (train.num_workers=[min, max]) support ZeRO stages 0-2 (a ZeRO-1/2 "
                          "checkpoint of another world size is resharded through DeepSpeed's universal checkpoint); "
                          "ZeRO-3 partitions the weights too and is not resharded by tbps yet: use "
                          "train.zero_stage=2, or a fixed train.num_workers")
    if not cfg.data.url:
        raise ConfigError("data.url is empty: give the dataset URL (a shards directory or s3://bucket/prefix); "
                          "run `python -m tbps.train` with no arguments for the built-in demo")
    try:
        manifest = load_manifest(cfg.data.url)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"data.url: {e}") from None
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg.data, key)
        if split not in manifest["splits"]:
            hint = " (this dataset has no val split: choose one explicitly; selecting on test inflates results)" \
                if key == "val_split" else ""
            raise ConfigError(f"data.{key}: split {split!r} not in {cfg.data.url} (has "
                              f"{', '.join(manifest['splits'])}){hint}")
    for split in dict.fromkeys((cfg.data.val_split, cfg.data.test_split)):  # each once, val first
        info = manifest["splits"][split]
        if info.get("ids_in_train"):  # a corpus whose splits share people (shards.corpus)
            from shards.corpus import shared_ids_note

            print(f"[tbps] warning: {shared_ids_note(split, info)}", file=sys.stderr)
    workers = max(1, cfg.data.loader_workers)
    weight = sampling_weight(cfg.data.sampling)
    # every mixture member's train split; the batch check below on the mixture's first epoch
    manifests = {cfg.data.url: manifest}
    for i, member in enumerate(cfg.data.mix or []):
        try:
            manifests[member.url] = load_manifest(member.url)
            if cfg.data.train_split not in manifests[member.url]["splits"]:
                raise ValueError(f"split {cfg.data.train_split!r} not in {member.url}")
        except (FileNotFoundError, OSError, ValueError) as e:
            raise ConfigError(f"data.url[{i}]: {e}") from None
    for url, member_manifest in manifests.items():  # IVT's loaders' long captions (shards.build --caption-rule)
        note = caption_rule_warning(cfg.method.name, member_manifest, url)
        if note:
            print(f"[tbps] warning: {note}", file=sys.stderr)
    shards = first_epoch_shards(cfg.data, manifest)
    if weight == "captions":
        try:
            check_pair_counts(shards, cfg.data.url)
        except ValueError as e:
            raise ConfigError(f"data.sampling: {e}") from None
    try:
        check_identity_config(cfg.data)
        if cfg.data.sampler == "identity":
            check_identity_layout(shards, cfg.data.url, cfg.data.train_split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.sampler == "random" and manifest["splits"][cfg.data.train_split].get("layout") == "by_identity":
        print(f"[tbps] warning: the train split of {cfg.data.url} is written by identity (shards.build --group-ids) "
              "and data.sampler=random: batches will hold more same-identity pairs than a global shuffle; use "
              "data.sampler=identity, or a conversion without --group-ids", file=sys.stderr)
    ranks = cfg.train.worker_range()[1]
    cover = epoch_coverage(shards, cfg.data, ranks, workers, keep_last=keeps_last_batch(cfg, ranks)[0])
    used, total = cover["used"], cover["total"]
    units = {"captions": "pairs", "samples": "images"}[weight]
    if used == 0:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} x {ranks} workers x {workers} loader workers leaves no "
                          f"full batch in the {len(shards)} train shards of {cfg.data.url} ({total} {units}): lower "
                          "data.batch_size or data.loader_workers, or write more shards")
    if used < 0.95 * total:  # (another part each epoch: the shards' assignment is reshuffled)
        why = []
        if cover["shares"]:
            slots = ranks * workers
            why.append(f"{cover['shares']} as the ranks' shares of its {len(shards)} shards differ (each rank stops at "
                       f"the smallest; a multiple of {slots} equal shards evens them: shards.build --min-shards "
                       f"{-(-len(shards) // slots) * slots})")
        if cover["remainders"]:
            if cfg.data.sampler == "identity":
                why.append(f"{cover['remainders']} as the identity sampler's remainders: each identity's pairs past a "
                           f"multiple of data.instances_per_id={cfg.data.instances_per_id}, as IVT's sampler leaves "
                           f"them, and the ranks' remainders below a full batch of {cfg.data.batch_size}")
            else:
                why.append(f"{cover['remainders']} as the ranks' remainders below a full batch of "
                           f"{cfg.data.batch_size}")
        print(f"[tbps] warning: an epoch trains on {used} of the {total} {units} of the train split "
              f"({100 * used / total:.1f} %; another part is left out each epoch): {'; '.join(why)}", file=sys.stderr)
    for key, url in (("data.tokenizer", tokenizer_path(cfg)), ("model.pretrained", cfg.model.pretrained),
                     ("model.image_pretrained", cfg.model.image_pretrained),
                     ("model.text_pretrained", cfg.model.text_pretrained)):
        if url and not (key == "data.tokenizer" and url == CLIP_TOKENIZER):
            fs, path = filesystem(url)
            if not fs.exists(path):
                raise ConfigError(f"{key}: {url} does not exist")
            if key != "data.tokenizer" and fs.isfile(path):
                with fs.open(path, "rb") as f:
                    check_weight_file(key, url, f.read(16))
            hint = run_directory_hint(url) if key == "model.pretrained" else None
            if hint:
                raise ConfigError(f"{key}: {hint}")
    if not cfg.model.pretrained:  # (with it, the checkpoint's weights give the architecture, checked as they load)
        check_architecture(cfg)
    check_resumed_config(cfg)
    return manifest


def run_plan(cfg: Config, manifest: dict) -> list[str]:
    """What a run of ``cfg`` would do, in lines (``--check`` of ``tbps.train`` and ``tune.sweep``, after
    :func:`preflight`): the method and precision, the train split, steps per epoch and the global batch for each world
    size the run may have, and evaluation."""
    from tbps.data.stream import epoch_coverage, first_epoch_shards, keeps_last_batch, sampling_weight, \
        train_batches
    from shards.readers import caption_rule_of
    from tbps.engine.loop import epoch_steps, resolve_precision

    data, train = cfg.data, cfg.train
    weight = sampling_weight(data.sampling)
    units = {"captions": "pairs", "samples": "images"}[weight]
    shards = first_epoch_shards(data, manifest)
    total = sum(s[weight] for s in shards)
    losses = ", ".join(f"{loss.name} x{loss.weight:g}" for loss in getattr(cfg.method, "losses", []) or [])
    about = [manifest["dataset"]] if manifest.get("dataset") else []
    if caption_rule_of(manifest) == "ivt":
        about.append("built with IVT's caption rule")
    lines = [f"method {cfg.method.name}" + (f" ({losses})" if losses else "") + f", precision "
             f"{resolve_precision(cfg)}, ZeRO-{train.zero_stage}, compile {'on' if train.compile else 'off'}",
             f"train split {data.train_split!r} of {data.url}" + (f" ({', '.join(about)})" if about else "") +
             f": {total:,} {units} in {len(shards)} shards" + (" (the mixture's first epoch)" if data.mix else "") +
             f", data.sampling={data.sampling}, data.sampler={data.sampler}"]
    loaders = max(1, data.loader_workers)
    low, high = train.worker_range()
    for ranks in dict.fromkeys((low, high)):
        keep, why_not = keeps_last_batch(cfg, ranks)
        batches = train_batches(shards, data, ranks, loaders, 0, keep)
        try:
            steps = epoch_steps(batches, train)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cover = epoch_coverage(shards, data, ranks, loaders, keep_last=keep)
        accum = f" x {train.grad_accum} micro-batches" if train.grad_accum > 1 else ""
        last = "" if data.last_batch == "drop" else \
            ("; the last, partial batch kept" if keep else f"; the last, partial batch dropped ({why_not})")
        per_epoch = f"{steps:,} step{'s' if steps != 1 else ''} an epoch"
        lines.append(f"{ranks} worker(s) x batch {data.batch_size}{accum} = global batch "
                     f"{ranks * data.batch_size * train.grad_accum}, {loaders} loader worker(s) each: {per_epoch}, "
                     f"{steps * train.epochs:,} in {train.epochs} epochs; an epoch trains on {cover['used']:,} of "
                     f"{total:,} {units}{last}")
    o = cfg.optim
    mults = [f"new modules x{o.new_module_lr_mult:g}" if o.new_module_lr_mult != 1 else "",
             f"biases x{o.bias_lr_mult:g}" if o.bias_lr_mult != 1 else ""]
    lines.append(f"optimizer {o.name} lr {o.lr:g}" + (f" ({', '.join(m for m in mults if m)})" if any(mults) else "") +
                 f", weight decay {o.weight_decay:g}; {o.scheduler} schedule per {o.schedule_per}" +
                 (f", warm-up {o.warmup_epochs:g} epoch{'s' if o.warmup_epochs != 1 else ''} from "
                    f"{o.warmup_start_factor:g} x lr" if o.warmup_epochs else "")
                 + f", floor {o.min_lr:g}" + (f", gradients clipped at norm {o.grad_clip:g}" if o.grad_clip else ""))
    lines.append(f"evaluation: {data.val_split!r} " +
                 (f"every {train.eval_every} epoch(s)" if train.eval_every else "at the end") +
                 f", the best by {train.select_metric} kept; {data.test_split!r} with it at the end" +
                 (", and every epoch (eval.test_every_epoch)" if cfg.eval.test_every_epoch else ""))
    return lines


def run_outputs(cfg: Config) -> str:
    """Where a run's outputs go, and whether the run starts there or resumes the checkpoint it finds."""
    from shards.storage import filesystem, join

    run_dir = join(cfg.train.storage_path, cfg.train.run_name)
    fs, path = filesystem(run_dir)
    resumes = fs.exists(join(path, "config.yaml")) and bool(fs.glob(join(path, "checkpoint_*")))
    return f"outputs: {run_dir} ({'resumes its latest checkpoint' if resumes else 'a new run'})"


def check_weight_file(key: str, url: str, head: bytes) -> None:
    """A weights file's first bytes must be a torch checkpoint's (a zip archive: torch.save, TorchScript; a pickle:
    torch.save's legacy format) or a .safetensors header (8-byte length, then JSON): another file (a config, an
    image) was read by every Ray worker, which failed with torch's unpickling error, and retried."""
    zip_archive, pickle = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    safetensors = len(head) > 8 and 0 < int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{"
    if not (zip_archive or pickle or safetensors):
        raise ConfigError(f"{key}: {url} is not a weights file (a torch checkpoint .pt/.pth/.bin or a .safetensors "
                          f"file, or a directory holding one); it begins with {head[:12]!r}")


def check_local_resources(cfg: Config) -> None:
    """Without a cluster to connect to (train.ray_address, RAY_ADDRESS), tbps starts a Ray on this machine; workers
    asking for more than it has would wait forever (Ray repeats "No available node types can fulfill resource
    request"), so that is an error here. A cluster may grow (an autoscaler): there the request waits, as Ray's."""
    ray = sys.modules.get("ray")
    if cfg.train.ray_address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return  # a cluster, or a Ray this process already joined (ensure_ray then starts none)
    low = cfg.train.worker_range()[0]
    if cfg.train.use_gpu:
        import torch

        have = torch.cuda.device_count()
        if have < low * cfg.train.gpus_per_worker:
            raise ConfigError(f"train.use_gpu=true: {low} Train worker(s) x train.gpus_per_worker="
                              f"{cfg.train.gpus_per_worker:g} GPU, and this machine has {have} (no cluster to "
                              "connect to: train.ray_address / RAY_ADDRESS unset, so tbps starts Ray here); run on a "
                              "GPU machine, lower train.num_workers, or connect to a cluster")
    need = low * cfg.train.cpus_per_worker + 1  # the workers and Ray Train's controller
    if cfg.train.ray_num_cpus and cfg.train.ray_num_cpus < need:
        raise ConfigError(f"train.ray_num_cpus={cfg.train.ray_num_cpus} gives the local Ray fewer CPUs than {low} "
                          f"Train worker(s) x train.cpus_per_worker={cfg.train.cpus_per_worker} + 1 for the "
                          f"controller ({need}): the workers would wait forever; raise it or leave it 0 (enough)")


def check_architecture(cfg: Config) -> None:
    """Build the model the config describes on the meta device (no memory, ~1 s for ViT-B): an unknown timm tower, a
    width its head count does not divide or an image_overrides key the tower does not take used to fail in every Ray
    worker, with a traceback and a retry; now a ConfigError before Ray starts."""
    import torch

    from tbps.methods import TextSpec, build_method

    text = TextSpec(vocab_size=1000, length=cfg.data.text_length, pad_id=0, mask_id=1, bos_id=2, eos_id=3)
    try:
        with torch.device("meta"):
            build_method(cfg, text, num_classes=2)
    except ConfigError:
        raise
    except Exception as e:  # whatever the tower libraries raise (transformers: its own validation error class)
        message = " ".join(line.strip() for line in str(e).strip().splitlines())
        hint = ("; each width must divide by its head count: model.text_width / text_heads, model.embed_dim / "
                "method.cross_heads, model.shared_width / shared_heads" if re.search(r"divisible|multiple", message)
                else "")
        raise ConfigError(f"the model this config describes cannot be built ({type(e).__name__}: {message}){hint}") \
            from e


# keys a resumed run may change: where it runs and how it is operated, not what it trains
RESUME_MAY_CHANGE = {
    "train.num_workers", "train.elastic_resize_interval_s", "train.use_gpu", "train.cpus_per_worker",
    "train.gpus_per_worker", "train.max_failures", "train.log_every", "train.ray_address", "train.ray_num_cpus",
    "train.worker_niceness", "train.num_to_keep", "train.checkpoint_every_steps", "train.compile",
    "train.activation_checkpointing", "train.storage_path", "train.run_name", "data.loader_workers",
    "data.on_bad_shard", "eval.batch_size", "eval.query_chunk", "eval.test_every_epoch", "eval.precision",
    "method.linear_init"}  # (a resumed run's weights come from its checkpoint, whatever they started from)
# allowed and named in a line: the same data at another place; a run extended (or cut) to another number of epochs
RESUME_NAMED = {"data.url": "", "data.mix": "", "data.tokenizer": "",
                "train.epochs": " (the lr schedule follows the new number of epochs from the resumed step)"}


def training_changes(saved: dict, cfg: Config) -> tuple[dict, dict]:
    """Where ``cfg`` differs from the ``saved`` config (a config.yaml's tree) in what it trains, as key -> (saved
    value, new value), sorted: (keys that may not change on a resume, ``RESUME_NAMED`` keys). ``RESUME_MAY_CHANGE``
    keys are not compared, nor the architecture keys that an unchanged ``model.pretrained`` sets."""
    import copy

    from tbps.engine.loop import as_saved
    from tbps.methods.pretrained import METHOD_ARCH, MODEL_ARCH

    from tbps.config import flatten

    keep = ("image_overrides",)
    saved, new = flatten(saved, keep), flatten(to_dict(as_saved(copy.deepcopy(cfg))), keep)
    ignore = set(RESUME_MAY_CHANGE)
    if new.get("model.pretrained") and new["model.pretrained"] == saved.get("model.pretrained"):
        ignore |= {f"model.{k}" for k in MODEL_ARCH} | {f"method.{k}" for k in METHOD_ARCH.get(cfg.method.name, ())}
        ignore |= {"model.image_pretrained", "model.text_pretrained", "data.text_length"}
    changed = sorted(k for k in saved.keys() | new.keys() if k not in ignore and saved.get(k) != new.get(k))
    return ({k: (saved.get(k), new.get(k)) for k in changed if k not in RESUME_NAMED},
            {k: (saved.get(k), new.get(k)) for k in changed if k in RESUME_NAMED})


def check_diverged(cfg: Config, run_dir: str) -> None:
    """A run that diverged (its ``diverged.json``, tbps/engine/loop.py ``TrainRun.check_finite``) under the config
    given again would diverge again: an error quoting the record, before Ray starts. With any training key
    changed the run goes on (a run without a checkpoint starts afresh; with one, ``check_resumed_config`` decides)."""
    import yaml

    from shards.storage import join, read_json
    from tbps.engine.loop import DIVERGED

    try:
        record = read_json(join(run_dir, DIVERGED))
    except FileNotFoundError:
        return
    try:
        saved = yaml.safe_load(record["config"])
    except (KeyError, TypeError, yaml.YAMLError):
        saved = None
    if isinstance(saved, dict) and any(training_changes(saved, cfg)):
        return
    raise ConfigError(f"train.run_name {cfg.train.run_name!r}: {record.get('message', 'the run diverged')} "
                      f"[recorded in {join(run_dir, DIVERGED)}; delete that file to train this config again "
                      "anyway]")


def check_resumed_config(cfg: Config) -> None:
    """A run whose directory holds a checkpoint resumes from it (Ray Train, by ``train.run_name``): a changed
    training key used to be written to config.yaml and then either not used at all (the optimizer's lr, weight decay
    and betas come back from the checkpoint: an lr given on the command line was silently not trained with) or used
    from the resumed epoch on (one run of two configs, config.yaml naming only the last). Such a change is now an
    error naming the keys. Keys that say where and how the run is operated (``RESUME_MAY_CHANGE``: workers, compile,
    ...) may change; the data may move and the run be extended to more epochs (``RESUME_NAMED``, named in a line).
    Architecture keys that ``model.pretrained`` sets are compared as the checkpoint sets them (only
    ``model.pretrained`` itself counts)."""
    from shards.storage import filesystem, join
    from tbps.checkpoint import read_saved_config

    run_dir = join(cfg.train.storage_path, cfg.train.run_name)
    fs, path = filesystem(run_dir)
    check_diverged(cfg, run_dir)
    if not fs.exists(join(path, "config.yaml")) or not fs.glob(join(path, "checkpoint_*")):
        return  # a new run, or one that stopped before its first checkpoint (it starts afresh)
    saved = to_dict(read_saved_config(run_dir))
    changed, named = training_changes(saved, cfg)
    if changed:
        diffs = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(f"train.run_name {cfg.train.run_name!r} resumes the run under {run_dir}, which was "
                          f"trained with another config: {diffs}{more}. A resumed run trains on with the config it "
                          "started with (its optimizer state, lr schedule and data order); give these keys their "
                          "old values, choose a new train.run_name for a new run, or start a new run from this "
                          f"one's weights with model.pretrained={join(run_dir, 'best')}")
    if named:
        print(f"[tbps] resuming {cfg.train.run_name!r} with "
              + "; ".join(f"{k}: {old!r} -> {new!r}{RESUME_NAMED[k]}" for k, (old, new) in named.items()),
              file=sys.stderr)


def check_text_dropout(cfg: Config) -> None:
    """``model.text_dropout`` is read by IVT's shared tower and by a two-tower method's BERT text tower; with the
    CLIP text tower, which has no dropout, a value > 0 would be read by nothing."""
    from tbps.methods import METHODS
    from tbps.methods.towers import TwoTower
    from tbps.models.text import dropout_settings

    if issubclass(METHODS[cfg.method.name], TwoTower):
        try:
            dropout_settings(cfg.model.text_tower, cfg.model.text_dropout)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def resolve_worker_settings(cfg: Config) -> None:
    """Settings that depend on the worker's resources, fixed on the driver so that the pre-flight checks, every
    worker and the saved config agree: ``data.loader_workers: -1`` -> train.cpus_per_worker - 1 (at least 1)."""
    from tbps.data.stream import resolve_loader_workers

    try:
        cfg.data.loader_workers = resolve_loader_workers(cfg.data.loader_workers, cfg.train.cpus_per_worker)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def ensure_ray(cfg: Config, console: str | None = None) -> None:
    """Connect to a running cluster (train.ray_address / RAY_ADDRESS / inside `ray job submit`) or start a local Ray
    with the dashboard bound to 127.0.0.1. ``console`` (``bar`` | ``none``): print the workers' output through
    ``tbps.engine.console`` (no Ray noise, no prefixes; progress as a bar, or not at all) and keep Ray's own driver
    messages to errors; None (``--verbose``): Ray's printing, unchanged."""
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.ERROR} if console else {}
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        need = max(1, len(cfg.train.seeds)) * (cfg.train.worker_range()[1] * cfg.train.cpus_per_worker + 1) + 1
        num_cpus = cfg.train.ray_num_cpus or max(os.cpu_count() or 1, need)
        env = forwarded_env()
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           runtime_env={"env_vars": env} if env else None, log_to_driver=True, **quiet)
        if console and context.dashboard_url:
            print(f"[tbps] started a local Ray; dashboard at http://{context.dashboard_url}", file=sys.stderr)
    if console:
        from tbps.engine.console import install

        install(console)


def storage_path(cfg: Config) -> str:
    p = cfg.train.storage_path
    return p if "://" in p else os.path.abspath(os.path.expanduser(p))


def worker_runtime_env(cfg: Config) -> dict:
    """The Train workers' own runtime env, merged by Ray into the job's (env_vars are merged, the rest inherited).

    Ray starts every worker process at nice 15 so its daemons stay responsive. For the processes that do the
    training that means any normal-priority process, Ray's own daemons included, preempts the step (and its data
    loader processes, which inherit the value). tbps runs the Train workers at train.worker_niceness (default 0,
    the priority a plain `python train.py` gets); Ray's controller and helper actors keep 15.
    """
    return {"env_vars": {"RAY_worker_niceness": str(cfg.train.worker_niceness)}}


def build_trainer(cfg: Config, callbacks: list | None = None, progress: str = "lines", label: str = ""):
    """The TorchTrainer of one run. ``progress``: how rank 0 reports training progress -- ``lines`` (a [tbps] line
    every train.log_every steps) or ``events`` (the same, as events ``tbps.engine.console`` renders); ``label``
    names the run in its lines (``[tbps seed 1] …``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tbps.engine.worker import train_loop_per_worker

    resolve_worker_settings(cfg)
    low, high = cfg.train.worker_range()
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "progress": progress, "label": label},
        scaling_config=ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=cfg.train.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=callbacks, worker_runtime_env=worker_runtime_env(cfg)),
    )


def fit(cfg: Config, verbose: bool = True):
    """Validate, connect/start Ray, train. Returns Ray's Result (metrics = the final test report). ``verbose=False``
    (``python -m tbps.train`` without --verbose): a progress bar and tbps's lines instead of Ray's raw stream."""
    from tbps.engine.lease import DriverLease

    cfg.train.storage_path = storage_path(cfg)
    preflight(cfg)
    with DriverLease(cfg.train.storage_path, cfg.train.run_name):  # one driver per run (a second one stops here)
        ensure_ray(cfg, console=None if verbose else "bar")
        print(f"[tbps] run {cfg.train.run_name!r}: outputs and checkpoints under {cfg.train.storage_path}/"
              f"{cfg.train.run_name}", file=sys.stderr)
        try:
            return build_trainer(cfg, progress="lines" if verbose else "events").fit()
        finally:
            from tbps.engine.console import installed

            if installed():
                installed().close()


def seed_configs(cfg: Config) -> dict[int, Config]:
    """``train.seeds``: one config per seed (``<run_name>-seed<s>``; ``train.seed`` and ``data.seed`` = s)."""
    import copy

    if len(set(cfg.train.seeds)) != len(cfg.train.seeds):
        raise ConfigError(f"train.seeds lists a seed twice: {cfg.train.seeds}")
    out = {}
    for seed in cfg.train.seeds:
        c = copy.deepcopy(cfg)
        c.train.seeds, c.train.seed, c.data.seed = [], seed, seed
        c.train.run_name = f"{cfg.train.run_name}-seed{seed}"
        out[seed] = c
    return out


def fit_seeds(cfg: Config, verbose: bool = True) -> dict[int, str | None]:
    """Train ``train.seeds`` concurrently. Returns seed -> None, or the run's error."""
    cfg.train.storage_path = storage_path(cfg)
    runs = seed_configs(cfg)
    print(f"[tbps] seeds {cfg.train.seeds}: runs {', '.join(c.train.run_name for c in runs.values())} under "
          f"{cfg.train.storage_path}", file=sys.stderr)
    errors = fit_concurrently({f"seed {s}": c for s, c in runs.items()}, verbose, ensure=cfg)
    return {s: errors[f"seed {s}"] for s in runs}


def fit_concurrently(runs: dict[str, Config], verbose: bool = True, ensure: Config | None = None) -> dict:
    """Train several runs at once, each run's driver a Ray task (as Tune runs trials; Ray queues what the cluster
    cannot hold at once); each run's lines are named by its label. Returns label -> None, or the run's error in one
    line (``shards.cli.error_line``)."""
    import ray

    from tbps.engine.lease import DriverLease

    for c in runs.values():
        c.train.storage_path = storage_path(c)
        preflight(c)
    leases = []
    try:
        for c in runs.values():
            leases.append(DriverLease(c.train.storage_path, c.train.run_name).acquire())
        ensure_ray(ensure or next(iter(runs.values())), console=None if verbose else "none")

        @ray.remote(num_cpus=0)
        def run(config: dict, progress: str, label: str) -> str | None:
            from tbps.config import Config as _Config, from_dict

            from shards.cli import error_line

            result = build_trainer(from_dict(_Config, config), progress=progress, label=label).fit()
            return None if result.error is None else error_line(result.error)
        progress = "lines" if verbose else "events"  # the console drops the events of concurrent runs
        refs = {label: run.remote(to_dict(c), progress, label) for label, c in runs.items()}
        out = {}
        for label, ref in refs.items():
            try:
                out[label] = ray.get(ref)
            except Exception as e:  # the task itself failed
                from shards.cli import error_line

                out[label] = error_line(e)
        return out
    finally:
        for lease in leases:
            lease.release()
