"""Per-param optimizer state: which tensors a group's options call for (their keys, shapes
and dtypes), their creation, the checks of existing state against the param and the
options, and loading a state dict (of rlvr_optim's optimizers or of torch's)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

from . import bitmaps, distributed
from .options import check_differentiable, check_param_options, follows_torch, normalize_options
from .options import OPTION_NAMES
from .table import COUNTER_NAMES

__all__ = ["MOMENT_KEYS", "TRACKING_KEYS", "check_state", "expected_state", "init_state",
           "load_state_dict", "per_shard"]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
TRACKING_KEYS = ("change_bitmap", "cumulative_bitmap", "change_counts")


def state_dtype(p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
    """The dtype of a param's moments: the group's ``state_dtype``, else the param's; a
    float16 param that the fused backends step keeps float32 moments (they keep no float16
    states)."""
    name = group["state_dtype"]
    if name is not None:
        return getattr(torch, name)
    if p.dtype == torch.float16 and not follows_torch(p, group):
        return torch.float32
    return p.dtype


def per_shard_shapes(p: Tensor) -> tuple[torch.Size, torch.Size]:
    """Shapes of a bitmap and of the counters of ``p`` as held in its state.

    Plain tensors: ``[ceil(numel / 8)]`` and ``[len(COUNTER_NAMES)]``. DTensor params hold
    them per local shard, as DTensors of one slot per rank (see :mod:`rlvr_optim.distributed`).
    """
    nbytes = bitmaps.bitmap_bytes(p.numel())
    ncounters = len(COUNTER_NAMES)
    layout = distributed.shard_layout(p)
    if layout is None:
        return torch.Size([nbytes]), torch.Size([ncounters])
    return (layout.global_shape(layout.bitmap_slot_bytes, nbytes),
            layout.global_shape(ncounters, ncounters))


def per_shard(p: Tensor, value: Tensor | None, what: str) -> Tensor | None:
    """The local plain tensor of a per-shard state (``what``: "bitmap" or "counters")."""
    if value is None or not distributed.is_dtensor(value):
        return value
    numel = distributed.local_tensor(p).numel()
    size = bitmaps.bitmap_bytes(numel) if what == "bitmap" else len(COUNTER_NAMES)
    return value.to_local()[:size]


def expected_state(p: Tensor, group: Mapping[str, Any]) -> dict[str, tuple]:
    """Key -> (shape, dtype) of every state tensor the group's options call for."""
    sd = state_dtype(p, group)
    out = {"exp_avg": (p.shape, sd), "exp_avg_sq": (p.shape, sd)}
    if group["amsgrad"]:
        out["max_exp_avg_sq"] = (p.shape, sd)
    if group["master_weights"] == "fp32":
        out["master"] = (p.shape, torch.float32)
    elif group["master_weights"] == "remainder":
        out["remainder"] = (p.shape, torch.int16)
    nbytes, ncounters = per_shard_shapes(p)
    if group["track_changes"] != "off":
        out["change_bitmap"] = (nbytes, torch.uint8)
        out["change_counts"] = (ncounters, torch.int64)
    if group["track_changes"] == "cumulative":
        out["cumulative_bitmap"] = (nbytes, torch.uint8)
    return out


def no_freeze_mask_message(p: Tensor, group: Mapping[str, Any], name: str) -> str:
    why = "its group has differentiable=True" if group["differentiable"] else f"it is {p.dtype}"
    return (
        f"param {name} cannot have a freeze mask: {why}, so torch's Adam code steps it, "
        "and only the float32 and bfloat16 params of non-differentiable groups are stepped "
        "by rlvr_optim's kernels, which apply freeze masks"
    )


def check_state(p: Tensor, group: Mapping[str, Any], state: Mapping, name: str,
                initialized: bool, loading: bool = False) -> None:
    """Errors for existing state that does not fit the param or its group's options: a
    param whose shape or (with ``state_dtype=None``, unless ``loading``, which casts the
    moments) dtype changed since its state was made is refused, as torch refuses to step
    it."""
    expected = expected_state(p, group)
    optional = set(TRACKING_KEYS)  # created on demand, dropped when tracking is off
    for key, value in state.items():
        if key in ("step", "freeze_mask"):
            continue
        if key not in expected:
            if key in optional:
                continue
            raise ValueError(
                f"param {name}: state has {key!r}, which the group's options "
                f"(master_weights={group['master_weights']!r}, amsgrad={group['amsgrad']}) "
                "do not use; load a state dict saved with the same options"
            )
        shape, dtype = expected[key]
        if not isinstance(value, Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"param {name}: state {key!r} has shape {got}, expected {tuple(shape)}: the "
                "param's shape changed since its state was made (as by p.data = "
                "p.data.view(...)), which torch's Adam refuses too; give the param back its "
                "shape, or clear its state (optimizer.state[param].clear()) to start it anew"
            )
        if key in MOMENT_KEYS:
            # A float16 param's torch-made (float16) moments are cast when its group
            # turns to the fused backends (float32 moments), as an option change casts.
            if (group["state_dtype"] is None and initialized and not loading
                    and value.dtype not in (p.dtype, dtype)):
                raise ValueError(
                    f"param {name} is {p.dtype} but its state {key!r} is {value.dtype}: the "
                    "param's dtype changed since its state was made (as by model.to(dtype)), "
                    "which torch's Adam refuses too; convert the model back, load a state dict "
                    "saved for this dtype, or clear its state (optimizer.state[param].clear()) "
                    "to start its moments anew"
                )
        elif value.dtype != dtype:
            raise ValueError(
                f"param {name}: state {key!r} has dtype {value.dtype}, expected {dtype}"
            )
    if initialized:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "remainder"):
            if key in expected and key not in state:
                raise ValueError(
                    f"param {name}: state lacks {key!r}, which the group's options need; it "
                    "was saved with other options (amsgrad / master_weights)"
                )
    if "freeze_mask" in state:
        if follows_torch(p, group):
            raise ValueError(no_freeze_mask_message(p, group, name))
        mask = state["freeze_mask"]
        if mask.dtype != torch.uint8 or mask.shape != per_shard_shapes(p)[0]:
            raise ValueError(f"param {name}: stored freeze mask does not fit the param")


def init_state(p: Tensor, group: Mapping[str, Any], state: dict, on_device: bool = False) -> None:
    """Create missing state tensors and drop tracking state the group no longer wants;
    moments of another dtype than ``state_dtype`` asks for (an option changed) are cast.

    The step count lives on the param's device with ``capturable`` / ``fused``, or when
    ``on_device`` (a GradScaler step: skipping on found_inf must not sync the host).
    """
    torch_code = follows_torch(p, group)
    if "step" not in state:
        if group["fused"]:
            # torch's own check and message (unsupported device such as meta, complex).
            _device_dtype_check_for_fused(p)
        on_device = on_device or group["capturable"] or group["fused"]
        # torch's code keeps a float64 count when that is the default dtype.
        dtype = torch.float32
        if torch_code and not group["fused"] and torch.get_default_dtype() == torch.float64:
            dtype = torch.float64
        state["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
    expected = expected_state(p, group)
    layout = distributed.shard_layout(p)
    for key, (shape, dtype) in expected.items():
        if key in state:
            if key in MOMENT_KEYS and state[key].dtype != dtype:
                state[key] = state[key].to(dtype)
            continue
        if torch_code and key in MOMENT_KEYS:  # torch's layout: strides of the param
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif key == "master":
            state[key] = p.detach().float().clone()
        elif layout is None:
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        elif key in TRACKING_KEYS:
            local = p.to_local()
            if key == "change_counts":
                size = slot = len(COUNTER_NAMES)
            else:
                size = bitmaps.bitmap_bytes(local.numel())
                slot = layout.bitmap_slot_bytes
            state[key] = layout.wrap(torch.zeros(size, dtype=dtype, device=local.device), slot)
        else:  # element-shaped: a DTensor with the param's placements
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    for key in TRACKING_KEYS:
        if key in state and key not in expected:
            del state[key]


def load_state_dict(opt, state_dict: dict[str, Any], load) -> None:
    """``opt.load_state_dict(state_dict)`` with torch's loader ``load`` (see
    :meth:`rlvr_optim.optimizer.RoundingAdam.load_state_dict`)."""
    state_dict = state_dict.copy()  # shallow, as torch's loader does before its hooks
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    pairs = []  # (saved id, param, merged group, name)
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size "
                "of optimizer's group"
            )
        merged = dict(opt.defaults)
        merged.update({k: v for k, v in saved.items() if k != "params"})
        merged.update(normalize_options({k: merged[k] for k in OPTION_NAMES}))
        check_differentiable(merged)
        for i, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            pairs.append((pid, p, merged, opt._param_name(gi, i)))
    saved_state = state_dict["state"]
    for pid, p, merged, name in pairs:
        check_param_options(p, merged, name)
        if pid in saved_state:
            st = saved_state[pid]
            # The loader casts moments to the dtype the options call for.
            check_state(p, merged, st, name, initialized="step" in st, loading=True)
    # A dict without freeze masks (torch's, or saved before masks were set) keeps the
    # masks set on this optimizer; a dict with masks brings its own.
    masks = {p: m for p in opt.state if (m := opt.state[p].get("freeze_mask")) is not None}
    # The hooks run here, around our checks and casts, so torch's loader must not run them.
    hooks = (opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks)
    opt._optimizer_load_state_dict_pre_hooks = type(hooks[0])()
    opt._optimizer_load_state_dict_post_hooks = type(hooks[1])()
    try:
        load(state_dict)
    finally:
        (opt._optimizer_load_state_dict_pre_hooks,
         opt._optimizer_load_state_dict_post_hooks) = hooks
    for p, mask in masks.items():
        opt.state[p].setdefault("freeze_mask", mask)
    for pid, p, merged, _ in pairs:
        if pid not in saved_state:
            continue
        restored = opt.state[p]
        expected = expected_state(p, merged)
        for key, value in saved_state[pid].items():
            if not isinstance(value, Tensor):
                continue
            if key == "step":
                # Same placement as torch, but never shared with the loaded dict.
                restored[key] = restored[key].clone()
                continue
            dtype = expected[key][1] if key in expected else value.dtype
            restored[key] = value.to(device=p.device, dtype=dtype, copy=True)
    opt._forget_plans()
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)
