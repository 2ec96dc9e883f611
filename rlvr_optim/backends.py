"""Backend selection. Every backend exposes ``adamw(...)`` with the keyword-only signature
of :func:`rlvr_optim.reference.adamw`, so the optimizer swaps them freely.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda")

# Why a backend cannot be used in this version, shown in the error users see.
_NOT_YET = {
    "triton": "the fused Triton kernels are not part of this version of rlvr_optim yet",
    "cuda": "the CUDA extension (csrc/) is not part of this version of rlvr_optim yet",
}


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}"
    return _NOT_YET.get(name)


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

    ``auto`` prefers cuda, then triton, on a GPU, and the reference elsewhere; today
    only the reference exists, so ``auto`` always picks it.
    """
    check_backend(name)
    if name in ("auto", "reference"):
        return reference
    raise AssertionError(f"backend {name!r} passed check_backend but has no module")
