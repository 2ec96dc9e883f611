"""The step of params that no bf16 mode concerns (float16, float64, complex) and of every
param of a ``differentiable=True`` group: torch's own functional Adam with the group's
options, so that they behave as under ``torch.optim.Adam`` / ``AdamW``, autograd
included; then their change tracking, by comparing their stored bits with a copy taken
before the step (one copy of each such param per step)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from . import bitmaps, distributed
from .state import init_state, per_shard

__all__ = ["torch_step"]

_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stored_bits(t: Tensor) -> Tensor:
    """The bit patterns of ``t`` as integers of its element size (a complex element: its real
    and imaginary parts along a last dimension of 2)."""
    t = distributed.local_tensor(t)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_BITS_DTYPES[t.element_size()])


def torch_step(opt, group: Mapping[str, Any], params: list[Tensor], grad_scale,
               found_inf) -> None:
    """Step checked ``params`` of ``group`` (of optimizer ``opt``) with torch's code."""
    states = [opt.state[p] for p in params]
    for p, state in zip(params, states):
        init_state(p, group, state)
    grads = [p.grad for p in params]
    skip = False
    if not group["fused"] and (grad_scale is not None or found_inf is not None):
        # torch's for-loop and foreach code take no GradScaler tensors: unscale here, and
        # skip on found_inf read on the host, which is what GradScaler does for them.
        if grad_scale is not None:
            grads = [g / grad_scale.to(g.device) for g in grads]
        skip = found_inf is not None and bool(found_inf.item())
        grad_scale = found_inf = None
    track = group["track_changes"]
    before = [_stored_bits(p).clone() for p in params] if track != "off" else None
    if not skip:
        beta1, beta2 = group["betas"]
        # torch's step runs with autograd on exactly when its defaults ask for it.
        with torch.set_grad_enabled(opt.defaults["differentiable"]):
            torch_adam(
                params, grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                [s["step"] for s in states],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                has_complex=any(map(torch.is_complex, params)),
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
    if before is None:
        return
    for p, state, old, grad in zip(params, states, before, grads):
        changed = _stored_bits(p) != old
        if p.is_complex():
            changed = changed.any(-1)
        changed = changed.reshape(-1)
        grad = distributed.local_tensor(grad)
        if grad_scale is not None:  # fused: torch's kernel unscaled it
            grad = grad / grad_scale.to(grad.device)
        count = changed.sum()
        nonfinite = (~torch.isfinite(grad)).sum()
        bits = bitmaps.pack(changed)
        per_shard(p, state["change_bitmap"], "bitmap").copy_(bits)
        if track == "cumulative":
            per_shard(p, state["cumulative_bitmap"], "bitmap").bitwise_or_(bits)
        per_shard(p, state["change_counts"], "counters").copy_(torch.stack([count, count, nonfinite]))
