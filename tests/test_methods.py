"""Every registered method on its tiny preset: finite losses, gradients everywhere, and it learns one batch."""

from __future__ import annotations

import os

import pytest
import torch

from tbps.config import ConfigError, load_config
from tbps.data import build_train_loader, load_tokenizer
from tbps.data.text import mask_tokens
from tbps.methods import METHODS, TextSpec, build_method
from tbps.optim import build_optimizer


def _setup(name, synth_tiny, overrides=()):
    cfg = load_config(f"{name}_tiny", [f"data.url={synth_tiny}", "data.loader_workers=0", "data.batch_size=12",
                                       *overrides])
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), num_classes=40)
    batch = next(iter(build_train_loader(cfg.data, tok, method.data_needs())))
    return cfg, method, batch


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_forward_backward_and_learns_a_batch(name, synth_tiny):
    cfg, method, batch = _setup(name, synth_tiny, ["optim.warmup_epochs=0"])
    out = method(batch)
    assert set(out) == {"loss"} | {f"loss_{t.name}" for t in cfg.method.losses}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (ZeRO needs every one): {missing[:5]}"
    opt = build_optimizer(method, cfg.optim)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = method(batch)["loss"]
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    final = method(batch)["loss"].item()
    assert final < 0.6 * first, f"{name}: loss {first:.3f} -> {final:.3f}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_encoders_and_similarity_shapes(name, synth_tiny):
    cfg, method, batch = _setup(name, synth_tiny)
    method.eval()
    images = batch["images"][:, 0] if batch["images"].ndim == 5 else batch["images"]
    with torch.no_grad():
        v = method.encode_image(images[:5])
        t = method.encode_text(batch["text_ids"][:7], batch["text_mask"][:7])
        sim = method.similarity(t, v)
    assert sim.shape == (7, 5) and torch.isfinite(sim).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_losses_score_in_float32_under_bf16_autocast(name, synth_tiny):
    """Under bf16 autocast (train.precision's GPU default) the batch-level losses (SDM, ITC, CMPM, CMR) score the
    step's bf16 features in float32, as IRRA's code scores its fp16 features (``.float()``): through
    ``Method.losses`` their gradients with respect to the features equal float32 scoring's exactly. Scored under
    autocast instead, the similarity matmuls run in bf16 and the gradients move by up to several percent."""
    cfg, method, batch = _setup(name, synth_tiny)
    method.eval()
    with torch.no_grad():
        feats, _ = method.features(batch)
    feats = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in feats.items()}  # as on a GPU

    def feature_grads(score, autocast: bool) -> torch.Tensor:
        leaves = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in feats.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = method.weighted(score(leaves))
        grads = torch.autograd.grad(total, [v for v in leaves.values() if v.requires_grad])
        return torch.cat([g.float().flatten() for g in grads])

    def through_the_step(leaves):  # Method.losses, as the training forward runs it, with these features
        method.features = lambda b: (leaves, {})
        return method.losses(batch)

    reference = feature_grads(lambda f: method.batch_losses({k: v.float() if v.is_floating_point() else v
                                                             for k, v in f.items()}), False)
    assert torch.equal(feature_grads(through_the_step, True), reference)
    in_bf16 = feature_grads(method.batch_losses, True)
    # here 0.7 % (clip: ITC), 2.3 % (irra), 3.5 % (ivt: CMPM), 14 % (pcc: + CMR); 9 % for SDM on 512-d features
    assert float((in_bf16 - reference).norm() / reference.norm()) > 0.004


def test_unknown_loss_and_method_are_config_errors(synth_tiny):
    with pytest.raises(ConfigError, match="irra has no loss 'cmr'; valid: sdm, itc, mlm, id"):
        _setup("irra", synth_tiny, ["method.losses=[{name: cmr, weight: 1}]"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        _setup("irra", synth_tiny, ["method.name=nope"])


def _irra_official_name(ours: str) -> str:
    """Our IRRA parameter name -> the official code's (model/build.py), for its name-based solver rule."""
    for a, b in (("cross.cross_attn.", "cross_attn."), ("cross.blocks.", "cross_modal_transformer.resblocks."),
                 ("cross.ln_text.", "ln_pre_t."), ("cross.ln_image.", "ln_pre_i."), ("cross.ln_post.", "ln_post."),
                 ("cross.mlm_head.", "mlm_head."), ("classifier.", "classifier.")):
        if ours.startswith(a):
            return b + ours[len(a):]
    return "base_model." + ours


def test_param_groups_follow_irras_solver(synth_tiny):
    """Every parameter's lr and weight decay equal IRRA's solver/build.py rule (written here from the official code)."""
    cfg, method, _ = _setup("irra", synth_tiny, ["optim.lr=1e-5", "optim.new_module_lr_mult=5", "optim.bias_lr_mult=2",
                                                 "optim.weight_decay=4e-5", "optim.bias_weight_decay=0",
                                                 "optim.decay_norms=true"])
    got = {id(p): (g["lr"], g["weight_decay"]) for g in method.param_groups(cfg.optim) for p in g["params"]}
    for name, p in method.named_parameters():
        key = _irra_official_name(name)
        lr, wd = 1e-5, 4e-5
        if "cross" in key:
            lr = 1e-5 * 5
        if "bias" in key:
            lr, wd = 1e-5 * 2, 0.0
        if "classifier" in key or "mlm_head" in key:
            lr = 1e-5 * 5
        assert got[id(p)] == (pytest.approx(lr), pytest.approx(wd)), name
    assert len(got) == len(list(method.parameters()))


def test_irra_mlm_head_on_the_masked_positions_gives_the_every_position_loss_and_gradients(synth_tiny):
    """IRRA's MLM head scores only the loader's ``mlm_rows`` positions, the masked ones first: the same loss and
    gradients as scoring every position (what the official code does; a batch without ``mlm_rows`` still does),
    with the exact count and with the loader's rounded-up bound."""
    from tbps.data.text import mlm_rows

    cfg, method, batch = _setup("irra", synth_tiny)
    labels = batch["mlm_labels"]
    count = int((labels != -100).sum())
    assert batch["mlm_rows"] == mlm_rows(labels) and batch["mlm_rows"] % 64 == 0 and count <= batch["mlm_rows"]
    assert mlm_rows(labels, multiple=1) == count and mlm_rows(labels, multiple=10**6) == labels.numel()
    assert mlm_rows(torch.full((2, 3), -100)) == 1

    def step(b):
        method.zero_grad()
        out = method(b)
        out["loss"].backward()
        return out["loss_mlm"].detach(), torch.cat([p.grad.flatten() for p in method.parameters()
                                                    if p.grad is not None])

    every = step({k: v for k, v in batch.items() if k != "mlm_rows"})
    for rows in (count, batch["mlm_rows"]):
        loss, grads = step({**batch, "mlm_rows": rows})
        assert torch.allclose(loss, every[0], rtol=1e-6, atol=1e-6), rows
        assert float((grads - every[1]).norm() / every[1].norm()) < 1e-6, rows
    loss, _ = step({**batch, "mlm_rows": count - 1})  # a bound below the count leaves a masked token out
    assert not torch.allclose(loss, every[0], rtol=1e-6, atol=1e-6)


def test_mlm_masking_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (400, 50))
    ids[:, 0], ids[:, 40] = 2, 3  # [CLS] ... [SEP]
    ids[:, 41:] = 0  # padding
    mask = (ids != 0).long()
    masked, labels = mask_tokens(ids, mask, special_ids=[0, 1, 2, 3, 4], ratio=0.15, mask_id=4, vocab_size=100,
                                 generator=g)
    selected = labels != -100
    real = mask.bool() & (ids > 4)
    assert not (selected & ~real).any()  # specials and padding never masked
    assert abs(selected.sum().item() / real.sum().item() - 0.15) < 0.01
    assert selected.any(dim=1).all()  # at least one per caption
    n = selected.sum().item()
    to_mask = (masked == 4) & selected
    unchanged = (masked == ids) & selected
    assert abs(to_mask.sum().item() / n - 0.8) < 0.03
    assert abs(unchanged.sum().item() / n - 0.1) < 0.03  # (random replacements may also hit the same token)
    assert torch.equal(labels[selected], ids[selected])
    assert (masked[selected & ~to_mask] > 4).all()  # random replacements are real tokens
    # a short caption with ratio ~0 still gets one masked token
    _, few = mask_tokens(ids[:3], mask[:3], [0, 1, 2, 3, 4], 1e-9, 4, 100, g)
    assert ((few != -100).sum(dim=1) == 1).all()


def test_clip_tokenizer_equals_open_clip_and_keeps_irra_mask_token():
    from open_clip.tokenizer import SimpleTokenizer

    tok = load_tokenizer("clip")
    reference = SimpleTokenizer()
    captions = ["A woman in a RED coat &amp; black boots.", "He wears \u201cwhite\u201d sneakers &lt;new&gt;",
                "The   man's   bag is  blue,  and his hat's gray", " ".join(["a tall person in jeans"] * 30), "!!"]
    enc = tok(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(enc["input_ids"], reference(captions, context_length=77))
    assert enc["input_ids"][3, -1] == 49407 and enc["attention_mask"][3].all()  # truncation keeps the end token
    assert torch.equal(enc["attention_mask"], (torch.arange(77) <= (enc["input_ids"] == 49407).int().argmax(1,
                                                                                  keepdim=True)).long())
    assert len(tok) == 49408 and tok.mask_token_id == 49405 and tok.pad_token_id == 0
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert 49405 not in tok.encode("jekyll and hyde")  # the id <|mask|> took is never produced from text
    assert TextSpec.from_tokenizer(tok, 77) == TextSpec(49408, 77, 0, 49405, 49406, 49407)


def test_mlm_masking_follows_irra_on_clip_ids():
    """IRRA's rules: 0 < id < 49405 eligible, replacements from 1..49404, nothing selected -> position 1 masked."""
    tok = load_tokenizer("clip")
    enc = tok(["a man in a black jacket and blue jeans carrying a bag !"] * 500, max_length=77)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(1)
    masked, labels = mask_tokens(ids, mask, tok.all_special_ids, 0.15, tok.mask_token_id, len(tok), g)
    selected = labels != -100
    eligible = (ids > 0) & (ids < 49405)
    assert not (selected & ~eligible).any()
    replaced = selected & (masked != ids) & (masked != 49405)
    assert replaced.any() and (masked[replaced] >= 1).all() and (masked[replaced] <= 49404).all()
    forced, forced_labels = mask_tokens(ids[:4], mask[:4], tok.all_special_ids, 1e-9, tok.mask_token_id, len(tok), g)
    assert (forced[:, 1] == 49405).all() and torch.equal(forced_labels[:, 1], ids[:4, 1])
    assert ((forced_labels != -100).sum(1) == 1).all()


def test_per_epoch_schedule_equals_irras_scheduler():
    """optim.schedule_per=epoch (the irra preset): the lr of epoch e (0-based) is IRRA's LRSchedulerWithWarmup at
    last_epoch = e (linear warm-up from 0.1 over 5 epochs, then cosine to 0 over the rest), constant within it."""
    import math

    from tbps.optim import build_scheduler

    cfg = load_config("irra")
    assert cfg.optim.schedule_per == "epoch" and cfg.train.epochs == 60
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=cfg.optim.lr)
    spe = 3
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=spe, epochs=60)

    def official(e):  # solver/lr_scheduler.py, mode cosine, warmup linear, target_lr 0
        if e < 5:
            alpha = e / 5
            return 1e-5 * (0.1 * (1 - alpha) + alpha)
        return 1e-5 * 0.5 * (1 + math.cos(math.pi * (e - 5) / (60 - 5)))
    for e in range(60):
        for _ in range(spe):
            assert opt.param_groups[0]["lr"] == pytest.approx(official(e), rel=1e-9, abs=1e-15), e
            opt.step()
            sched.step()


def test_ivt_schedule_equals_timm_cosine_scheduler_as_ivt_runs_it():
    """optim.scheduler=timm_cosine (the ivt preset): per group, the lr of epoch e (0-based) is timm's
    CosineLRScheduler configured as IVT's solver/scheduler_factory.py and stepped as its loop does
    (scheduler.step(epoch) with epoch = 1, 2, ...): warm-up from 0.01 x lr, floor 0.002 x lr, absolute for every group."""
    from timm.scheduler import CosineLRScheduler

    from tbps.optim import build_scheduler

    cfg = load_config("ivt")
    assert (cfg.optim.scheduler, cfg.optim.schedule_per, cfg.train.epochs) == ("timm_cosine", "epoch", 120)
    base = cfg.optim.lr

    def groups():
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": base},
                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2 * base}]  # biases: 2 x lr
    ours = torch.optim.SGD(groups(), lr=base, momentum=0.9)
    theirs = torch.optim.SGD(groups(), lr=base, momentum=0.9)
    spe = 2
    sched = build_scheduler(ours, cfg.optim, steps_per_epoch=spe, epochs=120)
    ref = CosineLRScheduler(theirs, t_initial=120, lr_min=0.002 * base, cycle_mul=1.0, cycle_decay=0.1,
                            warmup_lr_init=0.01 * base, warmup_t=5, cycle_limit=1, t_in_epochs=True)
    for e in range(120):
        ref.step(e + 1)
        for _ in range(spe):
            for g_ours, g_ref in zip(ours.param_groups, theirs.param_groups):
                assert g_ours["lr"] == pytest.approx(g_ref["lr"], rel=1e-9, abs=1e-15), e
            ours.step()
            sched.step()
    assert ours.param_groups[1]["lr"] == pytest.approx(0.002 * base)  # the last epoch sits on the floor
    method_cfg = load_config("ivt_tiny")
    assert method_cfg.optim.scheduler == "cosine"  # the CPU preset keeps the plain per-iteration schedule


def test_ivt_param_groups_follow_the_official_solver():
    """solver/make_optimizer.py make_optimizer_triplet: '"bias" in name' -> lr x BIAS_LR_FACTOR (2) and
    WEIGHT_DECAY_BIAS (1e-4); every other parameter, norms and embeddings included, lr and WEIGHT_DECAY (1e-4)."""
    cfg = load_config("ivt", ["model.shared_width=32", "model.shared_layers=2", "model.shared_heads=2",
                              "data.image_size=[48, 16]", "data.text_length=16"])
    method = build_method(cfg, TextSpec(vocab_size=50, length=16, pad_id=0, mask_id=1, bos_id=2, eos_id=3), 10)
    opt = build_optimizer(method, cfg.optim)
    names = {id(p): n for n, p in method.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            lr, wd = (0.005 * 2, 1e-4) if "bias" in name else (0.005, 1e-4)
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(lr), pytest.approx(wd)), name
            seen += 1
    assert seen == len(names) and isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_a_fixed_temperature_is_the_configured_one_and_only_a_learnable_scale_is_capped(synth_tiny):
    """s = 1 / tau exactly for a fixed temperature (IRRA's): tau = 0.005 scores SDM at s = 200, where the scale used
    to be capped at 100 whatever the config said; a learnable scale keeps CLIP's cap, and a learnable temperature
    that would start at the cap is a config error."""
    import math

    from tbps import losses as L

    cfg, method, batch = _setup("irra", synth_tiny, ["method.temperature=0.005", "method.losses=[{name: sdm}]"])
    assert float(method.logit_scale) == pytest.approx(200.0)
    feats, _ = method.features(batch)
    loss = method.fp32_batch_losses(feats)["sdm"]
    assert torch.allclose(loss, L.sdm_loss(feats["v"], feats["t"], feats["pids"], 200.0), atol=1e-6)
    assert not torch.allclose(loss, L.sdm_loss(feats["v"], feats["t"], feats["pids"], 100.0), atol=1e-3)

    _, method, _ = _setup("clip", synth_tiny, ["method.temperature=0.01", "method.learnable_temperature=true"])
    with torch.no_grad():
        method.log_scale.fill_(math.log(500.0))  # learned past the cap
    assert float(method.logit_scale.detach()) == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="a learnable logit scale is capped at 100 as CLIP's"):
        load_config("clip_tiny", ["method.temperature=0.005", "method.learnable_temperature=true"])
