"""Step options of #15 on CPU: activation checkpointing (same gradients, less memory) and torch.compile (same loss
and gradients as eager)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# compile tests: one block per stack (every op kind a deeper stack has, in fewer kernels for inductor to build on a
# cold cache: the IRRA test took 73 s cold at the tiny preset's depth, the PCC one 93 s)
SHALLOW = ["model.image_overrides={patch_size: 8, embed_dim: 128, depth: 1, num_heads: 4}", "model.text_layers=1"]


def _method(name: str, url: str, batch_size: int, extra=()):
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.methods import TextSpec, build_method

    cfg = load_config(f"{name}_tiny", [f"data.url={url}", "data.loader_workers=0", f"data.batch_size={batch_size}",
                                       "data.sampling=images", *extra])
    tok = load_tokenizer(os.path.join(url, "tokenizer"))
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40)
    return method, next(iter(build_train_loader(cfg.data, tok, method.data_needs())))


def _step(method, batch, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    method.zero_grad()
    loss = method(batch)["loss"]
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["clip", "irra", "ivt", "pcc"])
def test_activation_checkpointing_keeps_gradients_and_covers_every_block_stack(name, synth_tiny):
    """Every tower and block stack is switched (timm, transformers, ours), and the gradients are the same with
    every random layer on (the recomputation replays dropout, drop path and BMM)."""
    extra = ["model.drop_path=0.1", "model.text_dropout=0.1"] if name == "ivt" else ["model.drop_path=0.1"]
    method, batch = _method(name, synth_tiny, 8, extra)
    method.train()
    loss0, g0 = _step(method, batch)
    switched = method.set_activation_checkpointing(True)
    expected = {"clip": {"image_tower.vit", "text_tower.model"},
                "irra": {"image_tower.vit", "text_tower.model", "cross"},
                "ivt": {"tower"}, "pcc": {"image_tower.vit", "text_tower.model", "decoder"}}[name]
    assert set(switched) == expected
    loss1, g1 = _step(method, batch)
    assert torch.allclose(loss0, loss1) and float((g1 - g0).norm() / g0.norm()) < 1e-6


def _held_for_backward(method, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward (its activation memory),
    counted with saved-tensor hooks: non-reentrant checkpointing keeps a block's activations out of them (it saves
    only the block's inputs and recomputes the rest in the backward)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = method(batch)["loss"]
    loss.backward()
    method.zero_grad()
    return total


@pytest.mark.parametrize("name", ["clip", "irra", "ivt", "pcc"])
def test_activation_checkpointing_lowers_activation_memory(name, synth_tiny):
    """The activation memory of a training step (tensors held for the backward) falls several-fold with
    checkpointing (deterministic, unlike peak RSS, which the allocator's caching blurs)."""
    method, batch = _method(name, synth_tiny, 16)
    method.train()
    plain = _held_for_backward(method, batch)
    method.set_activation_checkpointing(True)
    checkpointed = _held_for_backward(method, batch)
    assert checkpointed < plain / 3, (checkpointed, plain)


@pytest.mark.parametrize("name", ["irra"])  # IRRA = the two-tower base CLIP is, plus its cross-modal encoder
def test_compiled_step_equals_the_eager_step(name, synth_tiny):
    """train.compile (Method.compile_step, Method.compile_encoders): the compiled step's loss and gradients, and the
    compiled encoders' outputs, equal eager ones (CPU inductor; dropout off: compiled kernels draw their own masks)."""
    method, batch = _method(name, synth_tiny, 8, SHALLOW)
    method.eval()
    loss0, g0 = _step(method, batch)
    with torch.no_grad():
        v0, t0 = method.encode_image(batch["images"]), method.encode_text(batch["text_ids"], batch["text_mask"])
    # compiled as the loop compiles under grad_cache (random ops through eager's kernels; this eval-mode step has
    # none, so the graph is the default one's): one compile serves the eager comparison and grad_cache
    method.compile_step(replay_random=True)
    method.compile_encoders()
    loss1, g1 = _step(method, batch)
    assert torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-5)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-4
    with torch.no_grad():
        assert torch.allclose(method.encode_image(batch["images"]), v0, atol=1e-4)
        assert torch.allclose(method.encode_text(batch["text_ids"], batch["text_mask"]), t0, atol=1e-4)
    from tbps.gradcache import grad_cache_step

    method.zero_grad()  # grad_cache runs the compiled features in both of its passes
    out = grad_cache_step(method, [batch])
    g2 = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    assert torch.allclose(out["loss"], loss0, rtol=1e-5, atol=1e-5)
    assert float((g2 - g0).norm() / g0.norm()) < 1e-4
    del method.features  # the class's own: compiled without replay_random (lazily: nothing compiles here) ...
    method.compile_step()
    with pytest.raises(ValueError, match="replay_random"):  # ... grad_cache refuses it (see the next test)
        grad_cache_step(method, [batch])


def test_compiled_grad_cache_replays_dropout_and_drop_path(synth_tiny):
    """train.compile with train.grad_cache and random layers on (PCC: drop path in the image tower, BERT's dropout):
    grad_cache's pass without autograd and its pass with autograd are two compiled graphs, and under one recorded
    random state they must draw the same masks, or the cached feature gradients belong to other features. With
    ``compile_step(replay_random=True)`` (what the training loop passes with grad_cache) the gradients are the
    compiled step's on the same batch; with inductor's own random lowering they were 22 % off at this test's size (78 %
    at the preset's; both checked by hand by compiling without replay_random and skipping grad_cache's refusal)."""
    from tbps.gradcache import grad_cache_step

    # smaller than the preset (a cold compile 68 s instead of 93 s) but still showing the fault: two image blocks
    # (drop path rises linearly from 0 over the blocks: the second draws masks) and BERT's two dropout layers; with
    # one text layer inductor's own draws happened to agree (1e-7), here they are 22 % off (78 % at the preset's size)
    method, batch = _method("pcc", synth_tiny, 4, ["model.drop_path=0.2", "model.image_overrides={patch_size: 8, "
                                                   "embed_dim: 128, depth: 2, num_heads: 4}", "method.decoder_layers=1"])
    method.train()
    method.compile_step(replay_random=True)
    loss0, g0 = _step(method, batch, seed=7)
    torch.manual_seed(7)
    method.zero_grad()
    out = grad_cache_step(method, [batch])
    g1 = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    assert torch.allclose(out["loss"], loss0, rtol=1e-5, atol=1e-5)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    loss2, _ = _step(method, batch, seed=8)  # the layers are random: another state draws other masks
    assert not torch.allclose(loss2, loss0)


def _fp16_compiled_main(rank, url, out_dir):
    """IRRA's shallow model through the worker's step (``train_step``: DeepSpeed's engine, the precision's autocast,
    fp16-autocast's ZeRO-0 GradScaler) in each fp16 precision: eager, then compiled as the loop compiles under
    grad_cache; the gradients read by the optimizer as it steps (unscaled), and the features' dtype."""
    from tbps.config import load_config
    from tbps.engine.loop import forward_autocast, initialize_engine, train_step
    from tbps.methods.base import fp16_weights

    # small loss weights: the tiny model's fp16 activation gradients overflow at the scaler's first scale otherwise
    losses = "[{name: sdm, weight: 1e-3}, {name: mlm, weight: 1e-3}, {name: id, weight: 1e-3}]"
    results = {}
    for precision in ("fp16-weights", "fp16-autocast"):
        for way in ("eager", "compiled"):
            method, batch = _method("irra", url, 8, SHALLOW + [f"method.losses={losses}"])
            method.eval()
            if precision == "fp16-weights":
                fp16_weights(method)
            cfg = load_config("irra_tiny", ["data.batch_size=8", "optim.grad_clip=0", f"train.precision={precision}"])
            seen = []
            opt = torch.optim.SGD(method.parameters(), lr=0.0)
            opt.register_step_pre_hook(lambda *_: seen.append(torch.cat([
                p.grad.float().flatten() for p in method.parameters() if p.grad is not None])))
            engine = initialize_engine(cfg, method, opt)[0]
            if way == "compiled":
                method.compile_step(replay_random=True)
            autocast = forward_autocast(precision)
            loss = train_step(engine, [batch], False, autocast=autocast)["loss"]
            cached = train_step(engine, [batch], True, autocast=autocast)["loss"]  # grad_cache, one micro-batch
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                dtype = str(engine(batch, stage="features")[0]["v"].dtype)
            results[precision, way] = {"grads": seen, "loss": loss, "cached": cached, "dtype": dtype}
    torch.save(results, os.path.join(out_dir, "compiled16.pt"))


def test_compiled_step_in_the_fp16_precisions(synth_tiny, tmp_path):
    """train.compile under the official codes' precisions (the irra/clip and ivt presets' defaults), as the worker
    runs it: IRRA's fp16 weights and IVT's torch AMP. The compiled step runs in fp16 (features fp16), steps once, and
    its gradients are the eager step's to fp16's rounding (here 5e-3 and 1.6e-3 apart, where fp16 and fp32 steps are
    7e-3 and 3.6e-3 apart); grad_cache over the compiled features gives the compiled step's own gradients."""
    from ranks import run_ranks

    run_ranks(_fp16_compiled_main, 1, synth_tiny, str(tmp_path))
    res = torch.load(tmp_path / "compiled16.pt")
    for precision in ("fp16-weights", "fp16-autocast"):
        eager, compiled = res[precision, "eager"], res[precision, "compiled"]
        assert len(eager["grads"]) == len(compiled["grads"]) == 2, precision  # no step skipped
        assert eager["dtype"] == compiled["dtype"] == "torch.float16", precision
        g0, g1, g2 = eager["grads"][0], compiled["grads"][0], compiled["grads"][1]
        assert bool(torch.isfinite(g1).all()), precision
        assert float((g1 - g0).norm() / g0.norm()) < 1e-2, precision
        assert float((g2 - g1).norm() / g1.norm()) < 1e-5, precision
        torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=2e-3, atol=1e-6, msg=precision)
        torch.testing.assert_close(compiled["cached"], compiled["loss"], rtol=1e-5, atol=1e-7, msg=precision)


@pytest.mark.parametrize("name", ["clip", "irra", "ivt", "pcc"])
def test_every_attention_layer_runs_through_sdpa(name, synth_tiny, monkeypatch):
    """Every attention of a training forward goes through torch's scaled_dot_product_attention (timm's fused
    attention, transformers' "sdpa", nn.MultiheadAttention without weights): one call per attention layer and
    forward, counted by a pass-through spy on torch.nn.functional's function (which all three call)."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    method, batch = _method(name, synth_tiny, 4)
    from tbps.config import load_config

    cfg = load_config(f"{name}_tiny")  # the config _method built it from
    method(batch)["loss"].backward()
    if name == "ivt":  # one shared stack: the images' forward and the texts' forward
        expected = 2 * cfg.model.shared_layers
    else:
        expected = int(cfg.model.image_overrides.get("depth", 12)) + cfg.model.text_layers
        if name == "irra":  # the masked caption through the text tower again, the cross-attention and its blocks
            expected += cfg.model.text_layers + 1 + cfg.method.cross_layers
        if name == "pcc":  # self- and cross-attention per decoder layer, for each modality
            expected += 2 * 2 * cfg.method.decoder_layers
    assert len(calls) == expected, (len(calls), expected)


def test_methods_import_and_train_without_ray_deepspeed_or_webdataset():
    """The GPU machine has torch, timm and transformers only: methods, models, losses and grad_cache import and run
    bench/train_step.py's synthetic-batch step there (IRRA's paper preset, shrunk to run in seconds)."""
    script = """
import sys
for name in ("webdataset", "ray", "deepspeed"):
    sys.modules[name] = None  # any import of them fails
sys.path.insert(0, "bench")
import torch
from train_step import count_flops, profile, setup, step_fn
small = ["model.image_overrides={patch_size: 16, embed_dim: 64, depth: 1, num_heads: 2}", "model.text_width=64",
         "model.text_layers=1", "model.text_heads=2", "model.embed_dim=64", "method.cross_layers=1",
         "method.cross_heads=2"]
cfg, method, batch, opt = setup("irra", 4, torch.device("cpu"), small)
flops = count_flops(step_fn(method, batch, opt, torch.device("cpu"), False))
step_fn(method, batch, opt, torch.device("cpu"), False, grad_cache_micro=2)()
assert sorted(batch) == ["images", "mlm_ids", "mlm_labels", "mlm_rows", "pids", "text_ids", "text_mask", "train_ids"]
prof = profile("irra", 4, torch.device("cpu"), False, 1, top=3, overrides=small)
assert prof["operators_per_step"] > 0 and prof["host_syncs_per_step"] == 0, prof  # counted by tbps.syncs
print("ok", flops > 0)
"""
    root = os.path.dirname(HERE)
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", "True"]
