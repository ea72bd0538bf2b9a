"""train.grad_cache (tbps/gradcache.py): one step over N micro-batches has the gradients of one step on the N-times
batch -- contrastive losses over the whole (and, gathering, global) batch, per-sample losses per micro-batch --
while plain gradient accumulation does not."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks

MICRO, N = 4, 4
SETUPS = {  # method -> loss terms and overrides (randomness off so a reference forward is exact)
    "clip": ("[{name: itc, weight: 1}, {name: sdm, weight: 0.5}, {name: id, weight: 0.3}]",
             ["method.learnable_temperature=true"]),
    "irra": ("[{name: sdm, weight: 1}, {name: mlm, weight: 1}, {name: id, weight: 1}]", ["method.mask_ratio=0.3"]),
    "ivt": ("[{name: cmpm, weight: 1}, {name: id, weight: 0.5}]", ["method.bmm_max_drop=0.0"]),
    "pcc": ("[{name: sdm, weight: 1}, {name: cmr, weight: 1}, {name: id, weight: 1}]", []),
}


def _setup(name, url, rank=0, world_size=1, extra=()):
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.methods import TextSpec, build_method

    losses, overrides = SETUPS[name]
    cfg = load_config(f"{name}_tiny", [f"data.url={url}", "data.loader_workers=0", f"data.batch_size={MICRO}",
                                       f"method.losses={losses}", "method.gather=true", "data.sampling=images",
                                       *overrides, *extra])
    tok = load_tokenizer(os.path.join(url, "tokenizer"))
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40).eval()  # no dropout (BERT's)
    batches = list(build_train_loader(cfg.data, tok, method.data_needs(), rank, world_size))[:N]
    assert len(batches) == N
    return method, batches


def _concat(batches: list[dict]) -> dict:
    out = {}
    for k, v in batches[0].items():
        if torch.is_tensor(v):
            out[k] = torch.cat([b[k] for b in batches])
        elif isinstance(v, list):
            out[k] = [x for b in batches for x in b[k]]
        elif k == "mlm_rows":  # a bound on the masked tokens: of all of them
            out[k] = sum(b[k] for b in batches)
        else:  # mla_length: the longest text of all
            out[k] = max(b[k] for b in batches)
    return out


def _grads(method) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in method.parameters() if p.requires_grad])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of gradient vector a against b (float32 sums in another order differ around 1e-6)."""
    return float((a - b).norm() / b.norm())


def _three_ways(method, batches):
    """Gradients and loss of: the N-times batch (reference), grad_cache over the micro-batches, plain accumulation."""
    from tbps.gradcache import grad_cache_step

    method.zero_grad()
    feats, _ = method.features(_concat(batches))
    locals_ = [method.features(b)[1] for b in batches]
    loss = method.weighted(method.batch_losses(feats)) + sum(method.weighted(x) for x in locals_) / len(batches)
    loss.backward()
    reference = (_grads(method), loss.detach())
    method.zero_grad()
    out = grad_cache_step(method, batches)
    cached = (_grads(method), out["loss"])
    method.zero_grad()
    for b in batches:
        (method(b)["loss"] / len(batches)).backward()
    plain = _grads(method)
    return reference, cached, plain


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_grad_cache_equals_the_large_batch_step(name, synth_tiny):
    method, batches = _setup(name, synth_tiny)
    (ref, ref_loss), (gc, gc_loss), plain = _three_ways(method, batches)
    assert torch.allclose(gc_loss, ref_loss, atol=1e-5)
    assert _rel(gc, ref) < 1e-5
    # plain accumulation sees one micro-batch's negatives: its gradients are another function (50-150 % off here)
    assert _rel(plain, ref) > 0.1


def test_grad_cache_replays_dropout_drop_path_and_bmm(synth_tiny):
    """With every random layer on, one micro-batch through grad_cache gives the plain step's gradients: the second
    forward replays the first's random state (otherwise its features would not match the cached gradients)."""
    from tbps.gradcache import grad_cache_step

    method, batches = _setup("ivt", synth_tiny, extra=["model.drop_path=0.2", "model.text_dropout=0.2",
                                                       "method.bmm_max_drop=0.3"])
    method.train()
    torch.manual_seed(7)
    method.zero_grad()
    method(batches[0])["loss"].backward()
    plain = _grads(method)
    torch.manual_seed(7)
    method.zero_grad()
    grad_cache_step(method, batches[:1])
    assert _rel(_grads(method), plain) < 1e-5


def _rank_main(rank, url, out_dir):
    results = {}
    for name in ("irra", "ivt"):
        method, batches = _setup(name, url, rank, 2)
        (ref, ref_loss), (gc, gc_loss), plain = _three_ways(method, batches)
        for g in (ref, gc, plain):
            dist.all_reduce(g)
        results[name] = {"ref": ref, "gc": gc, "plain": plain, "ref_loss": ref_loss, "gc_loss": gc_loss}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "gc.pt"))


def test_grad_cache_with_negatives_gathered_from_two_ranks(synth_tiny, tmp_path):
    """2 ranks x 4 micro-batches, method.gather: the summed gradients equal those of the 2 x 4-times global batch
    (SDM with IRRA's MLM and ID per micro-batch; IVT's CMPM with ID)."""
    run_ranks(_rank_main, 2, synth_tiny, str(tmp_path))
    results = torch.load(tmp_path / "gc.pt")
    for name, r in results.items():
        assert torch.allclose(r["gc_loss"], r["ref_loss"], atol=1e-5), name
        assert _rel(r["gc"], r["ref"]) < 1e-5, name
        assert _rel(r["plain"], r["ref"]) > 0.1, name


def _deepspeed_main(rank, url, out_dir):
    """grad_cache through the DeepSpeed engine as the worker runs it (engine forward, backward without the 1/accum
    scale, step per micro-batch): one SGD step (lr 1) moves the weights by exactly the reference gradient."""
    import deepspeed

    from tbps.config import load_config
    from tbps.engine.loop import deepspeed_config
    from tbps.gradcache import grad_cache_step

    results = {}
    for stage in (0, 2):
        method, batches = _setup("irra", url)
        (ref, _), _, _ = _three_ways(method, batches)
        before = torch.cat([p.detach().flatten().clone() for p in method.parameters() if p.requires_grad])
        method.zero_grad()
        cfg = load_config("irra_tiny", [f"data.batch_size={MICRO}", f"train.grad_accum={N}", "optim.grad_clip=0",
                                        f"train.zero_stage={stage}"])
        engine, *_ = deepspeed.initialize(model=method, optimizer=torch.optim.SGD(method.parameters(), lr=1.0),
                                          config=deepspeed_config(cfg))
        assert engine.gradient_clipping() == 0  # DeepSpeed's default would clip at 1.0

        def backward(surrogate, _):
            engine.backward(surrogate, scale_wrt_gas=False)
            engine.step()

        grad_cache_step(engine.module, batches, forward=engine, backward=backward)
        after = torch.cat([p.detach().flatten() for p in method.parameters() if p.requires_grad])
        results[stage] = {"step": before - after, "ref": ref, "global_steps": engine.global_steps}
    # train.precision=bf16-autocast: fp32 weights, the forward under torch.autocast (here on CPU)
    method, batches = _setup("irra", url)
    cfg = load_config("irra_tiny", [f"data.batch_size={MICRO}", "train.precision=bf16-autocast"])
    engine, *_ = deepspeed.initialize(model=method, optimizer=torch.optim.SGD(method.parameters(), lr=0.1),
                                      config=deepspeed_config(cfg))
    feats, _ = engine(batches[0], stage="features")
    out = engine(batches[0])
    engine.backward(out["loss"])
    engine.step()
    results["autocast"] = {"feature_dtype": str(feats["v"].dtype), "loss": float(out["loss"]),
                           "weight_dtypes": sorted({str(p.dtype) for p in method.parameters()})}
    torch.save(results, os.path.join(out_dir, "ds.pt"))


def test_grad_cache_through_the_deepspeed_engine(synth_tiny, tmp_path):
    """grad_cache through the DeepSpeed engine as the worker drives it (ZeRO-0 and ZeRO-2): one optimizer step for the
    N micro-batches, moving the weights by exactly the large-batch gradient; and train.precision=bf16-autocast through
    the same engine: fp32 weights, a bf16 forward."""
    run_ranks(_deepspeed_main, 1, synth_tiny, str(tmp_path))
    results = torch.load(tmp_path / "ds.pt")
    autocast = results.pop("autocast")
    assert autocast["feature_dtype"] == "torch.bfloat16" and autocast["weight_dtypes"] == ["torch.float32"]
    assert autocast["loss"] == autocast["loss"]  # finite
    for stage, r in results.items():
        assert r["global_steps"] == 1, stage  # one optimizer step for the N micro-batches
        assert _rel(r["step"], r["ref"]) < 1e-5, (stage, _rel(r["step"], r["ref"]))


# the official codes' precisions (the irra/clip and ivt presets' defaults) -> loss terms, on IRRA's tiny model (its
# features come out of a projection, in fp16 under autocast; IVT's out of a LayerNorm, in fp32). IRRA's MLM is left
# out: grad_cache averages it per micro-batch, one step of the N-times batch over all masked tokens.
FP16 = {"fp16-weights": "[{name: sdm, weight: 1}, {name: id, weight: 1}]",
        # 1e-4 of the usual weights: the feature gradients then lie below fp16's smallest normal number (6e-5), as a
        # large batch's do (the batch loss spreads over more rows); torch's AMP scales the loss before any gradient is
        # rounded to fp16, and grad_cache must too
        "fp16-autocast": "[{name: sdm, weight: 1e-4}, {name: id, weight: 1e-4}]"}


def _fp16_main(rank, url, out_dir):
    """The three ways of _three_ways through the worker's step (``train_step``: the DeepSpeed engine, the precision's
    autocast and, for fp16-autocast, DeepSpeed's ZeRO-0 GradScaler), the gradients read by the optimizer as it steps
    (after the scaler unscales them)."""
    from tbps.config import load_config
    from tbps.engine.loop import forward_autocast, initialize_engine, train_step
    from tbps.methods.base import fp16_weights

    results = {}
    for precision, losses in FP16.items():
        for way, accum, grad_cache in (("reference", 1, False), ("grad_cache", N, True), ("plain", N, False)):
            method, batches = _setup("irra", url, extra=[f"method.losses={losses}"])
            if precision == "fp16-weights":
                fp16_weights(method)
            cfg = load_config("irra_tiny", [f"data.batch_size={MICRO}", f"train.grad_accum={accum}",
                                            f"train.grad_cache={grad_cache}", "optim.grad_clip=0",
                                            f"train.precision={precision}"])
            seen, dtypes = [], set()

            def record(*_):
                seen.append(_grads(method).float())
                dtypes.update(str(p.grad.dtype) for p in method.parameters() if p.grad is not None)

            opt = torch.optim.SGD(method.parameters(), lr=0.0)
            opt.register_step_pre_hook(record)
            engine = initialize_engine(cfg, method, opt)[0]
            autocast = forward_autocast(precision)
            if way == "reference":
                out = train_step(engine, [_concat(batches)], False, autocast=autocast)
            elif way == "grad_cache":
                out = train_step(engine, batches, True, autocast=autocast)
                with torch.autocast("cpu", dtype=torch.float16):
                    feats, _ = engine(batches[0], stage="features")
                results[precision, "dtypes"] = (str(feats[next(iter(feats))].dtype), sorted(dtypes))
            else:
                for b in batches:
                    out = train_step(engine, [b], False, autocast=autocast)
            results[precision, way] = {"grads": seen, "loss": out["loss"]}
    torch.save(results, os.path.join(out_dir, "fp16.pt"))


def test_grad_cache_in_the_fp16_precisions(synth_tiny, tmp_path):
    """train.grad_cache under the official codes' precisions, through the worker's step: IRRA's fp16 weights (the
    forward under fp16 autocast in both passes, the fp16 gradients accumulated over micro-batches) and IVT's torch AMP
    (every micro-batch's backward scaled by DeepSpeed's ZeRO-0 GradScaler, unscaled once before the step). One
    optimizer step whose gradients are the N-times batch's to fp16's rounding; plain accumulation is another
    function. Under AMP grad_cache's second pass multiplies the features by their cached gradients in float32: in
    the features' fp16 the loss scale (65,536, fp16's own overflow) made the scaler skip this step; with the cached
    gradients rounded to fp16 first, these small ones (FP16) came out 3.6e-3 off instead of 3e-4."""
    from ranks import run_ranks

    run_ranks(_fp16_main, 1, synth_tiny, str(tmp_path))
    res = torch.load(tmp_path / "fp16.pt")
    for precision in FP16:
        ref, gc, plain = (res[precision, way] for way in ("reference", "grad_cache", "plain"))
        assert len(ref["grads"]) == len(gc["grads"]) == len(plain["grads"]) == 1, precision  # one optimizer step
        err = _rel(gc["grads"][0], ref["grads"][0])
        assert bool(torch.isfinite(gc["grads"][0]).all()), precision
        assert err < 2e-3, (precision, err)  # 3e-4 to 5e-4 here
        assert _rel(plain["grads"][0], ref["grads"][0]) > 0.1, precision
        torch.testing.assert_close(gc["loss"], ref["loss"], rtol=2e-3, atol=1e-6, msg=precision)
    weights = res["fp16-weights", "dtypes"]
    assert weights == ("torch.float16", ["torch.float16", "torch.float32"]), weights
    assert res["fp16-autocast", "dtypes"] == ("torch.float16", ["torch.float32"])
