"""CPU backend: ``csrc/adamw_element.cuh`` compiled for the CPU, ``rlvr_optim._cpu``.

:func:`adamw` has the keyword-only signature of :func:`rlvr_optim.reference.adamw` and
gives the same bits. One call is one pass of OpenMP threads (``torch.get_num_threads()``
of them) over all tensors, in spans of whole 8-element tiles, each element through the
header's ``adamw_element``, the function the CUDA kernel runs (``csrc/cpu_step.cpp``).

The extension is ``rlvr_optim._cpu`` when setup.py built it (a C++ compiler found at
install time); otherwise it is compiled on first use (ninja when present) into a cache
folder (``$RLVR_OPTIM_CACHE``, default ``~/.cache/rlvr_optim``, subfolder ``cpu_ext``).
``backend="auto"`` uses the reference instead when neither works, and says so once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from . import _cpu_build, reference
from ._checked import CheckedCall, CheckedCalls
from .checks import FLOATS, Policy, check_tensors
from .cuda_backend import _cache_root
from .operands import Operands, call_operands
from .reference import check_arguments
from .table import COUNTER_NAMES, LAYOUT_BITS, ROW, ROW_FIELDS

__all__ = ["adamw", "auto_ready", "is_built", "load_extension", "unavailable_reason"]

# What this file expects of the extension (csrc/cpu_step.h, csrc/cpu_binding.cpp); the row
# layout is csrc/step_table.h's (rlvr_optim.table).
ABI_VERSION = 4

_extension: ModuleType | None = None
_failure: str | None = None  # why the first-use build failed in this process
_warned = False


# ---------------------------------------------------------------------------------------
# The extension: built by setup.py, or compiled here on first use.
# ---------------------------------------------------------------------------------------


def _source_dir() -> Path | None:
    """csrc/ beside the package (installed as package data) or in the source checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if all((folder / name).is_file() for name in _cpu_build.SOURCES):
            return folder
    return None


def _usable(module: ModuleType) -> bool:
    return (getattr(module, "ABI_VERSION", None) == ABI_VERSION
            and tuple(getattr(module, "ROW_FIELDS", ())) == ROW_FIELDS
            and tuple(getattr(module, "COUNTER_NAMES", ())) == COUNTER_NAMES
            and dict(getattr(module, "LAYOUT_BITS", {})) == LAYOUT_BITS)


def _prebuilt() -> ModuleType | None:
    """The extension built by setup.py, if there is one of this version."""
    try:
        from . import _cpu
    except ImportError:
        return None
    return _cpu if _usable(_cpu) else None


def _build_blockers() -> list[str]:
    blockers = []
    if _source_dir() is None:
        blockers.append("the csrc/ sources are not installed with the package")
    if _cpu_build.compiler() is None:
        blockers.append("no C++ compiler ($CXX, g++ or c++ on PATH)")
    if importlib.util.find_spec("pybind11") is None:
        blockers.append("pybind11 is not installed (pip install pybind11)")
    return blockers


def is_built() -> bool:
    """Whether the extension is loaded or was built at install time (no compile needed)."""
    return _extension is not None or _prebuilt() is not None


def unavailable_reason() -> str | None:
    """Why ``backend="cpu"`` cannot run here, or None when it can (or may: a first-use
    compile that has not been tried yet)."""
    if is_built():
        return None
    if _failure is not None:
        return _failure
    blockers = _build_blockers()
    if not blockers:
        return None
    return ("rlvr_optim._cpu was not built at install time and cannot be compiled now: "
            + "; ".join(blockers))


def _build_and_import() -> ModuleType:
    blockers = _build_blockers()
    if blockers:
        raise RuntimeError(
            "backend 'cpu' needs the extension rlvr_optim._cpu, which was not built at install "
            f"time and cannot be compiled now: {'; '.join(blockers)}. Reinstall with a C++ "
            "compiler on PATH (pip install -e . builds it), or use backend='reference'."
        )
    import pybind11

    src = _source_dir()
    digest = hashlib.sha256()
    for name in _cpu_build.SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    digest.update(repr((_cpu_build.CXX_FLAGS, _cpu_build.isas(), sys.version_info[:2],
                        _cpu_build.compiler())).encode())
    folder = _cache_root() / "cpu_ext" / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    import fcntl

    target = folder / _cpu_build.target_name()
    with open(folder / ".lock", "w") as lock:  # one build per folder across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            print(f"rlvr_optim: compiling the CPU extension into {folder} (first use only; "
                  "about a minute)", file=sys.stderr, flush=True)
            partial = folder / f"partial-{target.name}"
            _cpu_build.build(src, folder, partial, pybind11.get_include())
            partial.replace(target)  # a killed build leaves no half-written module
            print("rlvr_optim: CPU extension compiled", file=sys.stderr, flush=True)
        spec = importlib.util.spec_from_file_location("rlvr_optim._cpu", target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not _usable(module):
        raise RuntimeError(f"{target} does not match this rlvr_optim; delete {folder}")
    return module


def load_extension() -> ModuleType:
    """rlvr_optim._cpu, compiling it first if setup.py did not build it. A failed compile
    is not retried in this process."""
    global _extension, _failure
    if _extension is None:
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            _extension = _prebuilt() or _build_and_import()
        except (RuntimeError, OSError) as exc:
            _failure = str(exc)
            raise
    return _extension


def auto_ready() -> bool:
    """Whether ``backend="auto"`` can run CPU tensors here (loading or compiling the
    extension if needed); when it cannot, warns once that the reference runs instead."""
    global _warned
    try:
        load_extension()
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
# Checks (on a call's first use only: see _Checked) and operands.
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


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    change_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """One AdamW step over a list of CPU tensors, in place, in one pass of OpenMP threads.

    Arguments and results as :func:`rlvr_optim.reference.adamw`. Params are float32,
    bfloat16 or float16 (float16 params and float16 change images run the header's
    element loop, not the hand-vectorized ones). Grads of another dtype than float32 or
    bfloat16 are converted to float32 first, as the reference does. A tensor whose param, states, master or bitmaps are not contiguous, or whose
    exp_avg, exp_avg_sq and max_exp_avg_sq differ in dtype or are neither float32 nor
    bfloat16, is stepped by the reference (same bits, slower). A call with the tensors of a
    recent checked call checks only the grads; tensors other than params and grads are
    recognized by identity alone, so give a state new storage as a new tensor object,
    never by assigning its ``.data`` between calls.
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad,
                    change_dtype=change_dtype)
    n = len(params)
    if n == 0:
        return
    stochastic = rounding == "stochastic"
    offsets = [int(o) for o in element_offsets] if element_offsets is not None else [0] * n
    mode = (stochastic, change_dtype)
    checked = _checked_calls.find(ops, offsets, mode)
    if checked is None or not checked.grads_fit(grads):
        checked = _Checked.of(ops, offsets, grads, mode)
        _checked_calls.add(checked, ops)
    ext = load_extension()

    scale = _one_element("grad_scale", grad_scale).to(torch.float32) \
        if grad_scale is not None else None
    skip = None
    if found_inf is not None:  # one fp32 that is nonzero exactly when the reference skips
        skip = _one_element("found_inf", found_inf)
        skip = skip if skip.dtype == torch.float32 else (skip != 0).to(torch.float32)
    scalars_cpu = scalars.detach().to("cpu").contiguous()
    keys_cpu = sr_keys.detach().to("cpu").contiguous() if stochastic else None

    if checked.fast:
        # Grads the loop cannot read directly become contiguous (float32) copies, kept
        # alive until the step returns.
        staged = [grads[i] if fit else grads[i].contiguous().float()
                  for i, fit in zip(checked.fast, checked.grad_fits)]
        rows = checked.rows
        rows[:, ROW["grad"]] = [g.data_ptr() for g in staged]
        ext.step(ext.ISAS[0], rows.ctypes.data, len(checked.fast), scalars_cpu.data_ptr(),
                 _address(keys_cpu), _address(scale), _address(skip), bool(maximize),
                 torch.get_num_threads())
    for i in checked.slow:  # the reference steps what the loops cannot read
        reference.step_tensor(ops.at(i), grads[i], reference.TensorStep(
            scalars_cpu[i], keys_cpu[i] if stochastic else None, offsets[i], maximize,
            grad_scale, found_inf, change_dtype))


class _Checked(CheckedCall):
    """A call whose tensors passed every check, kept (by :data:`_checked_calls`, without
    references to the tensors) so that a step with the same tensors at the same addresses
    checks only the gradients, in bulk. ``fast``: the tensors the compiled loop steps, with
    their table ``rows`` (grad field filled per call); ``slow``: those the reference steps;
    ``grad_fits``: per fast tensor, whether its grad is read as it is."""

    def __init__(self, statics, offsets, mode, fast, slow, rows, grads):
        super().__init__(statics)
        self.offsets = offsets
        self.mode = mode  # (stochastic, change_dtype)
        self.fast = fast
        self.slow = slow
        self.rows = rows
        self.grad_dtypes = [g.dtype for g in grads]
        self.grad_contiguous = [g.is_contiguous() for g in grads]
        self.grad_fits = [_grad_fits(grads[i]) for i in fast]

    @classmethod
    def of(cls, ops: Operands, offsets, grads, mode) -> "_Checked":
        slow = check_tensors(ops, grads, offsets, _POLICY)
        fast = sorted(set(range(ops.count)) - set(slow))
        rows = np.zeros((len(fast), len(ROW_FIELDS)), dtype=np.int64)
        for k, i in enumerate(fast):
            t = ops.at(i)
            row = rows[k]
            for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "freeze_mask",
                         "change_bitmap", "cumulative_bitmap"):
                row[ROW[name]] = _address(getattr(t, name))
            row[ROW["master"]] = _address(t.master if t.master is not None else t.remainder)
            row[ROW["counters"]] = _address(t.counter)
            row[ROW["numel"]] = t.param.numel()
            row[ROW["element_offset"]] = offsets[i]
            row[ROW["scalar_row"]] = i
            row[ROW["layout"]] = _layout(t, grads[i], *mode)
        return cls(ops, list(offsets), mode, fast, slow, rows, grads)

    def matches(self, statics, offsets, mode) -> bool:
        return offsets == self.offsets and mode == self.mode \
            and self.same_tensors(statics)

    def grads_fit(self, grads) -> bool:
        """The grads have the element counts, dtypes and contiguity the call was checked
        with (and are CPU tensors). False sends the call through the full checks."""
        try:
            return (len(grads) == len(self.numels)
                    and [g.dtype for g in grads] == self.grad_dtypes
                    and [g.numel() for g in grads] == self.numels
                    and [g.is_contiguous() for g in grads] == self.grad_contiguous
                    and not any(g.is_cuda for g in grads))
        except (AttributeError, TypeError):
            return False


def _grad_fits(grad: Tensor) -> bool:
    """Whether the loop reads this grad as it is (else a contiguous float32 copy)."""
    return grad.dtype in FLOATS and grad.is_contiguous()


def _layout(t: Operands, grad: Tensor, stochastic: bool, change_dtype: torch.dtype) -> int:
    """The layout code of a tensor's row (csrc/step_table.h)."""
    bf16 = torch.bfloat16
    param16 = t.param.dtype in reference.HALF_DTYPES
    on = {
        "param_bf16": t.param.dtype == bf16, "param_fp16": t.param.dtype == torch.float16,
        "image_fp16": not param16 and change_dtype == torch.float16,
        "grad_bf16": grad.dtype == bf16 and _grad_fits(grad),
        "state_bf16": t.exp_avg.dtype == bf16, "amsgrad": t.max_exp_avg_sq is not None,
        "master_fp32": t.master is not None, "remainder": t.remainder is not None,
        # fp32 params are stored exactly and ignore rounding, as in the reference
        "stochastic": stochastic and param16,
        "track": any(x is not None for x in (t.change_bitmap, t.cumulative_bitmap, t.counter)),
    }
    return sum(LAYOUT_BITS[name] for name, value in on.items() if value)


_checked_calls = CheckedCalls()
