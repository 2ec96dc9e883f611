"""CPU backend: ``csrc/adamw_element.cuh`` compiled for the CPU, ``rlvr_optim._cpu``.

:func:`adamw` has the keyword-only signature of :func:`rlvr_optim.reference.adamw` and
gives the same bits. One call is one pass of OpenMP threads (``torch.get_num_threads()``
of them) over all tensors, in spans of whole 8-element tiles, each element through the
header's ``adamw_element``, the function the CUDA kernel runs (``csrc/cpu_step.cpp``). The
call is planned by :data:`planner` (:class:`rlvr_optim.plan.Planner`, as the GPU backends'):
its checked tensors as rows of the step table (``csrc/step_table.h``), kept between calls.

The extension is ``rlvr_optim._cpu`` when setup.py built it (a C++ compiler found at
install time); otherwise it is compiled on first use (ninja when present) into a cache
folder (:mod:`rlvr_optim.extensions`). ``backend="auto"`` uses the reference instead when
neither works, and says so once.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import reference
from .checks import FLOATS, Policy, check_tensors, compiled_layout
from .extensions import CPU
from .operands import Operands, StepInputs, call_operands
from .plan import PlannedCall, Planner
from .reference import check_arguments
from .table import LAYOUT_BITS, ROW, ROW_FIELDS

__all__ = ["adamw", "auto_ready", "is_built", "load_extension", "planner", "prepare",
           "unavailable_reason"]

_warned = False


# ---------------------------------------------------------------------------------------
# The extension (rlvr_optim.extensions.CPU).
# ---------------------------------------------------------------------------------------


def load_extension() -> ModuleType:
    """rlvr_optim._cpu, compiling it first if setup.py did not build it. A failed compile
    is not retried in this process."""
    return CPU.load()


def is_built() -> bool:
    """Whether the extension is loaded or was built at install time (no compile needed)."""
    return CPU.is_built()


def unavailable_reason() -> str | None:
    """Why ``backend="cpu"`` cannot run here, or None when it can (or may: a first-use
    compile that has not been tried yet)."""
    return CPU.unavailable_reason()


def auto_ready() -> bool:
    """Whether ``backend="auto"`` can run CPU tensors here (loading or compiling the
    extension if needed); when it cannot, warns once that the reference runs instead."""
    global _warned
    try:
        CPU.load()
        return True
    except (RuntimeError, OSError) as exc:
        if not _warned:
            _warned = True
            warnings.warn(
                f"rlvr_optim: the CPU backend is unavailable ({exc}); backend='auto' runs the "
                "reference on CPU tensors, which is exact but slow", RuntimeWarning,
                stacklevel=3)
        return False


# ---------------------------------------------------------------------------------------
# Checks and the plan of a call.
# ---------------------------------------------------------------------------------------


def _check_device(i: int, param: Tensor) -> None:
    if param.device.type != "cpu":
        raise ValueError(f"params[{i}] is on {param.device}: the CPU backend runs CPU tensors "
                         "only; use backend='auto', which picks a GPU backend for GPU tensors")


_POLICY = Policy("CPU", _check_device, strict=False)


def _one_element(name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element tensor, got {got}")
    return t.detach().to("cpu").reshape(1)


def _check_call(statics: Operands, grads, offsets, options) -> None:
    """Every per-tensor check (planner callback)."""
    check_tensors(statics, grads, offsets, _POLICY)


def _static_key(ops: Operands, offset: int, options: tuple) -> int | None:
    """A tensor's layout bits but the grad's (planner callback), or None for a tensor the
    reference steps (its states or arrays are not what the loops read)."""
    if not compiled_layout(ops):
        return None
    bf16 = torch.bfloat16
    param16 = ops.param.dtype in reference.HALF_DTYPES
    on = {
        "param_bf16": ops.param.dtype == bf16, "state_bf16": ops.exp_avg.dtype == bf16,
        "param_fp16": ops.param.dtype == torch.float16,
        "image_fp16": not param16 and options[1] == torch.float16,
        "amsgrad": ops.max_exp_avg_sq is not None, "master_fp32": ops.master is not None,
        "remainder": ops.remainder is not None,
        # fp32 params are stored exactly and ignore rounding, as in the reference
        "stochastic": options[0] == "stochastic" and param16,
        "track": any(x is not None for x in (ops.change_bitmap, ops.cumulative_bitmap,
                                             ops.counter)),
    }
    return sum(LAYOUT_BITS[name] for name, value in on.items() if value)


def _group_key(static: int | None, grad_dtype: torch.dtype, grad_address: int) -> int | None:
    """The launch of a tensor (planner callback): one per static layout (the loops take
    each row's grad dtype from its row), one (None) for the tensors the reference steps."""
    return static


class _Launch(NamedTuple):
    """One call of the extension's step over table ``rows`` (call rows ``index``); the
    grads of rows ``staged`` (positions in ``rows``) are read from float32 copies."""

    rows: np.ndarray
    index: tuple[int, ...]
    staged: tuple[int, ...]
    address: int  # of rows (read once: numpy's .ctypes costs microseconds per read)


class _ReferenceLaunch(NamedTuple):
    """Call rows ``index`` stepped by the reference."""

    index: tuple[int, ...]


def _encode(group, options: tuple) -> _Launch | _ReferenceLaunch:
    """A planner group as table rows (planner callback): the group's layout bits and each
    row's grad bits; a grad the loops cannot read as it is (another dtype, a float16 grad
    beside a param that is not float16, or not contiguous) is read from a float32 copy
    made in each step."""
    if group.key is None:
        return _ReferenceLaunch(group.rows)
    rows = np.zeros((len(group.rows), len(ROW_FIELDS)), dtype=np.int64)
    for name, values in group.columns.items():
        if name in ROW:
            rows[:, ROW[name]] = values
    rows[:, ROW["layout"]] = group.key
    staged = []
    param_fp16 = bool(group.key & LAYOUT_BITS["param_fp16"])
    for k, (dtype, contiguous) in enumerate(zip(group.grad_dtypes, group.grad_contiguous)):
        if dtype == torch.float16 and param_fp16 and contiguous:
            rows[k, ROW["layout"]] |= LAYOUT_BITS["grad_fp16"]
        elif dtype not in FLOATS or not contiguous:
            staged.append(k)
        elif dtype == torch.bfloat16:
            rows[k, ROW["layout"]] |= LAYOUT_BITS["grad_bf16"]
    return _Launch(rows, group.rows, tuple(staged), rows.ctypes.data)


def _capturing(device: torch.device) -> bool:
    return False  # CPU tensors: no CUDA graph


# ---------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    scalars: Tensor,
    max_exp_avg_sqs: list[Tensor] | None = None,
    masters: list[Tensor] | None = None,
    remainders: list[Tensor] | None = None,
    freeze_masks: list[Tensor | None] | None = None,
    change_bitmaps: list[Tensor] | None = None,
    cumulative_bitmaps: list[Tensor] | None = None,
    counters: list[Tensor] | None = None,
    rounding: str = "nearest",
    sr_keys: Tensor | None = None,
    element_offsets: list[int] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    change_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """One Adam step over a list of CPU tensors, in place, in one pass of OpenMP threads.

    Arguments and results as :func:`rlvr_optim.reference.adamw`. Params are float32,
    bfloat16 or float16. Grads of another dtype than float32 or bfloat16 (or float16
    beside a float16 param) are converted to float32 first, as the reference does. A
    tensor whose param, states, master or bitmaps are not contiguous, or whose exp_avg,
    exp_avg_sq and max_exp_avg_sq differ in dtype or are neither float32 nor bfloat16, is
    stepped by the reference (same bits, slower). A call with the tensors of a recent
    checked call checks only the grads; tensors other than params and grads are
    recognized by identity alone, so give a state new storage as a new tensor object,
    never by assigning its ``.data`` between calls.
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad,
                    change_dtype=change_dtype)
    if not params:
        return
    offsets = [0] * len(params) if element_offsets is None else [int(o) for o in element_offsets]
    launches = planner.launches(ops, grads, offsets, (rounding, change_dtype))
    keys = sr_keys if rounding == "stochastic" else None
    _run(launches, ops, offsets, grads,
         StepInputs(scalars, keys, maximize, decoupled_weight_decay, grad_scale, found_inf),
         change_dtype)


def prepare(ops: Operands, *, element_offsets=None, rounding: str = "nearest",
            amsgrad: bool = False, change_dtype: torch.dtype = torch.bfloat16) -> PlannedCall:
    """:func:`adamw` over ``ops`` as a call ``(grads, StepInputs)`` kept by its caller:
    checked when it first runs, then a pass over the grads per step
    (:class:`rlvr_optim.plan.PlannedCall`)."""
    offsets = [0] * ops.count if element_offsets is None else list(element_offsets)
    return PlannedCall(planner, functools.partial(_run, change_dtype=change_dtype), ops,
                       offsets, (rounding, change_dtype))


def _run(launches: list, ops: Operands, offsets: list[int], grads, x: StepInputs,
         change_dtype: torch.dtype = torch.bfloat16) -> None:
    """The launches of a step: the extension's step per table, the reference for the rest
    (``change_dtype``: the image of fp32 params' change flags, as in the reference)."""
    scalars = _host(x.scalars)
    keys = _host(x.sr_keys) if x.sr_keys is not None else None
    scale = skip = None
    if x.grad_scale is not None:
        scale = _one_element("grad_scale", x.grad_scale).to(torch.float32)
    if x.found_inf is not None:  # one fp32 that is nonzero exactly when the reference skips
        skip = _one_element("found_inf", x.found_inf)
        skip = skip if skip.dtype == torch.float32 else (skip != 0).to(torch.float32)
    for launch in launches:
        if isinstance(launch, _ReferenceLaunch):
            for i in launch.index:
                reference.step_tensor(ops.at(i), grads[i], reference.TensorStep(
                    scalars[i], keys[i] if keys is not None else None, offsets[i],
                    x.maximize, x.decoupled_weight_decay, x.grad_scale, x.found_inf,
                    change_dtype))
            continue
        rows = launch.rows
        # Grads the loops cannot read as they are become float32 copies, kept alive until
        # the step returns.
        staged = [grads[launch.index[k]].contiguous().float() for k in launch.staged]
        for k, copy in zip(launch.staged, staged):
            rows[k, ROW["grad"]] = copy.data_ptr()
        ext = CPU.load()
        ext.step(ext.ISAS[0], launch.address, len(launch.index), scalars.data_ptr(),
                 _address(keys), _address(scale), _address(skip), bool(x.maximize),
                 not x.decoupled_weight_decay, torch.get_num_threads())


def _host(t: Tensor) -> Tensor:
    """``t`` as a contiguous host tensor without autograd (itself when it is one already:
    the common case, checked without a tensor op)."""
    if t.device.type == "cpu" and not t.requires_grad and t.is_contiguous():
        return t
    return t.detach().to("cpu").contiguous()


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


planner = Planner(_check_call, _static_key, _group_key, _encode,
                  frozenset((*FLOATS, torch.float16)), _capturing)
"""The CPU backend's kept calls and tables (:class:`rlvr_optim.plan.Planner`)."""
