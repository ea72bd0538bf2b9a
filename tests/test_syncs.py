"""#15: no host synchronisation in the training step. A CUDA step that reads a value back (``.item()``, ``bool(t)``),
computes a data-dependent shape (``nonzero``, boolean-mask indexing) or copies from pageable host memory makes the host
wait for the device; ``tbps.syncs.HostSyncAudit`` finds each of them on CPU, where CI runs."""

from __future__ import annotations

import os

import pytest
import torch

from ranks import run_ranks
from tbps.syncs import HostSyncAudit

HERE = os.path.relpath(os.path.abspath(__file__), os.getcwd())


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        float(g.sum())  # a value read in the backward
        return g * 2


def test_audit_finds_each_kind_of_host_synchronisation_with_its_line():
    x = torch.randn(6, requires_grad=True)
    with HostSyncAudit() as audit:
        _SyncInBackward.apply(x).sum().backward()
        positive = x.detach() > 0
        x.detach()[positive]  # boolean-mask index
        if positive.any():  # bool() of a tensor
            pass
        torch.tensor([1.0], device=x.device)  # host data copied to the step's device
        x.detach().tolist()
        positive.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))  # output size from the data
        (x * 2).sum()  # queued work, nothing read: not a synchronisation
    kinds = [(s.kind, s.op) for s in audit.syncs]
    assert kinds == [("value read", "_local_scalar_dense"), ("data-dependent shape", "boolean-mask index"),
                     ("value read", "_local_scalar_dense"), ("host-to-device copy", "torch.tensor(..., device=)"),
                     ("value read", "tolist"), ("data-dependent shape", "nonzero"),
                     ("data-dependent shape", "repeat_interleave")], audit.report()
    assert audit.syncs[0].where.startswith(f"{HERE}:") and audit.syncs[0].where.endswith("(backward)")
    assert "7 host synchronisation(s)" in audit.report()


def test_audit_leaves_out_named_host_side_work_and_host_tensors_of_a_cuda_step():
    x = torch.randn(4)

    def draw_on_host():
        return int(torch.randint(0, 4, ()))

    with HostSyncAudit(host_side=(f"{HERE}:draw_on_host",)) as audit:
        draw_on_host()
        float(x.sum())
    assert [s.where.split(" ")[-1] for s in audit.syncs] == ["(test_audit_leaves_out_named_host_side_work_and_host_"
                                                              "tensors_of_a_cuda_step)"]
    with HostSyncAudit("cuda") as audit:  # a CUDA step's host tensors are no synchronisation (nothing runs on CUDA)
        float(x.sum())
        x.nonzero()
        torch.tensor([1.0], device="cpu")
    assert audit.syncs == [], audit.report()
    step, other = torch.tensor(3.0), torch.tensor(4.0)  # named host tensors (a non-capturable optimizer's step count)
    with HostSyncAudit(host_tensors=[step]) as audit:
        step.item()
        float(step)
        other.item()
    assert [s.kind for s in audit.syncs] == ["value read"], audit.report()  # other's read alone


def _audit_steps(rank, url, out_path):
    """Each method's training step as the worker runs it (``tbps.engine.loop.train_step`` on the engine
    ``initialize_engine`` builds, gradient clipping on), audited after two warm-up steps: at GPU's default precision
    (bf16 autocast), in fp32, with grad_cache, and -- for contrast -- in DeepSpeed's bf16 mode."""
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.engine.loop import forward_autocast, initialize_engine, resolve_precision, tbps_clip_norm, train_step
    from tbps.methods import TextSpec, build_method
    from tbps.methods.base import fp16_weights
    from tbps.optim import build_optimizer, build_scheduler

    tok = load_tokenizer(os.path.join(url, "tokenizer"))
    results = {}
    cases = [(name, precision, 1) for name in ("clip", "irra", "ivt", "pcc") for precision in ("auto", "fp32")]
    cases += [("irra", "auto", 2), ("ivt", "auto", 2), ("irra", "bf16", 1)]
    # the official codes' precisions, the presets' defaults (IRRA's fp16 weights, IVT's torch AMP)
    cases += [("irra", "fp16-weights", 1), ("irra", "fp16-weights", 2), ("ivt", "fp16-autocast", 1),
              ("ivt", "fp16-autocast", 2)]
    for name, precision, accum in cases:
        cfg = load_config(f"{name}_tiny", [f"data.url={url}", "data.loader_workers=0", "data.batch_size=4",
                                           "optim.grad_clip=1.0", f"train.precision={precision}", "optim.eps=1e-3",
                                           f"train.grad_accum={accum}", f"train.grad_cache={accum > 1}"])
        cfg.train.use_gpu = True  # what auto resolves to on a GPU worker (the step itself runs on this CPU)
        torch.manual_seed(0)
        method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40)
        loader = iter(build_train_loader(cfg.data, tok, method.data_needs()))
        group = [next(loader) for _ in range(accum)]
        if resolve_precision(cfg) == "bf16":  # the worker casts batches to the weights' precision
            group = [{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in b.items()} for b in group]
        if precision == "fp16-weights":  # as the worker builds it: converted, torch's default Adam (IRRA's)
            fp16_weights(method)
        # as on a GPU: step counts stay on the device
        optimizer = build_optimizer(method, cfg.optim, fused=precision != "fp16-weights")
        scheduler = build_scheduler(optimizer, cfg.optim, 100, cfg.train.epochs)
        engine, *_ = initialize_engine(cfg, method, optimizer, scheduler)
        clip, autocast = tbps_clip_norm(cfg), forward_autocast(resolve_precision(cfg))
        for _ in range(2):
            train_step(engine, group, accum > 1, clip, autocast=autocast)
        # torch's non-fused Adam (fp16-weights: IRRA's) keeps its step counts on the host, even on a GPU
        steps = [] if precision != "fp16-weights" else [s["step"] for s in optimizer.state.values()]
        with HostSyncAudit(host_side=("tbps/models/shared.py:bmm_keep",),  # BMM draws on the host
                           host_tensors=steps) as audit:
            train_step(engine, group, accum > 1, clip, autocast=autocast)
        results[(name, precision, accum)] = {"resolved": resolve_precision(cfg), "clip": clip,
                                             "syncs": [str(s) for s in audit.syncs],
                                             "params": sum(1 for p in method.parameters() if p.requires_grad)}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def audited_steps(synth_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs") / "audit.pt"
    run_ranks(_audit_steps, 1, synth_tiny, str(out))  # DeepSpeed's engine wants a process group
    return torch.load(out)


def test_training_step_makes_no_host_synchronisation(audited_steps):
    """Every method, fp32 and GPU's default precision (bf16 autocast), with gradient clipping (tbps's own at ZeRO-0)
    and with grad_cache: the step asks the device for nothing, so the host can queue the next step's kernels while
    this one runs. (Loss values are read every train.log_every steps, outside the step.) So do the official codes'
    precisions: IRRA's fp16 weights (torch's unfused Adam, its step counts on the host) and IVT's torch AMP, whose
    loss scaler hands its scale and overflow flag to the fused optimizer's kernel instead of reading the flag back,
    and whose gradients tbps clips after the scaler unscales them (DeepSpeed's clipping made two blocking copies)."""
    for (name, precision, accum), res in audited_steps.items():
        if precision == "bf16":
            continue
        assert res["clip"] == 1.0, (name, precision)  # tbps clips, not DeepSpeed
        assert res["syncs"] == [], f"{name} {precision} grad_accum={accum}:\n" + "\n".join(res["syncs"])
    assert audited_steps[("irra", "auto", 1)]["resolved"] == "bf16-autocast"


def test_deepspeed_bf16_mode_reads_every_parameter_back_each_step(audited_steps):
    """Why ``train.precision: auto`` is bf16 autocast on GPUs and not DeepSpeed's bf16 mode: at ZeRO-0 with a torch
    optimizer DeepSpeed wraps it in its unfused fp16 optimizer, which checks each parameter's gradient for overflow
    with a value read -- at least one host synchronisation per parameter per step."""
    res = audited_steps[("irra", "bf16", 1)]
    assert res["resolved"] == "bf16" and res["clip"] == 0.0  # DeepSpeed clips in this mode
    overflow = [s for s in res["syncs"] if "has_overflow" in s]
    assert len(overflow) >= res["params"], "\n".join(res["syncs"][:20])


def _audit_two_ranks(rank, url, out_dir):
    """IRRA on 2 ranks at ZeRO-0 with global negatives (gathered features) and clipping: DeepSpeed's gradient
    all-reduce and tbps's gather in the step."""
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.engine.loop import initialize_engine, tbps_clips, train_step
    from tbps.methods import TextSpec, build_method
    from tbps.optim import build_optimizer

    cfg = load_config("irra_tiny", [f"data.url={url}", "data.loader_workers=0", "data.batch_size=4",
                                    "optim.grad_clip=1.0", "method.gather=true"])
    cfg.train.use_gpu = True  # the worker as on a GPU (fused AdamW, bf16 autocast); the step runs on this CPU
    tok = load_tokenizer(os.path.join(url, "tokenizer"))
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40)
    batch = next(iter(build_train_loader(cfg.data, tok, method.data_needs(), rank, 2)))
    engine, *_ = initialize_engine(cfg, method, build_optimizer(method, cfg.optim, fused=True))
    assert tbps_clips(cfg) and engine.enable_backward_allreduce
    for _ in range(2):
        train_step(engine, [batch], False, cfg.optim.grad_clip)
    with HostSyncAudit() as audit:
        train_step(engine, [batch], False, cfg.optim.grad_clip)
    torch.save([str(s) for s in audit.syncs], os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_step_makes_no_host_synchronisation(synth_tiny, tmp_path):
    run_ranks(_audit_two_ranks, 2, synth_tiny, str(tmp_path))
    for rank in (0, 1):
        syncs = torch.load(tmp_path / f"rank{rank}.pt")
        assert syncs == [], "\n".join(syncs)


def _audit_epochs(rank, url, out_dir):
    """The worker's loop (``TrainRun.train_one_epoch``) audited over one epoch of 4 and one of 8 steps. Batches are
    made in a loader process (as in a Ray worker), so the audit sees the loop, not the data pipeline."""
    import multiprocessing

    from tbps.config import load_config
    from tbps.engine.loop import TrainRun

    multiprocessing.set_start_method("fork", force=True)
    found = {}
    for steps in (4, 8):
        cfg = load_config("irra_tiny", [f"data.url={url}", "data.batch_size=4", "data.loader_workers=1",
                                        f"train.max_steps_per_epoch={steps}", "train.log_every=100",
                                        f"train.storage_path={out_dir}/runs{steps}", "train.run_name=syncs"])
        cfg.train.use_gpu = True  # the worker as on a GPU (fused AdamW, bf16 autocast); the step runs on this CPU
        run = TrainRun(cfg, rank, 1, torch.device("cpu"), lambda metrics, checkpoint_dir: None)
        with HostSyncAudit(host_side=("tbps/data/stream.py",)) as audit:  # the loader's host-side batches
            metrics = run.train_one_epoch(0)
        found[steps] = {"syncs": [str(s) for s in audit.syncs], "steps": metrics["step"]}
    torch.save(found, os.path.join(out_dir, "epochs.pt"))


def test_the_loop_reads_losses_per_log_line_not_per_step(synth_tiny, tmp_path):
    """train.log_every: loss values stay on the device between progress lines. An epoch of 8 steps makes exactly the
    host synchronisations of an epoch of 4 (a progress line at its first and last step, the epoch's means): none
    is per step."""
    run_ranks(_audit_epochs, 1, synth_tiny, str(tmp_path))
    found = torch.load(tmp_path / "epochs.pt")
    assert found[4]["steps"] == 4 and found[8]["steps"] == 8
    assert found[4]["syncs"], "the progress lines and the epoch's means read values"
    assert sorted(found[8]["syncs"]) == sorted(found[4]["syncs"]), "\n".join(found[8]["syncs"])
