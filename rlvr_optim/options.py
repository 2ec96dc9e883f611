"""The optimizers' options and their checks: rlvr_optim's per-group options (normalized as
the constructor takes them, whether given there, per group, or set later in
``param_groups``), torch's hyperparameter checks, and which params torch's own code steps.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import distributed

__all__ = ["FUSED_GRAD_DTYPES", "MASTER_WEIGHTS", "PARAM_DTYPES", "ROUNDINGS", "TRACK_CHANGES", "asks_for_kernels",
           "check_differentiable", "check_hyperparameters", "check_param_options",
           "follows_torch", "normalize_options", "normalize_group"]

ROUNDINGS = ("nearest", "stochastic")
MASTER_WEIGHTS = (None, "fp32", "remainder")
TRACK_CHANGES = ("off", "step", "cumulative")
PARAM_DTYPES = (torch.float32, torch.bfloat16)
PARAM_DTYPE_SET = frozenset(PARAM_DTYPES)
FUSED_GRAD_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))
"""Gradient dtypes the fused backends read (float16: of float16 params, see
:func:`follows_torch`)."""
_STATE_DTYPES = {
    None: None,
    "float32": "float32",
    "fp32": "float32",
    torch.float32: "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    torch.bfloat16: "bfloat16",
}
# The 16-bit image an fp32 param's change flags compare (float16: for trainers that keep
# fp32 weights and serve float16).
_CHANGE_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    torch.bfloat16: "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    torch.float16: "float16",
}
OPTION_NAMES = ("rounding", "master_weights", "state_dtype", "track_changes", "seed",
                "change_dtype")
"""rlvr_optim's per-group options (beside torch's)."""
# What a differentiable group must leave at the default: torch's code steps it, and
# autograd through a bf16 rounding mode, a master copy or a bitmap is not defined.
_TORCH_ONLY_DEFAULTS = {"rounding": "nearest", "master_weights": None, "state_dtype": None,
                        "track_changes": "off"}


def _normalize_track_changes(value: Any) -> str:
    if value is None or value is False:
        return "off"
    if value is True:
        return "step"
    if value in TRACK_CHANGES:
        return value
    raise ValueError(
        f"track_changes must be one of {TRACK_CHANGES} (or None/False/True), got {value!r}"
    )


def normalize_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check and canonicalize rlvr_optim's per-group options (in place, returns it)."""
    rounding = options["rounding"]
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    master = options["master_weights"]
    if master not in MASTER_WEIGHTS:
        raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {master!r}")
    if master == "remainder" and rounding != "nearest":
        raise ValueError(
            "master_weights='remainder' stores the bf16 half by nearest rounding (ties away "
            "from zero) so that the int16 remainder rebuilds the exact fp32 value; "
            "rounding='stochastic' cannot be combined with it (use master_weights='fp32')"
        )
    try:
        options["state_dtype"] = _STATE_DTYPES[options["state_dtype"]]
    except (KeyError, TypeError):
        raise ValueError(
            "state_dtype must be None (the param's dtype), torch.float32 or torch.bfloat16, "
            f"got {options['state_dtype']!r}"
        ) from None
    options["track_changes"] = _normalize_track_changes(options["track_changes"])
    try:
        options["change_dtype"] = _CHANGE_DTYPES[options["change_dtype"]]
    except (KeyError, TypeError):
        raise ValueError(
            "change_dtype must be torch.bfloat16 or torch.float16 (the 16-bit image whose "
            f"bits an fp32 param's change bitmap compares), got {options['change_dtype']!r}"
        ) from None
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return options


def normalize_group(group: dict[str, Any]) -> tuple:
    """Normalize a live group's options in place (a value set through ``param_groups`` is
    taken as the constructor takes it, e.g. ``state_dtype=torch.bfloat16``) and return
    them as a tuple, in the order of :data:`OPTION_NAMES`."""
    options = normalize_options({k: group[k] for k in OPTION_NAMES})
    for k, v in options.items():
        if group[k] is not v and group[k] != v:
            group[k] = v
    return tuple(options.values())


def asks_for_kernels(group: Mapping[str, Any]) -> bool:
    """Whether a group sets an option that changes how a param is stepped and only the
    fused backends have (stochastic rounding, master weights, a state dtype): its float16
    params then go through them. Change tracking alone does not: it observes, and leaves
    torch's float16 results as they are."""
    return (group["rounding"] != "nearest" or group["master_weights"] is not None
            or group["state_dtype"] is not None)


def follows_torch(p: Tensor, group: Mapping[str, Any]) -> bool:
    """Whether ``p`` is stepped by torch's own Adam code: its group asks for autograd
    through the step, or no mode of ours concerns its dtype: float64, complex, and float16
    unless the group asks for the fused backends (:func:`asks_for_kernels`), so that
    float16 params with default options stay torch's."""
    if group["differentiable"]:
        return True
    if p.dtype in PARAM_DTYPE_SET:
        return False
    return not (p.dtype == torch.float16 and asks_for_kernels(group))


def check_differentiable(group: Mapping[str, Any]) -> None:
    """Errors for a ``differentiable=True`` group that sets an option torch's code lacks."""
    if not group["differentiable"]:
        return
    for key, default in _TORCH_ONLY_DEFAULTS.items():
        if group[key] != default:
            raise ValueError(
                f"differentiable=True cannot be combined with {key}={group[key]!r}: such a group "
                f"is stepped by torch's Adam code, which has no {key}; leave it at "
                f"{default!r}, or put the params that need it in a group without differentiable"
            )


def check_hyperparameters(group: Mapping[str, Any]) -> None:
    """torch.optim.Adam's checks and messages, applied to every group."""
    lr, eps, betas, weight_decay = group["lr"], group["eps"], group["betas"], group["weight_decay"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    # A device lr is checked once, by torch's constructor: comparing it in every step would
    # sync the host, which a CUDA graph capture forbids.
    if not (isinstance(lr, Tensor) and lr.device.type != "cpu") and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_param_options(p: Tensor, group: Mapping[str, Any], name: str) -> None:
    """Errors for a param whose dtype does not fit its group's options."""
    half = p.dtype in (torch.bfloat16, torch.float16)
    if group["master_weights"] == "remainder" and p.dtype == torch.float16:
        raise ValueError(
            f"param {name}: master_weights='remainder' rebuilds fp32 as (bf16 bits << 16) + "
            "an int16, which holds for bfloat16 (the top half of fp32) only; use "
            "master_weights='fp32' for float16 params"
        )
    if group["master_weights"] is not None and not half:
        raise ValueError(
            f"param {name}: master_weights={group['master_weights']!r} needs a bfloat16 "
            f"param (or, for 'fp32', a float16 one), this one is {p.dtype}"
        )
    if group["rounding"] == "stochastic" and not half:
        raise ValueError(
            f"param {name}: rounding='stochastic' rounds the 16-bit store of a param, but "
            f"this param is {p.dtype} and has none; make it bfloat16 or float16 or use "
            "rounding='nearest'"
        )
    if group["state_dtype"] is not None and follows_torch(p, group):
        raise ValueError(
            f"param {name}: state_dtype={group['state_dtype']!r} applies to float32 and "
            f"bfloat16 params; this {p.dtype} param is stepped by torch's Adam code, whose "
            "states keep the param's dtype; put it in a param group with state_dtype=None"
        )
    distributed.shard_layout(p, name)  # raises for placements we cannot step
