"""The per-tensor checks of the fused backends: one checker, a policy per backend.

:func:`check_tensors` checks every tensor of a call before any is touched and raises
naming the tensor and the fix. The backends run it when they build a plan of a call (not
in every step: a kept plan checks only what can change between steps, see
:mod:`rlvr_optim.plan`). A :class:`Policy` says what differs between backends: which
devices it runs, and whether it is *strict* (the GPU backends: contiguous tensors, float32,
bfloat16 or float16 grads, float32 or bfloat16 states, one state dtype per tensor, else an
error) or steps such
tensors another way (the CPU backend: the reference steps them, or their grads are
converted; :func:`check_tensors` returns their indices).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .operands import Operands
from .reference import master_param_error
from .table import COUNTER_NAMES

__all__ = ["FLOATS", "PARAMS", "STRICT_GRADS", "Policy", "check_tensors", "compiled_layout"]

FLOATS = (torch.float32, torch.bfloat16)
PARAMS = (torch.float32, torch.bfloat16, torch.float16)  # every fused backend steps these
STRICT_GRADS = PARAMS  # grads the GPU backends read
_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_BITMAPS = ("freeze_mask", "change_bitmap", "cumulative_bitmap")


class Policy(NamedTuple):
    """What a backend takes.

    ``name``: the backend in messages ("CPU", "CUDA", "Triton"). ``check_device(i,
    param)``: raises for a param on a device the backend does not run. ``strict``: refuse
    what the compiled code cannot read (else report it, see :func:`check_tensors`)."""

    name: str
    check_device: Callable[[int, Tensor], None]
    strict: bool


def _check(name: str, t, dtypes: Sequence | None, numel: int, device: torch.device,
           policy: Policy) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; the {policy.name} backend takes {allowed}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, its param on {device}; move it to {device}")
    if policy.strict and not t.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, stride {tuple(t.stride())}); "
            f"the {policy.name} backend needs contiguous tensors: pass t.contiguous() (and "
            "copy the result back), or use backend='reference'"
        )


def compiled_layout(t: Operands) -> bool:
    """Whether the compiled loops read tensor ``t`` (its :class:`Operands`) as it is: its
    arrays contiguous, its states all float32 or all bfloat16. (A strict backend refuses
    the others; the CPU backend steps them by the reference.)"""
    dtypes = {s.dtype for s in (t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq) if s is not None}
    return (len(dtypes) == 1 and dtypes <= set(FLOATS)
            and all(x.is_contiguous() for x in t if x is not None))


def _list_name(operand: str) -> str:
    return "counters" if operand == "counter" else f"{operand}s"


def check_tensors(ops: Operands, grads: Sequence, offsets: Sequence[int],
                  policy: Policy) -> list[int]:
    """Check every tensor of a call (``ops``, ``grads``, ``offsets``: each tensor's
    global index of its element 0); raises for the first that does not fit, naming it.

    Returns the tensors that a lenient (not strict) backend cannot step in its compiled
    code: a param, state, master or bitmap that is not contiguous, or states that are not
    all float32 or all bfloat16. (Its grads of another dtype, or not contiguous, are
    converted instead.)"""
    slow = []
    for i in range(ops.count):
        t = ops.at(i)
        param = t.param
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(param).__name__}")
        # What the spec refuses comes first, on every backend and device.
        for kind, extra in (("masters", t.master), ("remainders", t.remainder)):
            error = master_param_error(kind, i, param.dtype) if extra is not None else None
            if error:
                raise ValueError(error)
        policy.check_device(i, param)
        device, numel = param.device, param.numel()
        nbytes = (numel + 7) // 8
        _check(f"params[{i}]", param, PARAMS, numel, device, policy)
        grad = grads[i]
        _check(f"grads[{i}]", grad, STRICT_GRADS if policy.strict else None, numel, device,
               policy)
        if not grad.is_floating_point() or grad.is_complex():
            raise TypeError(f"grads[{i}] has dtype {grad.dtype}; a gradient must be a real "
                            "floating-point tensor")
        states = [(name, getattr(t, name)) for name in _STATES if getattr(t, name) is not None]
        for name, state in states:
            _check(f"{_list_name(name)}[{i}]", state, FLOATS if policy.strict else None, numel,
                   device, policy)
        if len({s.dtype for _, s in states}) != 1 and policy.strict:
            name, state = next((n, s) for n, s in states if s.dtype != t.exp_avg.dtype)
            raise TypeError(
                f"{_list_name(name)}[{i}] has dtype {state.dtype} but exp_avgs[{i}] "
                f"{t.exp_avg.dtype}: the {policy.name} backend needs one state dtype per "
                "tensor (rlvr_optim.AdamW keeps them equal); cast the states, or use "
                "backend='reference'"
            )
        for kind, extra, dtype in (("masters", t.master, torch.float32),
                                   ("remainders", t.remainder, torch.int16)):
            if extra is not None:
                _check(f"{kind}[{i}]", extra, (dtype,), numel, device, policy)
        for name in _BITMAPS:
            bitmap = getattr(t, name)
            if bitmap is not None:
                _check(f"{name}s[{i}]", bitmap, (torch.uint8,), nbytes, device, policy)
        if t.counter is not None:
            _check(f"counters[{i}]", t.counter, (torch.int64,), len(COUNTER_NAMES), device,
                   policy)
        offset = int(offsets[i])
        if not 0 <= offset <= 2**63 - 1 - numel:
            raise ValueError(f"element_offsets[{i}] must be >= 0 and fit in int64, got {offset}")
        if not policy.strict and not compiled_layout(t):
            slow.append(i)
    return slow
