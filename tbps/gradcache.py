"""Feature-cached gradient accumulation (the GradCache technique, Gao et al. 2021) for ``train.grad_cache``.

Plain gradient accumulation over N micro-batches averages N small-batch losses, so a contrastive loss (SDM, ITC,
CMPM) only ever sees one micro-batch's negatives. Here one optimizer step gets the gradients of the loss of the whole
accumulated batch (with ``method.gather``: of every rank's accumulated batch) while holding one micro-batch's
activations at a time:

1. every micro-batch is embedded without autograd (``method.features``), the random state (dropout, drop path, BMM)
   recorded before each;
2. the batch-level losses of all the features, concatenated, and their gradients with respect to those features
   (and to the parameters the losses use directly: a learnable temperature);
3. each micro-batch is embedded again with autograd under its recorded random state, and backpropagated through
   ``<features, cached gradient> + (weighted per-sample losses) / N`` -- the per-sample losses (IRRA's MLM, the ID
   loss) are added per micro-batch, as plain accumulation would.

The result equals one step on the N-times batch (the per-sample losses averaged over micro-batches); tests/
test_gradcache.py checks it for every method, on 1 and 2 ranks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _rng_state(device: torch.device | None) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device | None) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_step(method, micro_batches: Sequence[dict], forward: Callable | None = None,
                    backward: Callable[[torch.Tensor, int], None] | None = None,
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Accumulate the gradients of one step over ``micro_batches`` (steps 1-3 of the module doc).

    ``method``: the Method (its ``batch_losses`` and weights); ``forward(batch, stage="features")``: how to run its
    forward (the DeepSpeed engine, or the method itself); ``backward(surrogate, i)``: backpropagate micro-batch i's
    surrogate loss (default ``surrogate.backward()``; the engine's backward + step in training). Returns the detached
    loss parts of the whole batch and the weighted ``"loss"``, as ``Method.forward`` does for one batch."""
    forward = forward or method
    backward = backward or (lambda surrogate, i: surrogate.backward())
    n = len(micro_batches)
    if n == 0:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    if getattr(method, "compiled_draws_replayed", True) is False:  # compiled without replay_random: silently wrong
        raise ValueError("grad_cache_step over a compiled Method.features needs Method.compile_step(replay_random="
                         "True): its two passes are two compiled graphs, which draw different dropout/drop-path masks "
                         "from the same random state otherwise")
    states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state(device))
            feats, _ = forward(batch, stage="features")
            cached.append(feats)
    keys = list(cached[0])
    rows = [{k: len(f[k]) for k in keys} for f in cached]
    leaves = {}
    for k in keys:
        joined = torch.cat([f[k] for f in cached]).detach()
        leaves[k] = joined.float().requires_grad_() if joined.is_floating_point() else joined  # float32 gradients
    del cached
    params = method.batch_loss_parameters()
    with torch.enable_grad():
        parts = method.fp32_batch_losses(leaves)
        inputs = [leaves[k] for k in keys if leaves[k].requires_grad] + params
        grads = torch.autograd.grad(method.weighted(parts), inputs, allow_unused=True) if parts else \
            [None] * len(inputs)
    feature_grads = dict(zip([k for k in keys if leaves[k].requires_grad], grads))
    param_grads = grads[len(feature_grads):]
    out = {k: v.detach() for k, v in parts.items()}
    local_sums: dict[str, torch.Tensor] = {}
    offsets = {k: 0 for k in keys}
    for i, batch in enumerate(micro_batches):
        _set_rng_state(states[i], device)
        feats, local = forward(batch, stage="features")
        surrogate = next(v for v in feats.values() if v.is_floating_point()).new_zeros((), dtype=torch.float32)
        for k, g in feature_grads.items():
            lo = offsets[k]
            if g is not None:  # in float32: the gradient reaching feats[k] is then (loss scale x g) rounded to its
                # dtype once, as in one backward of the whole batch -- not g rounded to fp16 first, which flushes a
                # large batch's small feature gradients (below fp16's 6e-5) to subnormals or 0 before any scaling
                surrogate = surrogate + (feats[k].float() * g[lo:lo + rows[i][k]]).sum()
        for k in keys:
            offsets[k] += rows[i][k]
        if local:
            surrogate = surrogate + method.weighted(local) / n
        if i == 0:  # the batch-level losses' own parameters get their gradient once
            for p, g in zip(params, param_grads):
                if g is not None:
                    surrogate = surrogate + (p * g.to(p.dtype)).sum()
        backward(surrogate, i)
        for k, v in local.items():
            local_sums[k] = local_sums.get(k, 0) + v.detach() / n
    out.update(local_sums)
    total = method.weighted(out)
    return {"loss": total, **{f"loss_{k}": v for k, v in out.items()}}
