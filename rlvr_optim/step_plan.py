"""A param group's step plan: its checked params, their state, the operand lists and the
backend's prepared call, kept between steps so that a steady-state step is one pass over
the grads and one launch per group of same-layout tensors, whatever the number of groups.

:func:`gather` validates a group (every per-param check, or none when its kept plan still
holds), :func:`make` builds and keeps a plan, :func:`launch` runs one step of it. Plans are
kept per group index in the optimizer's ``_plans`` (one per group, no cache to miss: 500
groups of one param each cost what one group of 500 does); anything that changes state
through the optimizer drops them (``_forget_plans``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from . import backends, distributed, reference
from .operands import Operands, StepInputs
from .options import (OPTION_NAMES, FUSED_GRAD_DTYPES, PARAM_DTYPE_SET, check_differentiable,
                      check_hyperparameters, check_param_options, follows_torch,
                      normalize_group)
from ._checked import Addresses
from .plan import OperandList, ScalarRows, read_gradients, same_items
from .state import check_state, init_state, per_shard

__all__ = ["GroupPlan", "gather", "launch", "make"]


def _sr_keys_function(device: torch.device) -> Callable:
    """How a step derives its stochastic rounding keys on ``device``: on a GPU with Triton
    in one launch (the reference's ~270 tensor ops were one launch each), else by the
    reference's tensor ops; the same bits either way."""
    if device.type == "cuda":
        try:
            from .triton_kernels.sr_keys import stochastic_rounding_keys  # noqa: PLC0415
        except ImportError:
            pass
        else:
            return stochastic_rounding_keys
    return reference.stochastic_rounding_keys


class GroupPlan:
    """One group's checked params and what its steps need (see :func:`make`)."""

    __slots__ = ("options", "params", "addresses", "shapes", "states", "step_buffer",
                 "steps_on_device", "prepared", "whole_group", "scalar_rows", "sr_keys", "keys",
                 "grads_seen", "grad_dtypes")

    def __init__(self, options: tuple, params: list[Tensor], states: list[dict],
                 step_buffer: Tensor | None, prepared: Callable, keys: Tensor | None,
                 whole_group: bool):
        self.options = options
        self.params = params
        self.addresses = Addresses(params)  # a param whose .data moved is checked again
        self.shapes = [p.shape for p in params]
        self.states = states
        self.step_buffer = step_buffer  # the group's step counts, when they are views of it
        self.steps_on_device = all(s["step"].device == p.device for p, s in zip(params, states))
        self.prepared = prepared  # the backend's call over the plan's operands
        self.whole_group = whole_group  # every param of the group is in the plan
        # With a step buffer: the scalars of its steps in kept buffers.
        self.scalar_rows = ScalarRows(step_buffer) if step_buffer is not None else None
        # stochastic_rounding_keys(seed, steps, tensor keys) on their device
        self.sr_keys = _sr_keys_function(states[0]["step"].device)
        self.keys = keys  # the params' stochastic rounding keys (a device tensor), or None
        self.grads_seen = None  # Gradients.key of the latest grads whose dtypes passed
        # The gradient dtypes a kept plan takes (float16 where it has float16 params).
        self.grad_dtypes = (FUSED_GRAD_DTYPES if any(p.dtype == torch.float16 for p in params)
                            else PARAM_DTYPE_SET)


def options_key(opt, group: dict[str, Any]) -> tuple:
    """What a plan depends on besides its params and their state: the group's options
    (normalized in place, as the constructor takes them) and the identity and size of
    ``opt.state``."""
    return (*normalize_group(group), group["amsgrad"], group["capturable"], group["fused"],
            group["differentiable"], opt.backend, id(opt.state), len(opt.state))


# The group entries a step checks (torch's hyperparameter checks, rlvr_optim's options).
_CHECKED_KEYS = ("lr", "betas", "eps", "weight_decay", *OPTION_NAMES, "amsgrad", "capturable",
                 "fused", "differentiable")


def checked_options(opt, group_index: int) -> tuple:
    """:func:`check_hyperparameters` and :func:`options_key` of a group, skipped when the
    group's entries are the values that last passed (kept per group index beside the
    plans: with hundreds of groups, normalizing every group's options in every step was a
    fifth of the host work). A tensor ``lr`` is checked in every step: it may change in
    place."""
    group = opt.param_groups[group_index]
    raw = tuple(group[k] for k in _CHECKED_KEYS)
    kept = opt.__dict__.setdefault("_checked_options", {}).get(group_index)
    if kept is not None and kept[0] == raw and kept[1] == (opt.backend, id(opt.state),
                                                           len(opt.state)) \
            and not isinstance(raw[0], Tensor):
        return kept[2]
    check_hyperparameters(group)
    options = options_key(opt, group)
    # The entries as normalized (what the next step reads when nothing changed).
    opt._checked_options[group_index] = (tuple(group[k] for k in _CHECKED_KEYS),
                                         (opt.backend, id(opt.state), len(opt.state)), options)
    return options


def _cached(opt, group_index: int, options: tuple, on_device: bool):
    """The group's plan and this step's grads if the plan still holds: same options, same
    params with gradients, in the same order, at the same addresses (a param whose
    ``.data`` was replaced, as ``model.to(dtype)`` does, is checked again: a dtype that
    changed since its state was made is refused there), and every gradient a dense
    float32/bfloat16 tensor, or float16 in a plan with float16 params (anything else goes
    through the full checks, which name the
    param). Grads at new addresses are checked for the params' shapes, so a param viewed
    in another shape is refused too. A plan holds only params of the fused backends, so a
    group that also has params for torch's code (float16, float64, complex) with
    gradients takes the full checks in every step.

    A plan of the whole group costs a pass over the params' addresses and one over the
    grads: they are read with their data pointers and dtypes
    (:func:`rlvr_optim.plan.read_gradients`, which fails on a missing or sparse grad), and
    the backend reuses that reading."""
    plan = opt.__dict__.get("_plans", {}).get(group_index)
    if plan is None or plan.options != options or (on_device and not plan.steps_on_device):
        return None
    group_params = opt.param_groups[group_index]["params"]
    if plan.whole_group:
        if not same_items(group_params, plan.params) \
                or not plan.addresses.unchanged(plan.params):
            return None
        grads = read_gradients(plan.params)
        if grads is None:
            return None
        if grads.key is None or grads.key != plan.grads_seen:
            if not set(grads.dtypes) <= plan.grad_dtypes \
                    or [g.shape for g in grads] != plan.shapes:
                return None
            plan.grads_seen = grads.key
        return plan, grads
    with_grad = [p for p in group_params if p.grad is not None]
    if not same_items(with_grad, plan.params) or not plan.addresses.unchanged(plan.params):
        return None
    grads = [p.grad for p in with_grad]
    if not {g.dtype for g in grads} <= plan.grad_dtypes or any(g.is_sparse for g in grads) \
            or [g.shape for g in grads] != plan.shapes:
        return None
    return plan, grads


def gather(opt, group_index: int, on_device: bool = False) -> dict | None:
    """Validate a group and list its tensors; changes nothing. A group whose kept plan
    still holds skips the per-param checks (they passed when the plan was made)."""
    group = opt.param_groups[group_index]
    options = checked_options(opt, group_index)
    cached = _cached(opt, group_index, options, on_device)
    if cached is not None:
        return {"group": group, "index": group_index, "plan": cached[0],
                "grads": cached[1], "options": options}
    check_differentiable(group)
    items, torch_items = [], []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        name = opt._param_name(group_index, i)
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"param {name}: rlvr_optim's Adam does not support sparse gradients, "
                "please consider SparseAdam instead"
            )
        check_param_options(p, group, name)
        torch_code = follows_torch(p, group)
        if torch_code and grad.dtype != p.dtype:
            raise ValueError(
                f"param {name}: gradient dtype {grad.dtype} differs from the param's "
                f"{p.dtype}, which torch's Adam code (stepping this param) needs"
            )
        if not torch_code and grad.dtype not in PARAM_DTYPE_SET and not (
                grad.dtype == torch.float16 == p.dtype):
            raise ValueError(f"param {name}: gradient dtype {grad.dtype} is not supported")
        if distributed.is_dtensor(p) and (
            not distributed.is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements)
        ):
            got = tuple(grad.placements) if distributed.is_dtensor(grad) else "a plain tensor"
            raise ValueError(
                f"param {name}: the gradient of a DTensor param must be a DTensor with the "
                f"param's placements {tuple(p.placements)}, got {got}"
            )
        state = opt.state.get(p, {})
        check_state(p, group, state, name, initialized="step" in state)
        if group["differentiable"] and getattr(state.get("step"), "requires_grad", False):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        (torch_items if torch_code else items).append((i, p))
    if not items and not torch_items:
        return None
    return {"group": group, "index": group_index, "items": items,
            "torch_items": torch_items, "options": options}


def _ordinals(opt) -> dict[Tensor, int]:
    """Stable per-param keys for the stochastic rounding stream: position in the groups."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            out.setdefault(p, len(out))
    return out


def _device_keys(opt, keys: list[int], device: torch.device) -> Tensor:
    """The int64 tensor of ``keys`` on ``device``, built once per key list.

    Cached because building it copies from host memory, which a CUDA graph capture
    forbids; the first (warm-up) step builds it, captured steps reuse it.
    """
    cache = opt.__dict__.setdefault("_device_key_cache", {})
    index = (tuple(keys), str(device))
    if index not in cache:
        cache[index] = torch.tensor(keys, dtype=torch.int64).to(device)
    return cache[index]


def make(opt, job: dict, on_device: bool) -> GroupPlan:
    """Create missing state for a checked group and plan its steps.

    Kept (``opt._plans``) for groups of plain tensors, whose next steps then cost a pass
    over the gradients: with thousands of small tensors the per-param checks, not the
    kernel, were the step time. Anything that changes state through the optimizer
    (``load_state_dict``, ``set_freeze_mask``, ``add_param_group``) or a group's options
    drops the plans; tensors assigned into ``opt.state`` by hand are not seen, so call
    ``load_state_dict`` (or ``_forget_plans``) after such surgery.

    The step counts of such a group become views of one buffer, so a step adds 1 to all of
    them in one op (per-tensor ``step`` values and state dicts are unchanged).
    """
    group = job["group"]
    params = [p for _, p in job["items"]]
    states = [opt.state[p] for p in params]
    for p, state in zip(params, states):
        init_state(p, group, state, on_device=on_device)
        if on_device and state["step"].device != p.device:
            # Skipping on found_inf without a host sync needs the step count on the device.
            state["step"] = state["step"].to(p.device)
    layouts = [distributed.shard_layout(p) for p in params]
    plain = all(layout is None for layout in layouts)
    steps = [s["step"] for s in states]
    step_buffer = None
    if plain and len({(t.device, t.dtype) for t in steps}) == 1 and all(t.dim() == 0 for t in steps):
        step_buffer = torch.stack(steps)
        for i, state in enumerate(states):
            state["step"] = step_buffer[i]
    local = distributed.local_tensor

    # A kept plan's lists cannot change, so the backends recognize its calls by their
    # identity; a plan made for one step (DTensor params) passes plain lists, which the
    # backends recognize by their tensors from one step to the next.
    lists = OperandList if plain else list

    def per_shard_states(key: str, what: str = "bitmap") -> list:
        return lists(per_shard(p, s.get(key), what) for p, s in zip(params, states))

    def local_states(key: str) -> list:
        return lists(local(s[key]) for s in states)

    track = group["track_changes"]
    master = group["master_weights"]
    keys = None
    if group["rounding"] == "stochastic":
        ordinals = _ordinals(opt)
        keys = _device_keys(opt, [ordinals[p] for p in params], steps[0].device)
    ops = Operands(
        param=lists(map(local, params)),
        exp_avg=local_states("exp_avg"),
        exp_avg_sq=local_states("exp_avg_sq"),
        max_exp_avg_sq=local_states("max_exp_avg_sq") if group["amsgrad"] else None,
        master=local_states("master") if master == "fp32" else None,
        remainder=local_states("remainder") if master == "remainder" else None,
        freeze_mask=per_shard_states("freeze_mask"),
        change_bitmap=per_shard_states("change_bitmap") if track != "off" else None,
        cumulative_bitmap=per_shard_states("cumulative_bitmap") if track == "cumulative" else None,
        counter=per_shard_states("change_counts", "counters") if track != "off" else None,
    )
    backend = backends.select(opt.backend, params[0].device)
    prepared = backend.prepare(
        ops, element_offsets=[0 if lay is None else lay.element_offset for lay in layouts],
        rounding=group["rounding"], amsgrad=group["amsgrad"],
        change_dtype=getattr(torch, group["change_dtype"]))
    plan = GroupPlan(job["options"], params, states, step_buffer, prepared, keys,
                     whole_group=len(params) == len(group["params"]))
    if plain:
        opt.__dict__.setdefault("_plans", {})[job["index"]] = plan
    return plan


# Groups of at most this many host tensors share their scalar rows (see _scalar_memo).
_MEMO_TENSORS = 64
_scalar_memos: dict = {}


def _scalar_memo(steps: Tensor, hyper: tuple, decoupled: bool) -> dict | None:
    """Scalar rows already computed in this step for groups of the same step counts and
    hyperparameters (host tensors, a float lr): the rows are a function of those alone, so
    500 groups of one param with a few distinct learning rates compute a few rows per step
    instead of 500 (each is five tensor ops). The rows may come from a plan's ScalarRows or
    from reference.step_scalars: they are the same bits (test_host_path), and the memo keeps
    a copy, never a plan's buffer. None where that does not apply: device step counts (a
    step never reads them on the host), a tensor lr, groups of more than _MEMO_TENSORS."""
    if steps.device.type != "cpu" or steps.numel() > _MEMO_TENSORS \
            or isinstance(hyper[0], Tensor):
        return None
    key = (tuple(steps.tolist()), decoupled)
    memo = _scalar_memos.get(key)
    if memo is None:
        if len(_scalar_memos) > 256:
            _scalar_memos.clear()
        memo = _scalar_memos[key] = {}
    return memo


def launch(group: Mapping[str, Any], plan: GroupPlan, grads: list[Tensor] | None,
           grad_scale, found_inf) -> None:
    """Advance the step counts and run the backend over the plan's tensors (``grads``: the
    plain grads when the caller has them already)."""
    if plan.step_buffer is not None:
        plan.step_buffer.add_(1)
        step_vec = plan.step_buffer
        if found_inf is not None:
            step_vec.sub_(found_inf.to(device=step_vec.device, dtype=torch.float32).reshape(()))
    else:
        steps = [s["step"] for s in plan.states]
        torch._foreach_add_(steps, 1)
        if found_inf is not None:
            skipped = found_inf.to(device=steps[0].device, dtype=torch.float32).reshape(())
            torch._foreach_sub_(steps, skipped)
        step_vec = torch.stack([t.to(steps[0].device) for t in steps])
    beta1, beta2 = group["betas"]
    # Adam's L2 term (torch's Adam adds it only for a nonzero weight decay); AdamW's decay
    # factor is 1 without weight decay, which leaves the weight as it is.
    decoupled = group["decoupled_weight_decay"] or group["weight_decay"] == 0
    step_scalars = plan.scalar_rows or reference.step_scalars
    hyper = (group["lr"], float(beta1), float(beta2), group["weight_decay"], group["eps"])
    memo = _scalar_memo(step_vec, hyper, decoupled)
    # repr: -0.0 and 0.0 (equal as keys) give other bits.
    hyper_key = tuple(map(repr, hyper)) if memo is not None else None
    scalars = memo.get(hyper_key) if memo is not None else None
    if scalars is None:
        scalars = step_scalars(step_vec, *hyper, decoupled_weight_decay=decoupled)
        if memo is not None:
            memo[hyper_key] = scalars.clone()
    sr_keys = None
    if plan.keys is not None:
        sr_keys = plan.sr_keys(group["seed"], step_vec, plan.keys)
    if grads is None:
        grads = [distributed.local_tensor(p.grad) for p in plan.params]
    plan.prepared(grads, StepInputs(scalars, sr_keys, group["maximize"], decoupled,
                                    grad_scale, found_inf))
