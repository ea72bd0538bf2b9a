"""Config: presets, overrides, unknown keys/types; bad configs fail before any worker starts; redaction."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from tbps.config import ConfigError, dump_yaml, load_config
from tbps.train import main as train_main


def test_presets_load_and_overrides_apply():
    for name in ("clip", "clip_tiny", "irra", "irra_tiny", "ivt", "ivt_rstpreid", "ivt_tiny", "pcc", "pcc_tiny"):
        cfg = load_config(name)
        assert cfg.method.name == name.split("_")[0]
    cfg = load_config("irra_tiny", ["method.temperature=0.05", "optim.lr=1e-3", "method.losses=[{name: sdm}]"])
    assert cfg.method.temperature == 0.05 and cfg.optim.lr == 1e-3
    assert [t.name for t in cfg.method.losses] == ["sdm"] and cfg.method.losses[0].weight == 1.0
    assert cfg.model.embed_dim == 128 and cfg.model.text_layers == 2  # irra_tiny inherits irra, overrides sizes


@pytest.mark.parametrize("override, message", [
    ("method.temprature=0.1", "unknown config key method.temprature"),
    ("train.epochs=many", "train.epochs: expected an integer"),
    ("data.flip=yes please", "data.flip: expected a number"),
    ("nonsense", "is not key=value"),
    # enum-like fields are checked when the config loads, not inside every Ray worker
    ("optim.name=adamx", "optim.name must be one of adam, adamw, sgd, got 'adamx'"),
    ("model.image_pool=max", "model.image_pool must be one of cls, mean, got 'max'"),
    ("model.text_tower=gpt", "model.text_tower must be one of clip, bert, got 'gpt'"),
    ("train.precision=fp8", "train.precision must be one of auto, bf16, bf16-autocast, fp16, fp16-autocast, "
                            "fp16-weights, fp32"),
    ("data.on_bad_shard=ignore", "data.on_bad_shard must be one of error, skip"),
    (["method.name=ivt", "method.cmpm_norm=l1"], "method.cmpm_norm must be one of l2, sum"),
    ("method.bmm_max_drop=0.3", "unknown config key method.bmm_max_drop for method irra \\(a key of ivt\\); valid "
                                "keys of irra: name, losses, temperature, learnable_temperature, gather, mask_ratio"),
    (["method.name=pcc", "method.mask_ratio=0.2"], "unknown config key method.mask_ratio for method pcc"),
    ("method.losses=[]", "method.losses is empty; irra offers sdm, itc, mlm, id"),
    ("method.mask_ratio=1.5", "method.mask_ratio must be in \\(0, 1\\) with the mlm loss"),
    # numbers outside their field's valid values: each would train on nonsense or fail inside a Ray worker
    ("method.temperature=-0.02", "method.temperature must be > 0, got -0.02"),
    ("method.temperature=.nan", "method.temperature must be > 0, got nan"),
    ("data.flip=2", r"data.flip must be in \[0, 1\], got 2.0"),
    ("data.text_length=1", r"data.text_length must be >= 3 \(a start, an end and at least one word token\), got 1"),
    ("data.image_size=[384]", r"data.image_size must be a list of 2 numbers, got \[384\]"),
    ("data.std=[0.3, 0, 0.3]", r"data.std\[1\] must be > 0, got 0.0"),
    ("data.erasing_scale=[0.4, 0.02]", r"data.erasing_scale must be \[min, max\]"),
    ("optim.lr=-1e-5", "optim.lr must be > 0, got -1e-05"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ("method.losses=[{name: sdm, weight: -1}]", r"method.losses\[0\].weight must be >= 0, got -1.0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.worker_niceness=-5", r"train.worker_niceness must be in \[0, 19\] \(a process may only lower its own"),
    (["method.name=ivt", "method.bmm_max_drop=1.0"], r"method.bmm_max_drop must be in \[0, 1\), got 1.0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("irra_tiny", override if isinstance(override, list) else [override])


@pytest.mark.parametrize("args, message", [
    (["train.epoch=3"], "unknown config key train.epoch"),
    (["method.name=vilt"], "unknown method 'vilt'"),
    (["data.url=/nonexistent/dataset"], "data.url: no manifest.json at /nonexistent/dataset"),
    (["model.image_pretrained=/nonexistent/vit.safetensors"], "model.image_pretrained: /nonexistent/vit.safetensors"),
    (["data.val_split=dev"], "data.val_split: split 'dev' not in"),
    (["data.batch_size=4096"], "leaves no full batch"),
    (["train.worker_niceness=-5"], "train.worker_niceness must be in [0, 19]"),
    (["method.temperature=0"], "method.temperature must be > 0, got 0.0"),
    (["train.precision=fp16"], "train.precision=fp16 is DeepSpeed's fp16 mode, which needs a GPU"),
    (["train.precision=fp16-weights", "optim.eps=1e-3", "train.zero_stage=1"],
     "train.precision=fp16-weights runs at ZeRO-0 only, and train.zero_stage=1 is set (IRRA's fp16 weights trained "
     "directly: ZeRO's optimizers flatten the parameters into one dtype"),
    (["train.precision=fp16-weights"], "optim.eps=1e-08 is below fp16's smallest normal number (6.1e-05)"),
    (["train.precision=fp16-autocast", "train.zero_stage=2", "train.grad_accum=2", "train.grad_cache=true"],
     "train.precision=fp16-autocast runs at ZeRO-0 only, and train.zero_stage=2 is set (torch's AMP, IVT's: "
     "DeepSpeed's ZeRO 1-3 skip a step whose gradients overflow without telling torch's GradScaler, so its scale "
     "never falls"),
    # a Ray started here that cannot hold the workers: they used to wait forever
    (["train.use_gpu=true", "train.precision=bf16-autocast"], "train.use_gpu=true: 2 Train worker(s) x "
                                                              "train.gpus_per_worker=1 GPU, and this machine has 0"),
    (["train.ray_num_cpus=2"], "train.ray_num_cpus=2 gives the local Ray fewer CPUs than 2 Train worker(s)"),
    # the model is built on the meta device before Ray starts: these failed in every worker, with a retry
    (["model.image_tower=vit_nope"], "the model this config describes cannot be built (ValueError: "
                                     "model.image_tower 'vit_nope': Unknown model (vit_nope))"),
    (["method.cross_heads=7"], "cannot be built (AssertionError: embed_dim must be divisible by num_heads); each "
                               "width must divide by its head count"),
    (["model.image_overrides={qkv_bias_x: true}"], "got an unexpected keyword argument 'qkv_bias_x'"),
    (["model.text_dropout=0.1"], "model.text_dropout=0.1: the CLIP text transformer has no dropout"),
    (["train.select_metric=R2"], "train.select_metric must be one of R1, R5, R10, mAP, mINP, R1_mAP, got 'R2'"),
])
def test_bad_config_fails_before_any_worker_starts(args, message, synth_tiny, capsys):
    import ray

    base = [f"data.url={synth_tiny}"] if not any(a.startswith("data.url=") for a in args) else []
    assert train_main(["--config", "irra_tiny", *base, *args]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_every_numeric_field_with_valid_values_refuses_the_values_beyond_them(synth_tiny):
    """Each field with valid values (``within``): its default and every preset's value pass; a value just outside
    each end is refused, naming the key, when the config loads (as a command-line override) and in pre-flight (a
    config changed in code)."""
    import dataclasses
    import math

    from tbps.config import METHOD_CONFIGS, Config, check_values
    from tbps.engine.launcher import preflight

    for preset in ("irra", "ivt", "ivt_rstpreid", "pcc", "clip", "irra_tiny", "ivt_tiny", "pcc_tiny", "clip_tiny"):
        check_values(load_config(preset))
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    checked = []
    for section, make in sections.items():
        classes = [(m, c) for m, c in METHOD_CONFIGS.items()] if section == "method" else [(None, make)]
        for method, cls in classes:
            for f in dataclasses.fields(cls):
                rule = f.metadata.get("within")
                if rule is None or (section == "method" and f.name in {g.name for g in dataclasses.fields(
                        METHOD_CONFIGS["clip"])} and method != "clip"):
                    continue  # fields every method shares: checked once, under clip
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                step = 1 if isinstance(default if not isinstance(default, list) else default[0], int) else 1e-3
                below = rule.lo if not rule.lo_closed else rule.lo - step
                above = rule.hi if not rule.hi_closed else rule.hi + step
                outside = [v for v, end in ((below, rule.lo), (above, rule.hi)) if math.isfinite(end)]
                for bad in outside:
                    value = [bad] * len(default) if isinstance(default, list) else bad
                    key = f"{section}.{f.name}"
                    pre = [f"method.name={method}"] if method else []
                    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[0\])? must be "):
                        load_config(None, pre + [f"{key}={value}"])
                    cfg = load_config("clip_tiny" if method in (None, "clip") else f"{method}_tiny",
                                      [f"data.url={synth_tiny}"])
                    setattr(getattr(cfg, section), f.name, value)
                    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[0\])? must be "):
                        preflight(cfg)
                    checked.append(key)
    assert {"method.temperature", "method.bmm_max_drop", "method.margin", "optim.lr", "data.flip",
            "train.zero_stage", "model.drop_path", "eval.query_chunk"} <= set(checked), checked


def test_saved_config_redacts_credentials():
    cfg = load_config("irra_tiny", ["data.url=s3://AKIAXXXX:supersecret@bucket/data"])
    text = dump_yaml(cfg)
    assert "supersecret" not in text and "AKIAXXXX" not in text
    assert yaml.safe_load(text)["data"]["url"] == "s3://***:***@bucket/data"
    from tbps.config import redact

    tree = redact({"aws_secret_access_key": "abc", "api_token": "t", "tokenizer": "/tok", "password": ""})
    assert tree == {"aws_secret_access_key": "***", "api_token": "***", "tokenizer": "/tok", "password": ""}


def test_every_preset_file_is_valid_yaml():
    from tbps.config import PRESET_DIR

    for f in os.listdir(PRESET_DIR):
        assert isinstance(yaml.safe_load(open(os.path.join(PRESET_DIR, f))), dict), f


def test_a_locally_started_ray_is_given_settings_but_never_secrets():
    """Ray writes runtime envs into its logs (runtime_env_agent.log): only non-secret settings go there; the
    workers of a Ray started by the driver inherit the credentials (tests/test_cluster.py scans the logs)."""
    from tbps.engine.launcher import forwarded_env

    env = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "HF_TOKEN": "h",
           "AZURE_STORAGE_KEY": "k", "AZURE_STORAGE_SAS_TOKEN": "x", "GOOGLE_APPLICATION_CREDENTIALS": "/key.json",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1", "TBPS_STORAGE_RETRY_S": "30",
           "AZURE_STORAGE_ACCOUNT": "acct", "RAY_AUTH_MODE": "disabled", "PATH": "/bin"}
    assert forwarded_env(env) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                                  "TBPS_STORAGE_RETRY_S": "30", "AZURE_STORAGE_ACCOUNT": "acct",
                                  "RAY_AUTH_MODE": "disabled"}


def test_enum_fields_accept_what_the_code_implements():
    import typing

    from tbps.config import CmpmNorm, OnBadShard
    from tbps.data.stream import ON_BAD_SHARD
    from tbps.losses import CMPM_NORMS

    assert typing.get_args(CmpmNorm) == CMPM_NORMS and typing.get_args(OnBadShard) == ON_BAD_SHARD
    for preset in ("irra", "ivt", "ivt_rstpreid", "pcc", "clip", "irra_tiny", "ivt_tiny", "pcc_tiny", "clip_tiny"):
        load_config(preset)  # every preset's values are valid


def test_each_method_has_its_own_config_section():
    from tbps.config import IrraMethodConfig, IvtMethodConfig, PccMethodConfig

    assert type(load_config("ivt_tiny").method) is IvtMethodConfig
    # another method on a preset: that method's defaults, the other method.* overrides kept
    cfg = load_config("irra_tiny", ["method.temperature=0.1", "method.name=pcc"])
    assert type(cfg.method) is PccMethodConfig and cfg.method.temperature == 0.1
    assert [t.name for t in cfg.method.losses] == ["sdm", "cmr", "id"] and cfg.method.num_parts == 8
    # a method's sweepable fields come from its class, conditional on its loss terms
    assert IrraMethodConfig.hyperparameters(["sdm", "id"]) == {"temperature", "learnable_temperature", "gather"}
    assert {"mask_ratio", "cross_layers", "cross_heads"} <= IrraMethodConfig.hyperparameters(["sdm", "mlm"])
    assert IvtMethodConfig.hyperparameters(["cmpm"]) == {"gather", "cmpm_norm", "bmm_max_drop"}
    # the saved config holds the chosen method's fields only
    assert "num_parts" not in yaml.safe_load(dump_yaml(load_config("irra_tiny")))["method"]


def test_configs_saved_with_every_methods_fields_still_load():
    """Before per-method sections, config.yaml held every method's fields in one flat section."""
    from tbps.config import Config, from_dict, saved_config

    tree = yaml.safe_load(dump_yaml(load_config("ivt_tiny")))
    tree["method"].update({"mask_ratio": 0.15, "cross_layers": 4, "num_parts": 8, "margin": 0.2})
    with pytest.raises(ConfigError, match="unknown config key method.mask_ratio for method ivt"):
        from_dict(Config, tree)  # as typed config, it is refused
    cfg = saved_config(tree)
    assert cfg == load_config("ivt_tiny")
    tree["method"]["bogus"] = 1  # a key no method has is still an error, naming the file
    with pytest.raises(ConfigError, match="run/config.yaml: unknown config key method.bogus"):
        saved_config(tree, "run/config.yaml")


def test_a_resumed_run_refuses_a_changed_training_config(synth_tiny, tmp_path, capsys):
    """Re-running a train.run_name that has a checkpoint resumes it with the optimizer state of the config it started
    with: a changed training key (an lr, a loss weight) used to be written to config.yaml and not trained, or trained
    from the resumed epoch on. Operational keys may change, the data may move and the epochs grow (named in a line),
    and architecture keys that model.pretrained sets are not compared."""
    import ray

    from tbps.engine.launcher import check_resumed_config
    from tbps.engine.loop import as_saved

    def run_dir(name, overrides=(), checkpoint=True):
        cfg = load_config("clip_tiny", [f"data.url={synth_tiny}", f"train.storage_path={tmp_path}",
                                        f"train.run_name={name}", *overrides])
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(dump_yaml(as_saved(cfg)))
        if checkpoint:
            (tmp_path / name / "checkpoint_2026-11-25_01-00-00.000000").mkdir()

    base = [f"data.url={synth_tiny}", f"train.storage_path={tmp_path}", "data.loader_workers=1"]
    run_dir("r", ["data.loader_workers=1"])
    args = ["--config", "clip_tiny", *base, "train.run_name=r", "optim.lr=0.01",
            "method.losses=[{name: itc, weight: 2}]"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "train.run_name 'r' resumes the run under" in err and "optim.lr: 0.0005 -> 0.01" in err
    assert "method.losses: [{'name': 'itc', 'weight': 1.0}] -> [{'name': 'itc', 'weight': 2.0}]" in err
    assert f"model.pretrained={tmp_path}/r/best" in err
    assert not ray.is_initialized()

    def check(name, overrides):
        check_resumed_config(load_config("clip_tiny", [*base, f"train.run_name={name}", *overrides]))

    check("r", ["train.num_workers=1", "train.compile=true", "train.log_every=5", "eval.batch_size=16",
               "eval.precision=fp32"])
    moved = tmp_path / "moved"
    moved.symlink_to(synth_tiny)
    check("r", [f"data.url={moved}", "train.epochs=30"])
    err = capsys.readouterr().err
    assert f"data.url: '{synth_tiny}' -> '{moved}'" in err
    assert "train.epochs: 24 -> 30 (the lr schedule follows the new number of epochs from the resumed step)" in err
    run_dir("fresh", checkpoint=False)  # stopped before its first checkpoint: starts afresh with the new config
    check("fresh", ["optim.lr=0.01"])
    check("new", ["optim.lr=0.01"])
    # model.pretrained sets the architecture: the run's config.yaml holds the checkpoint's sizes, the command line
    # the preset's
    run_dir("p", ["model.pretrained=/weights/ViT-B-16.pt", "model.text_layers=12", "model.embed_dim=512"])
    check("p", ["model.pretrained=/weights/ViT-B-16.pt"])
    with pytest.raises(ConfigError, match=r"model.pretrained: '/weights/ViT-B-16.pt' -> '/weights/other.pt'"):
        check("p", ["model.pretrained=/weights/other.pt"])


def test_a_weights_path_that_holds_no_weights_stops_before_ray(synth_tiny, tmp_path, capsys):
    """model.pretrained / image_pretrained / text_pretrained naming a file that is no checkpoint (here the dataset's
    manifest) failed in every Ray worker with torch's unpickling error, and was retried; the formats tbps reads pass."""
    import ray
    import torch
    from safetensors.torch import save_file

    from tbps.engine.launcher import check_weight_file

    manifest = f"{synth_tiny}/manifest.json"
    for key in ("model.pretrained", "model.image_pretrained"):
        assert train_main(["--config", "clip_tiny", f"data.url={synth_tiny}", f"{key}={manifest}"]) == 2
        err = capsys.readouterr().err
        assert f"{key}: {manifest} is not a weights file" in err and "it begins with b'{" in err
        assert not ray.is_initialized()
    state = {"w": torch.ones(2)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        check_weight_file("model.pretrained", name, (tmp_path / name).read_bytes()[:16])


def test_a_run_that_is_all_warm_up_is_warned_about(synth_tiny, capsys):
    """A paper preset shortened for a try (irra: 5 warm-up epochs) trains at a rising fraction of its lr and never
    decays: pre-flight says so; a run longer than its warm-up gets no such line."""
    from tbps.engine.launcher import preflight

    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "train.epochs=3", "optim.warmup_epochs=3"]))
    assert ("[tbps] warning: optim.warmup_epochs=3 covers all train.epochs=3: the whole run is warm-up, so the lr "
            "never reaches optim.lr and never decays") in capsys.readouterr().err
    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "train.epochs=4", "optim.warmup_epochs=3"]))
    assert "warm-up" not in capsys.readouterr().err


def test_an_mla_rule_for_a_method_without_mla_is_warned_about(synth_tiny, capsys):
    """data.mla_words picks IVT's word-level rule; set for another method it would silently change nothing."""
    from tbps.engine.launcher import preflight

    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "data.mla_words=clauses"]))
    assert ("[tbps] warning: data.mla_words=clauses sets IVT's word-level texts; irra has no multi-level alignment, "
            "so it changes nothing") in capsys.readouterr().err
    preflight(load_config("ivt_tiny", [f"data.url={synth_tiny}", "data.mla_words=clauses"]))
    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}"]))
    assert "mla_words" not in capsys.readouterr().err


def test_a_small_adam_eps_is_refused_only_where_adam_s_moments_are_fp16(synth_tiny):
    """fp16-weights keeps the converted weights' Adam moments in fp16, where an eps of 1e-8 rounds to 0 (refused,
    above); fp16-autocast keeps fp32 weights and moments, so the same eps is fine there."""
    from tbps.engine.launcher import preflight

    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "train.precision=fp16-autocast"]))  # eps 1e-8
    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "train.precision=fp16-weights", "optim.eps=1e-4"]))
    with pytest.raises(ConfigError, match="optim.eps=1e-08 is below fp16's smallest normal number"):
        preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", "train.precision=fp16-weights"]))


@pytest.mark.parametrize("precision", ["fp16-weights", "fp16-autocast"])
def test_the_fp16_precisions_take_grad_cache_and_compile_at_zero_0(synth_tiny, precision):
    """The official codes' precisions (the irra/clip and ivt presets' defaults) with #15's step options: grad_cache and
    compile are accepted (tests/test_gradcache.py and tests/test_step_options.py train them); ZeRO 1-3 are not
    (above)."""
    from tbps.engine.launcher import preflight

    preflight(load_config("irra_tiny", [f"data.url={synth_tiny}", f"train.precision={precision}", "optim.eps=1e-3",
                                        "train.grad_accum=2", "train.grad_cache=true", "train.compile=true"]))


def test_evaluation_precision_follows_the_official_codes():
    """eval.precision auto, on a GPU: as the official code evaluates a model trained in train.precision -- IRRA its
    fp16 weights (fp16), IVT outside the autocast of its AMP training (its do_inference_* run no autocast: fp32);
    tbps's own precisions in their compute dtype. A set eval.precision (or tbps.evaluate --precision) wins; a CPU
    evaluates in fp32."""
    import torch

    from tbps.evaluate import evaluation_autocast
    from tbps.methods.base import eval_dtype

    assert evaluation_autocast(load_config("irra"), "cuda") is torch.float16
    assert evaluation_autocast(load_config("clip"), "cuda:1") is torch.float16
    assert evaluation_autocast(load_config("ivt"), "cuda") is None
    assert evaluation_autocast(load_config("pcc"), "cuda") is torch.bfloat16  # auto: bf16 autocast on GPUs
    assert evaluation_autocast(load_config("irra"), "cpu") is None
    assert evaluation_autocast(load_config("ivt", ["eval.precision=bf16"]), "cuda") is torch.bfloat16
    assert evaluation_autocast(load_config("irra", ["eval.precision=fp32"]), "cuda") is None
    assert [eval_dtype(p) for p in ("fp32", "bf16-autocast", "bf16", "fp16", "fp16-weights", "fp16-autocast")] == \
        [None, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, None]
    with pytest.raises(ConfigError, match="eval.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        load_config("ivt", ["eval.precision=fp8"])


def test_check_prints_the_plan_and_the_config_and_starts_nothing(synth_tiny, tmp_path, capsys):
    """python -m tbps.train --check: pre-flight as a run does it, then the plan -- steps per epoch as the workers'
    loaders count them, for each world size of an elastic range, the last batch kept on one worker and dropped on
    two -- and the resolved config; no Ray, no run directory. A bad config gives a run's one message and exit 2."""
    import ray

    from tbps.data import build_train_loader, load_tokenizer

    overrides = ["--config", "clip_tiny", f"data.url={synth_tiny}", f"train.storage_path={tmp_path}",
                 "train.run_name=chk", "train.num_workers=[1,2]", "data.batch_size=16", "data.last_batch=keep",
                 "data.loader_workers=2", "train.epochs=3"]
    assert train_main(overrides + ["--check"]) == 0
    out, err = capsys.readouterr()
    plan, config = out.split("\nconfig (as resolved")
    assert ("1 worker(s) x batch 16 = global batch 16, 2 loader worker(s) each: 8 steps an epoch, 24 in 3 epochs; an "
            "epoch trains on 120 of 120 images; the last, partial batch kept") in plan
    assert ("2 worker(s) x batch 16 = global batch 32, 2 loader worker(s) each: 3 steps an epoch, 9 in 3 epochs; an "
            "epoch trains on 96 of 120 images; the last, partial batch dropped (2 ranks)") in plan
    assert f"outputs: {tmp_path}/chk (a new run)" in plan and "method clip (itc x1), precision fp32" in plan
    assert ("optimizer adam lr 0.0005, weight decay 0.0001; cosine schedule per iteration, warm-up 1 epoch from 0.1 x "
            "lr, floor 0, gradients clipped at norm 5") in plan
    cfg = load_config("clip_tiny", overrides[2:])
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    assert len(build_train_loader(cfg.data, tok, keep_last=True)) == 8  # what the workers' loaders yield
    assert len(build_train_loader(cfg.data, tok, rank=1, world_size=2)) == 3
    saved = yaml.safe_load(config.split("\n", 2)[2])
    assert saved["data"]["last_batch"] == "keep" and saved["train"]["num_workers"] == [1, 2]
    assert "the config is valid; nothing was started" in err
    assert not ray.is_initialized() and not os.path.exists(tmp_path / "chk")
    assert train_main(overrides + ["data.batch_size=500", "--check"]) == 2
    assert "config error: data.batch_size 500 x 2 workers x 2 loader workers leaves no full batch" in \
        capsys.readouterr().err


def test_the_irra_preset_plans_irra_s_epoch_on_cuhk_pedes():
    """On a CUHK-PEDES-sized train split (68,126 pairs of 34,054 images, in 35 shards of a shards.build conversion),
    the irra preset's plan on one GPU is IRRA's epoch: 1,065 steps at 64, the last of 30 pairs, whatever its 7 loader
    workers' shares; on 4 GPUs (IRRA's random sampler has no distributed mode) the last batch is dropped."""
    from tbps.engine.launcher import resolve_worker_settings, run_plan

    images = [973] * 34 + [34054 - 973 * 34]
    captions = [1946] * 34 + [68126 - 1946 * 34]
    shards = [{"name": f"train-{i:05d}.tar", "samples": n, "captions": c} for i, (n, c) in
              enumerate(zip(images, captions))]
    manifest = {"dataset": "cuhk-pedes", "splits": {"train": {"shards": shards}}}
    cfg = load_config("irra", ["data.url=s3://bucket/cuhk-pedes"])
    resolve_worker_settings(cfg)  # data.loader_workers -1 -> 7 (8 CPUs per GPU worker)
    plan = "\n".join(run_plan(cfg, manifest))
    assert ("1 worker(s) x batch 64 = global batch 64, 7 loader worker(s) each: 1,065 steps an epoch, 63,900 in 60 "
            "epochs; an epoch trains on 68,126 of 68,126 pairs; the last, partial batch kept") in plan
    assert "optimizer adam lr 1e-05 (new modules x5, biases x2), weight decay 4e-05; cosine schedule per epoch" in plan
    cfg.train.num_workers = 4
    plan = "\n".join(run_plan(cfg, manifest))
    # 35 shards on 4 ranks: 9, 9, 9 and 8, each rank stopped at the smallest share (pre-flight warns, naming
    # shards.build --min-shards): 8 x 1,946 pairs = 243 batches of 64
    assert ("4 worker(s) x batch 64 = global batch 256, 7 loader worker(s) each: 243 steps an epoch, 14,580 in 60 "
            "epochs; an epoch trains on 62,208 of 68,126 pairs; the last, partial batch dropped (4 ranks)") in plan
