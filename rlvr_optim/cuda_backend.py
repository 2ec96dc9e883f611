"""CUDA backend: the ``csrc/`` kernels through the extension ``rlvr_optim._C``.

:func:`adamw` has the keyword-only signature of :func:`rlvr_optim.reference.adamw` and
gives the same bits. The step is planned by
:data:`planner` (:class:`rlvr_optim.plan.Planner`, shared with the Triton backend): tensors
grouped by dtype layout, one kernel launch per group, driven by a table of device
addresses and sizes in device memory (the ``TensorRow`` s of ``csrc/adamw_launch.h``,
encoded here from the planner's description). Tables are kept: a step whose tensors sit
where they sat in an earlier step reuses its table and launches with no host-to-device
copy, so a step can be captured in a CUDA graph once it has run outside one (step count
and lr reach the kernel through the ``scalars`` rows, on the device; the kernel publishes
the counters itself).

The extension is ``rlvr_optim._C`` when setup.py built it (nvcc found at install time);
otherwise it is compiled on first use with nvcc (and ninja when present) into a cache
folder, for the GPU at hand (:mod:`rlvr_optim.extensions`).
Nothing here touches CUDA before :func:`adamw` is called with CUDA tensors.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .checks import STRICT_GRADS, Policy, check_tensors
from .extensions import CUDA, NVCC_FLAGS as _NVCC_FLAGS
from .extensions import cache_root as _cache_root
from .extensions import nvcc as _nvcc
from .operands import Operands, StepInputs, call_operands
from .plan import PlannedCall, Planner
from .reference import HALF_DTYPES, check_arguments, image_dtype
from .table import ROW, ROW_FIELDS

__all__ = ["adamw", "load_extension", "planner", "prepare", "unavailable_reason"]


# ---------------------------------------------------------------------------------------
# The extension (rlvr_optim.extensions.CUDA).
# ---------------------------------------------------------------------------------------


def load_extension() -> ModuleType:
    """rlvr_optim._C, compiling it first if setup.py did not build it."""
    return CUDA.load()


def is_built() -> bool:
    """Whether the extension is loaded or was built at install time (no compile needed)."""
    return CUDA.is_built()


def unavailable_reason() -> str | None:
    """Why ``backend="cuda"`` cannot run here, or None when it can. Touches no GPU."""
    return CUDA.unavailable_reason()


# ---------------------------------------------------------------------------------------
# Checks (on a call's first use only: see rlvr_optim.plan) and operands.
# ---------------------------------------------------------------------------------------


def _check_device(i: int, param: Tensor) -> None:
    if param.device.type != "cuda":
        raise ValueError(
            f"params[{i}] is on {param.device}: the CUDA backend runs CUDA tensors only; use "
            "backend='reference' (or 'auto') for CPU tensors"
        )


_POLICY = Policy("CUDA", _check_device, strict=True)


def _one_element(name: str, t, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element tensor, got {got}")
    return t.to(device).reshape(1)


def _found_inf_operand(found_inf: Tensor, device: torch.device) -> Tensor:
    """found_inf as one fp32 that is nonzero exactly when the reference skips."""
    t = _one_element("found_inf", found_inf, device)
    return t if t.dtype == torch.float32 else (t != 0).to(torch.float32)


# ---------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------


class _Table:
    __slots__ = ("buffer", "num_tensors", "total_tiles", "counters")

    def __init__(self, buffer: Tensor, num_tensors: int, total_tiles: int, counters: bool):
        self.buffer = buffer
        self.num_tensors = num_tensors
        self.total_tiles = total_tiles
        self.counters = counters


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _build_table(ext: ModuleType, columns: dict[str, np.ndarray], numels: np.ndarray,
                 device: torch.device) -> _Table:
    """The device table of one group (layout in csrc/adamw_launch.h): the planner's
    columns as rows of csrc/step_table.h, a sentinel row, the counter workspace and
    ticket (zero), and each tile's tensor row."""
    count = len(numels)
    rows = np.zeros((count + 1, len(ROW_FIELDS)), dtype=np.int64)
    for name, values in columns.items():
        if name in ROW:
            rows[:count, ROW[name]] = values
    numel = np.asarray(numels, dtype=np.int64)
    tiles = -(-numel // ext.TILE_ELEMENTS)
    first_tile = np.concatenate([[0], np.cumsum(tiles)])
    rows[:, ROW["first_tile"]] = first_tile
    element_arrays = rows[:count, [ROW[k] for k in ("param", "grad", "exp_avg", "exp_avg_sq",
                                                     "max_exp_avg_sq", "master")]]
    bitmaps = rows[:count, [ROW[k] for k in ("freeze_mask", "change_bitmap",
                                              "cumulative_bitmap")]]
    rows[:count, ROW["layout"]] = (
        np.where((element_arrays % 16 == 0).all(axis=1), ext.LAYOUT_VECTOR_ALIGNED, 0)
        | np.where((bitmaps % 8 == 0).all(axis=1), ext.LAYOUT_BITMAP_ALIGNED, 0)
    )
    total_tiles = int(first_tile[-1])
    buffer = np.zeros(ext.table_int64s(count, total_tiles), dtype=np.int64)  # workspace, ticket 0
    buffer[: rows.size] = rows.reshape(-1)
    # Each tile's tensor row, where a block looks up its first tensor (empty tensors own none).
    start = 2 * ext.tile_tensor_offset(count)
    buffer.view(np.int32)[start: start + total_tiles] = np.repeat(
        np.arange(count, dtype=np.int32), tiles)
    counters = bool(np.any(rows[:count, ROW["counters"]] != 0))
    return _Table(torch.from_numpy(buffer).to(device), count, total_tiles, counters)


class _Launch(NamedTuple):
    # (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq dtypes, master form, image dtype)
    layout: tuple
    device: torch.device
    table: _Table


def _encode(group, options: tuple) -> _Launch:
    """A planner group as a table of ``TensorRow`` s (planner callback)."""
    table = _build_table(load_extension(), group.columns, group.columns["numel"], group.device)
    return _Launch(group.key, group.device, table)


def _static_key(ops: Operands, offset: int, options: tuple) -> tuple:
    """A tensor's layout but its grad's dtype (planner callback); ``options``:
    ``(change_dtype,)``."""
    form = 1 if ops.master is not None else 2 if ops.remainder is not None else 0
    return (ops.param.dtype, ops.exp_avg.dtype, ops.exp_avg_sq.dtype,
            None if ops.max_exp_avg_sq is None else ops.max_exp_avg_sq.dtype, form,
            image_dtype(ops.param.dtype, options[0]))


def _group_key(static: tuple, grad_dtype: torch.dtype, grad_address: int) -> tuple:
    """The launch layout (planner callback); alignment is per row, in its layout field."""
    return (static[0], grad_dtype, *static[1:])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
    """One Adam step over a list of CUDA tensors, in place, one launch per dtype layout.

    Arguments and results as :func:`rlvr_optim.reference.adamw`. Every tensor is
    contiguous and on its param's GPU; params are float32, bfloat16 or float16, states
    float32 or bfloat16 (a tensor's exp_avg, exp_avg_sq and max_exp_avg_sq share one
    dtype), grads float32 or the 16-bit format of their tensor (its param's, or an fp32
    param's ``change_dtype``); ``masters`` need bf16 or float16 params, ``remainders`` bf16
    params. A call with the tensors of a
    recent one reuses its checks and tables (:data:`planner`); tensors other than params
    and grads are recognized by identity alone, so give a state new storage as a new
    tensor object, never by assigning its ``.data`` between calls.
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad,
                    change_dtype=change_dtype)
    if not params:
        return
    offsets = element_offsets if element_offsets is not None else [0] * len(params)
    launches = planner.launches(ops, grads, offsets, (change_dtype,))
    keys = sr_keys if rounding == "stochastic" else None
    _run(launches, _tracks(ops), StepInputs(scalars, keys, maximize, decoupled_weight_decay,
                                            grad_scale, found_inf))


def _tracks(ops: Operands) -> bool:
    return any(x is not None for x in (ops.change_bitmap, ops.cumulative_bitmap, ops.counter))


def prepare(ops: Operands, *, element_offsets=None, rounding: str = "nearest",
            amsgrad: bool = False, change_dtype: torch.dtype = torch.bfloat16) -> PlannedCall:
    """:func:`adamw` over ``ops`` as a call ``(grads, StepInputs)`` kept by its caller:
    checked when it first runs, then a pass over the grads per step
    (:class:`rlvr_optim.plan.PlannedCall`)."""
    offsets = [0] * ops.count if element_offsets is None else list(element_offsets)
    track = _tracks(ops)

    def run(launches, statics, offsets, grads, x: StepInputs) -> None:
        _run(launches, track, x if rounding == "stochastic" else x._replace(sr_keys=None))

    return PlannedCall(planner, run, ops, offsets, (change_dtype,))


def _run(launches: list, track: bool, x: StepInputs) -> None:
    """One kernel launch per planned launch (a table of one layout)."""
    ext = load_extension()
    stochastic = x.sr_keys is not None
    operands: dict[torch.device, tuple] = {}
    bf16 = torch.bfloat16
    for launch in launches:
        param_dtype, grad_dtype, state_dtype, _, vmax_dtype, form, half = launch.layout
        device = launch.device
        if param_dtype not in HALF_DTYPES:
            store = 0  # fp32 params: nearest-even images only, as in the reference
        elif form == 2:
            store = 4  # remainder
        else:
            store = (2 if form == 1 else 0) + (1 if stochastic else 0)
        variant = ext.variant(store, half == torch.float16, param_dtype in HALF_DTYPES,
                              grad_dtype in HALF_DTYPES, state_dtype == bf16,
                              vmax_dtype is not None, track, x.grad_scale is not None,
                              not x.decoupled_weight_decay)
        if device not in operands:  # on the device; the kernel reads them there
            operands[device] = (
                x.scalars.to(device).contiguous(),
                x.sr_keys.to(device).contiguous() if stochastic else None,
                _one_element("grad_scale", x.grad_scale, device).to(torch.float32)
                if x.grad_scale is not None else None,
                _found_inf_operand(x.found_inf, device) if x.found_inf is not None else None,
            )
        scalars_dev, keys_dev, scale, skip = operands[device]
        table = launch.table
        ext.launch_adamw(
            variant, table.buffer.data_ptr(), table.num_tensors, table.total_tiles,
            table.counters, scalars_dev.data_ptr(), _address(keys_dev), _address(scale),
            _address(skip), bool(x.maximize), device.index, _stream(device),
        )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check_call(statics: Operands, grads, offsets, options) -> None:
    """Every check (planner callback): CUDA tensors, dtypes, sizes, devices, contiguity; a
    16-bit grad in its tensor's 16-bit format (the kernels read one per launch)."""
    check_tensors(statics, grads, offsets, _POLICY)
    for i, grad in enumerate(grads):
        half = image_dtype(statics.param[i].dtype, options[0])
        if grad.dtype in HALF_DTYPES and grad.dtype != half:
            raise TypeError(
                f"grads[{i}] is {grad.dtype} but its tensor's 16-bit format is {half} (its "
                f"param is {statics.param[i].dtype}); the CUDA backend reads a 16-bit grad "
                f"in that format only: pass grads[{i}].to({half}) or .float()")


planner = Planner(_check_call, _static_key, _group_key, _encode, frozenset(STRICT_GRADS),
                  _capturing)
"""The CUDA backend's kept calls and tables (:class:`rlvr_optim.plan.Planner`)."""
