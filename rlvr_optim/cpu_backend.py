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
from .cuda_backend import _cache_root
from .reference import check_arguments

__all__ = ["adamw", "auto_ready", "is_built", "load_extension", "unavailable_reason"]

# What this file expects of the extension (csrc/cpu_step.h, csrc/cpu_binding.cpp).
ABI_VERSION = 3
ROW_FIELDS = (
    "param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "freeze_mask",
    "change_bitmap", "cumulative_bitmap", "counters", "numel", "element_offset",
    "scalar_row", "layout",
)
_COL = {name: i for i, name in enumerate(ROW_FIELDS)}
LAYOUT_BITS = {"param_bf16": 1, "grad_bf16": 2, "state_bf16": 4, "amsgrad": 8, "master_fp32": 16,
               "remainder": 32, "stochastic": 64, "track": 128}
_FLOATS = (torch.float32, torch.bfloat16)

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


def _check(name: str, t: Tensor, dtypes: tuple | None, numel: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; the CPU backend takes {allowed}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: the CPU backend runs CPU tensors only; use "
                         "backend='auto', which picks a GPU backend for GPU tensors")


def _one_element(name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element tensor, got {got}")
    return t.detach().to("cpu").reshape(1)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _entry(values, i):
    return values[i] if values is not None else None


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
) -> None:
    """One AdamW step over a list of CPU tensors, in place, in one pass of OpenMP threads.

    Arguments and results as :func:`rlvr_optim.reference.adamw`. Params are float32 or
    bfloat16. Grads of another dtype are converted to float32 first, as the reference
    does. A tensor whose param, states, master or bitmaps are not contiguous, or whose
    exp_avg, exp_avg_sq and max_exp_avg_sq differ in dtype or are neither float32 nor
    bfloat16, is stepped by the reference (same bits, slower). A call with the tensors of a
    recent checked call checks only the grads; tensors other than params and grads are
    recognized by identity alone, so give a state new storage as a new tensor object,
    never by assigning its ``.data`` between calls.
    """
    check_arguments(params, scalars=scalars, max_exp_avg_sqs=max_exp_avg_sqs, masters=masters,
                    remainders=remainders, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad)
    n = len(params)
    if n == 0:
        return
    stochastic = rounding == "stochastic"
    offsets = [int(o) for o in element_offsets] if element_offsets is not None else [0] * n
    statics = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, masters,
               remainders, freeze_masks, change_bitmaps, cumulative_bitmaps, counters)
    checked = _checked_calls.find(statics, offsets, stochastic)
    if checked is None or not checked.grads_fit(grads):
        checked = _Checked.of(statics, offsets, grads, amsgrad, stochastic)
        _checked_calls.add(checked, statics)
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
        rows[:, _COL["grad"]] = [g.data_ptr() for g in staged]
        ext.step(ext.ISAS[0], rows.ctypes.data, len(checked.fast), scalars_cpu.data_ptr(),
                 _address(keys_cpu), _address(scale), _address(skip), bool(maximize),
                 torch.get_num_threads())
    if checked.slow:
        _reference_subset(checked.slow, params, grads, exp_avgs, exp_avg_sqs, scalars_cpu,
                          max_exp_avg_sqs, masters, remainders, freeze_masks, change_bitmaps,
                          cumulative_bitmaps, counters, rounding, keys_cpu, offsets, amsgrad,
                          maximize, grad_scale, found_inf)


def _reference_subset(index, params, grads, exp_avgs, exp_avg_sqs, scalars, max_exp_avg_sqs,
                      masters, remainders, freeze_masks, change_bitmaps, cumulative_bitmaps,
                      counters, rounding, sr_keys, offsets, amsgrad, maximize, grad_scale,
                      found_inf):
    """The tensors ``index`` of the call, stepped by the reference."""

    def pick(values):
        return None if values is None else [values[i] for i in index]

    rows = torch.tensor(index, dtype=torch.int64)
    reference.adamw(
        pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), scalars=scalars[rows],
        max_exp_avg_sqs=pick(max_exp_avg_sqs) if amsgrad else None, masters=pick(masters),
        remainders=pick(remainders), freeze_masks=pick(freeze_masks),
        change_bitmaps=pick(change_bitmaps), cumulative_bitmaps=pick(cumulative_bitmaps),
        counters=pick(counters), rounding=rounding,
        sr_keys=sr_keys[rows] if sr_keys is not None else None,
        element_offsets=pick(offsets), amsgrad=amsgrad, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


class _Checked(CheckedCall):
    """A call whose tensors passed every check, kept (by :data:`_checked_calls`, without
    references to the tensors) so that a step with the same tensors at the same addresses
    checks only the gradients, in bulk. ``fast``: the tensors the compiled loop steps, with
    their table ``rows`` (grad column filled per call); ``slow``: those the reference steps;
    ``grad_fits``: per fast tensor, whether its grad is read as it is."""

    def __init__(self, statics, offsets, stochastic, fast, slow, rows, grads):
        super().__init__(statics)
        self.offsets = offsets
        self.stochastic = stochastic
        self.fast = fast
        self.slow = slow
        self.rows = rows
        self.grad_dtypes = [g.dtype for g in grads]
        self.grad_contiguous = [g.is_contiguous() for g in grads]
        self.grad_fits = [_grad_fits(grads[i]) for i in fast]

    @classmethod
    def of(cls, statics, offsets, grads, amsgrad, stochastic) -> "_Checked":
        (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, remainders, freeze_masks,
         change_bitmaps, cumulative_bitmaps, counters) = statics
        fast, slow = [], []
        lines = []
        for i, p in enumerate(params):
            numel = p.numel()
            nbytes = (numel + 7) // 8
            _check(f"params[{i}]", p, _FLOATS, numel)
            _check(f"grads[{i}]", grads[i], None, numel)
            if not (grads[i].is_floating_point() and not grads[i].is_complex()):
                raise TypeError(f"grads[{i}] has dtype {grads[i].dtype}; a gradient must be a "
                                "real floating-point tensor")
            states = [("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
            vmax = max_exp_avg_sqs[i] if amsgrad else None
            if vmax is not None:
                states.append(("max_exp_avg_sqs", vmax))
            for name, state in states:
                _check(f"{name}[{i}]", state, None, numel)
            master, remainder = _entry(masters, i), _entry(remainders, i)
            if master is not None:
                _check(f"masters[{i}]", master, (torch.float32,), numel)
            if remainder is not None:
                _check(f"remainders[{i}]", remainder, (torch.int16,), numel)
            bitmaps = {name: _entry(values, i) for name, values in (
                ("freeze_mask", freeze_masks), ("change_bitmap", change_bitmaps),
                ("cumulative_bitmap", cumulative_bitmaps))}
            for name, bitmap in bitmaps.items():
                if bitmap is not None:
                    _check(f"{name}s[{i}]", bitmap, (torch.uint8,), nbytes)
            counter = _entry(counters, i)
            if counter is not None:
                _check(f"counters[{i}]", counter, (torch.int64,), 3)
            if not 0 <= offsets[i] <= 2**63 - 1 - numel:
                raise ValueError(
                    f"element_offsets[{i}] must be >= 0 and fit in int64, got {offsets[i]}")
            state_dtypes = {s.dtype for _, s in states}
            arrays = [p, *(s for _, s in states), master, remainder, *bitmaps.values(), counter]
            if len(state_dtypes) != 1 or not state_dtypes <= set(_FLOATS) or not all(
                    t is None or t.is_contiguous() for t in arrays):
                slow.append(i)
                continue
            layout = _layout(p.dtype, grads[i], exp_avgs[i].dtype, vmax is not None,
                             master is not None, remainder is not None, stochastic,
                             counter is not None or bitmaps["change_bitmap"] is not None
                             or bitmaps["cumulative_bitmap"] is not None)
            lines.append([p.data_ptr(), 0, exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                          _address(vmax), _address(master if master is not None else remainder),
                          _address(bitmaps["freeze_mask"]), _address(bitmaps["change_bitmap"]),
                          _address(bitmaps["cumulative_bitmap"]), _address(counter), numel,
                          offsets[i], i, layout])
            fast.append(i)
        rows = np.array(lines, dtype=np.int64).reshape(len(fast), len(ROW_FIELDS))
        return cls(statics, list(offsets), stochastic, fast, slow, rows, grads)

    def matches(self, statics, offsets, stochastic) -> bool:
        return offsets == self.offsets and stochastic == self.stochastic \
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
    return grad.dtype in _FLOATS and grad.is_contiguous()


def _layout(param_dtype, grad, state_dtype, amsgrad, fp32_master, remainder, stochastic,
            track) -> int:
    """The layout code of a row (csrc/cpu_step.h)."""
    bf16 = torch.bfloat16
    on = {
        "param_bf16": param_dtype == bf16, "grad_bf16": grad.dtype == bf16 and _grad_fits(grad),
        "state_bf16": state_dtype == bf16, "amsgrad": amsgrad, "master_fp32": fp32_master,
        "remainder": remainder,
        # fp32 params are stored exactly and ignore rounding, as in the reference
        "stochastic": stochastic and param_dtype == bf16, "track": track,
    }
    return sum(LAYOUT_BITS[name] for name, value in on.items() if value)


_checked_calls = CheckedCalls()
