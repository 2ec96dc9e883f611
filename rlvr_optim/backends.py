"""Backend selection. Every backend exposes ``adamw(...)`` with the keyword-only signature
of :func:`rlvr_optim.reference.adamw`, so the optimizer swaps them freely.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

def _triton_module() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("rlvr_optim.triton_kernels.adamw"), None
    except ImportError as exc:
        return None, f"Triton is not importable ({exc}); pip install triton"


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}"
    if name == "triton":
        return _triton_module()[1]
    if name == "cuda":
        from . import cuda_backend  # noqa: PLC0415 - touches no GPU

        return cuda_backend.unavailable_reason()
    if name == "cpu":
        from . import cpu_backend  # noqa: PLC0415

        return cpu_backend.unavailable_reason()
    return None


def check_backend(name: str) -> None:
    """Raise ValueError for an unknown backend, RuntimeError for an unavailable one."""
    if name not in BACKENDS:
        raise ValueError(unavailable_reason(name))
    reason = unavailable_reason(name)
    if reason is not None:
        available = [b for b in BACKENDS if unavailable_reason(b) is None]
        raise RuntimeError(
            f"backend {name!r} is not available: {reason}. Available: "
            f"{', '.join(map(repr, available))} (backend='auto' picks the fastest)."
        )


def select(name: str, device: torch.device) -> ModuleType:
    """The backend module that runs a step of tensors on ``device``.

    ``auto`` picks, for CUDA tensors, the CUDA extension if it is already built (it does
    not start a first-use compile), else the Triton kernels when Triton is importable; for
    CPU tensors the CPU extension (compiled on first use if setup.py could not), else the
    reference, with a warning once (on a CPU the Triton kernels only run in Triton's
    interpreter, which is for tests). ``cuda`` and ``cpu`` compile their extension on first
    use if setup.py could not; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    check_backend(name)
    if name == "reference":
        return reference
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from . import cpu_backend  # noqa: PLC0415

        if name == "cpu" or cpu_backend.auto_ready():
            return cpu_backend
        return reference
    if name == "cuda" or (name == "auto" and device.type == "cuda"):
        from . import cuda_backend  # noqa: PLC0415

        if name == "cuda" or cuda_backend.is_built():
            return cuda_backend
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        module, _ = _triton_module()
        if module is not None:
            return module
    return reference
