"""``rlvr_optim.AdamW``: torch's AdamW, with bf16 rounding made visible and controllable.

The class validates and gathers tensors and picks a backend; the arithmetic lives in the
backends (:mod:`rlvr_optim.reference` is the specification).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.optimizer import _device_dtype_check_for_fused

from . import backends, bitmaps, distributed, reference
from .plan import OperandList, ScalarRows, read_gradients, same_items

__all__ = ["AdamW", "change_log_from_rows", "format_table"]

ROUNDINGS = ("nearest", "stochastic")
MASTER_WEIGHTS = (None, "fp32", "remainder")
TRACK_CHANGES = ("off", "step", "cumulative")
PARAM_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_DTYPE_SET = frozenset(PARAM_DTYPES)
_STATE_DTYPES = {
    None: None,
    "float32": "float32",
    "fp32": "float32",
    torch.float32: "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    torch.bfloat16: "bfloat16",
}
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_TRACKING_KEYS = ("change_bitmap", "cumulative_bitmap", "change_counts")
# What a differentiable group must leave at the default: torch's AdamW code steps it, and
# autograd through a bf16 rounding mode, a master copy or a bitmap is not defined.
_TORCH_ONLY_DEFAULTS = {"rounding": "nearest", "master_weights": None, "state_dtype": None,
                        "track_changes": "off"}
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def _normalize_options(options: dict[str, Any]) -> dict[str, Any]:
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
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return options


def _follows_torch(p: Tensor, group: Mapping[str, Any]) -> bool:
    """Whether ``p`` is stepped by torch's own AdamW code: no bf16 mode concerns its dtype
    (float16, float64, complex), or its group asks for autograd through the step."""
    return group["differentiable"] or p.dtype not in _PARAM_DTYPE_SET


def _check_differentiable(group: Mapping[str, Any]) -> None:
    """Errors for a ``differentiable=True`` group that sets an option torch's code lacks."""
    if not group["differentiable"]:
        return
    for key, default in _TORCH_ONLY_DEFAULTS.items():
        if group[key] != default:
            raise ValueError(
                f"differentiable=True cannot be combined with {key}={group[key]!r}: such a group "
                f"is stepped by torch's AdamW code, which has no {key}; leave it at "
                f"{default!r}, or put the params that need it in a group without differentiable"
            )


def _stored_bits(t: Tensor) -> Tensor:
    """The bit patterns of ``t`` as integers of its element size (a complex element: its real
    and imaginary parts along a last dimension of 2)."""
    t = distributed.local_tensor(t)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_BITS_DTYPES[t.element_size()])


def _check_hyperparameters(group: Mapping[str, Any]) -> None:
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


class _Plan(NamedTuple):
    """One group's checked params and the operand lists of its steps (see
    ``AdamW._make_plan``)."""

    options: tuple
    params: list[Tensor]
    states: list[dict]
    plain: bool  # no DTensor params
    step_buffer: Tensor | None  # the group's step counts, when they are views of it
    steps_on_device: bool
    backend: Any
    local_params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] | None
    masters: list[Tensor] | None
    remainders: list[Tensor] | None
    freeze_masks: list[Tensor | None]
    change_bitmaps: list[Tensor] | None
    cumulative_bitmaps: list[Tensor] | None
    counters: list[Tensor] | None
    element_offsets: list[int]
    keys: Tensor | None
    whole_group: bool  # every param of the group is in the plan
    scalar_rows: ScalarRows | None  # with a step buffer: the scalars of its steps
    sr_keys: Callable  # stochastic_rounding_keys(seed, steps, tensor keys) on their device
    # [Gradients.key] of the latest grads whose dtypes passed (a dtype change changes it)
    grads_seen: list


class AdamW(torch.optim.AdamW):
    """Drop-in ``torch.optim.AdamW`` with controllable bf16 rounding and change tracking.

    The positional and keyword arguments of ``torch.optim.AdamW`` keep their meaning and
    defaults; with none of the options below set, results match ``torch.optim.AdamW``
    (fp32 math in the order of torch's fused kernel). float32 and bfloat16 params go
    through this package's fused backends, for which ``foreach`` and ``fused`` change
    nothing. Params that no bf16 mode concerns (float16, float64, complex) and every param
    of a ``differentiable=True`` group are stepped by torch's own AdamW code with the
    group's options (``foreach``, ``fused``, ``capturable``, ...), so they behave as under
    ``torch.optim.AdamW``, autograd included; their states have torch's keys and dtypes.
    For them ``rounding="stochastic"``, ``master_weights`` (both need a bf16 store),
    ``state_dtype`` and freeze masks raise; a differentiable group also refuses
    ``track_changes`` and a ``backend`` other than ``"auto"``. With a ``GradScaler`` and
    without ``fused=True`` their step reads ``found_inf`` on the host (one sync), as the
    scaler itself does for torch's for-loop AdamW.

    Keyword-only options (each may also be set per param group, except ``freeze_masks``
    and ``backend``):
        rounding: how a bf16 param is stored: ``"nearest"`` (round to nearest even,
            default) or ``"stochastic"`` (unbiased; needs bf16 params).
        master_weights: ``None`` (default), ``"fp32"`` (fp32 copy, bf16 params only) or
            ``"remainder"`` (int16 remainder beside the bf16 param that rebuilds the exact
            fp32 value; the bf16 half is rounded to nearest, ties away from zero).
        state_dtype: dtype of exp_avg / exp_avg_sq: ``None`` (the param's, as torch),
            ``torch.float32`` or ``torch.bfloat16``.
        track_changes: ``"off"`` (default), ``"step"`` (per-step change bitmap and
            counters) or ``"cumulative"`` (also the OR of all steps' bitmaps). For float16,
            float64 and complex params a bit says that the stored value changed: its own
            bits (either part of a complex element) differ after the step, so ``bf16
            changed`` and ``fp32 moved`` both count those elements. They are found by
            comparing against a copy taken before the step (one copy of each such param
            per step), not inside a kernel.
        seed: seed of the stochastic rounding stream (default 0).
        freeze_masks: ``{param: mask}``; see :meth:`set_freeze_mask`.
        backend: ``"auto"`` (default), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``;
            it steps the float32 and bfloat16 params.

    DTensor params (FSDP2 ``fully_shard``: ``Shard(0)`` or ``Replicate()`` on a 1-D mesh)
    step on their local shards, with stochastic rounding keyed by each element's global
    index, so N ranks store the bits of one; bitmaps and counters are then per local shard
    (:mod:`rlvr_optim.distributed` sums them over ranks).

    Results (device tensors; reading them does not sync until you call ``.tolist()``):
    :meth:`change_bitmap`, :meth:`cumulative_bitmap`, :meth:`change_counts`; for the
    whole model :meth:`change_summary` and :meth:`change_log` (these sync once).
    """

    # Our step unscales and skips on found_inf itself (GradScaler's contract). A class
    # attribute, unlike torch's, so that deep copies and unpickled optimizers keep it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        track_changes: str | bool | None = "off",
        seed: int = 0,
        freeze_masks: Mapping[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> None:
        backends.check_backend(backend)
        if differentiable and backend != "auto":
            raise ValueError(
                f"differentiable=True cannot be combined with backend={backend!r}: torch's "
                "AdamW code steps every param then; leave backend='auto'"
            )
        self._option_defaults = _normalize_options(
            {
                "rounding": rounding,
                "master_weights": master_weights,
                "state_dtype": state_dtype,
                "track_changes": track_changes,
                "seed": seed,
            }
        )
        self.backend = backend
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self.defaults.update(self._option_defaults)
        if freeze_masks:
            packed = {p: self._packed_freeze_mask(p, m) for p, m in freeze_masks.items()}
            for p, mask in packed.items():
                self._set_packed_freeze_mask(p, mask)

    # ---------------------------------------------------------------- groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        options = {k: group.get(k, v) for k, v in self._option_defaults.items()}
        group.update(_normalize_options(options))
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        _check_hyperparameters(group)
        _check_differentiable(group)
        params = group["params"]
        if isinstance(params, set):  # torch's error: a set would be listed here in any order
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            tensor = p[1] if isinstance(p, tuple) else p
            name = repr(p[0]) if isinstance(p, tuple) else f"{i} of the new group"
            if isinstance(tensor, Tensor):
                self._check_param_options(tensor, group, name)
        group["params"] = params
        super().add_param_group(group)
        self._forget_plans()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self.backend
        state["_option_defaults"] = self._option_defaults
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forget_plans()
        # load_state_dict passes only state and groups; a torch AdamW dict has none of our
        # options, so its groups take this optimizer's defaults.
        for group in self.param_groups:
            for k, v in self._option_defaults.items():
                group.setdefault(k, v)

    def _param_name(self, group_index: int, index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names is not None:
            return repr(names[index])
        return f"group {group_index} param {index}"

    def _names(self) -> dict[Tensor, str]:
        out = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                out[p] = names[i] if names is not None else f"group{gi}.param{i}"
        return out

    @staticmethod
    def _check_param_options(p: Tensor, group: Mapping[str, Any], name: str) -> None:
        """Errors for a param whose dtype does not fit its group's options."""
        if group["master_weights"] is not None and p.dtype != torch.bfloat16:
            raise ValueError(
                f"param {name}: master_weights={group['master_weights']!r} needs a bfloat16 "
                f"param, this one is {p.dtype}"
            )
        if group["rounding"] == "stochastic" and p.dtype != torch.bfloat16:
            raise ValueError(
                f"param {name}: rounding='stochastic' rounds the bf16 store of a param, but this "
                f"param is {p.dtype} and has none; make it bfloat16 or use rounding='nearest'"
            )
        if group["state_dtype"] is not None and _follows_torch(p, group):
            raise ValueError(
                f"param {name}: state_dtype={group['state_dtype']!r} applies to float32 and "
                f"bfloat16 params; this {p.dtype} param is stepped by torch's AdamW code, whose "
                "states keep the param's dtype; put it in a param group with state_dtype=None"
            )
        distributed.shard_layout(p, name)  # raises for placements we cannot step

    @staticmethod
    def _state_dtype(p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
        name = group["state_dtype"]
        return p.dtype if name is None else getattr(torch, name)

    def _expected_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, tuple]:
        """Key -> (shape, dtype) of every state tensor the group's options call for."""
        sd = self._state_dtype(p, group)
        out = {"exp_avg": (p.shape, sd), "exp_avg_sq": (p.shape, sd)}
        if group["amsgrad"]:
            out["max_exp_avg_sq"] = (p.shape, sd)
        if group["master_weights"] == "fp32":
            out["master"] = (p.shape, torch.float32)
        elif group["master_weights"] == "remainder":
            out["remainder"] = (p.shape, torch.int16)
        nbytes, ncounters = self._per_shard_shapes(p)
        if group["track_changes"] != "off":
            out["change_bitmap"] = (nbytes, torch.uint8)
            out["change_counts"] = (ncounters, torch.int64)
        if group["track_changes"] == "cumulative":
            out["cumulative_bitmap"] = (nbytes, torch.uint8)
        return out

    @staticmethod
    def _per_shard_shapes(p: Tensor) -> tuple[torch.Size, torch.Size]:
        """Shapes of a bitmap and of the counters of ``p`` as held in its state.

        Plain tensors: ``[ceil(numel / 8)]`` and ``[3]``. DTensor params hold them per local
        shard, as DTensors of one slot per rank (see :mod:`rlvr_optim.distributed`).
        """
        nbytes = bitmaps.bitmap_bytes(p.numel())
        ncounters = len(reference.COUNTER_NAMES)
        layout = distributed.shard_layout(p)
        if layout is None:
            return torch.Size([nbytes]), torch.Size([ncounters])
        return (layout.global_shape(layout.bitmap_slot_bytes, nbytes),
                layout.global_shape(ncounters, ncounters))

    @staticmethod
    def _per_shard(p: Tensor, value: Tensor | None, what: str) -> Tensor | None:
        """The local plain tensor of a per-shard state (``what``: "bitmap" or "counters")."""
        if value is None or not distributed.is_dtensor(value):
            return value
        numel = distributed.local_tensor(p).numel()
        size = bitmaps.bitmap_bytes(numel) if what == "bitmap" else len(reference.COUNTER_NAMES)
        return value.to_local()[:size]

    def _check_state(self, p: Tensor, group: Mapping[str, Any], state: Mapping, name: str,
                     initialized: bool) -> None:
        """Errors for existing state that does not fit the param or its group's options."""
        expected = self._expected_state(p, group)
        optional = set(_TRACKING_KEYS)  # created on demand, dropped when tracking is off
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
                    f"param {name}: state {key!r} has shape {got}, expected {tuple(shape)}"
                )
            if value.dtype != dtype and key not in _MOMENT_KEYS:
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
            if _follows_torch(p, group):
                raise ValueError(self._no_freeze_mask_message(p, group, name))
            mask = state["freeze_mask"]
            if mask.dtype != torch.uint8 or mask.shape != self._per_shard_shapes(p)[0]:
                raise ValueError(f"param {name}: stored freeze mask does not fit the param")

    def _init_state(self, p: Tensor, group: Mapping[str, Any], state: dict,
                    on_device: bool = False) -> None:
        """Create missing state tensors and drop tracking state the group no longer wants.

        The step count lives on the param's device with ``capturable`` / ``fused``, or when
        ``on_device`` (a GradScaler step: skipping on found_inf must not sync the host).
        """
        torch_code = _follows_torch(p, group)
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
        expected = self._expected_state(p, group)
        layout = distributed.shard_layout(p)
        for key, (shape, dtype) in expected.items():
            if key in state:
                if key in _MOMENT_KEYS and state[key].dtype != dtype:
                    state[key] = state[key].to(dtype)
                continue
            if torch_code and key in _MOMENT_KEYS:  # torch's layout: strides of the param
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif key == "master":
                state[key] = p.detach().float().clone()
            elif layout is None:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
            elif key in _TRACKING_KEYS:
                local = p.to_local()
                if key == "change_counts":
                    size = slot = len(reference.COUNTER_NAMES)
                else:
                    size = bitmaps.bitmap_bytes(local.numel())
                    slot = layout.bitmap_slot_bytes
                state[key] = layout.wrap(torch.zeros(size, dtype=dtype, device=local.device), slot)
            else:  # element-shaped: a DTensor with the param's placements
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        for key in _TRACKING_KEYS:
            if key in state and key not in expected:
                del state[key]

    # ---------------------------------------------------------------- freeze masks

    def _find(self, p: Tensor) -> tuple[int, int]:
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return gi, i
        raise ValueError("that tensor is not a param of this optimizer")

    @staticmethod
    def _no_freeze_mask_message(p: Tensor, group: Mapping[str, Any], name: str) -> str:
        why = ("its group has differentiable=True" if group["differentiable"]
               else f"it is {p.dtype}")
        return (
            f"param {name} cannot have a freeze mask: {why}, so torch's AdamW code steps it, "
            "and only the float32 and bfloat16 params of non-differentiable groups are stepped "
            "by rlvr_optim's kernels, which apply freeze masks"
        )

    @staticmethod
    def _check_mask_shape(mask: Tensor, shape: torch.Size, name: str) -> None:
        """A bool mask has the param's shape, or is flat with its element count."""
        numel = math.prod(shape)
        if mask.shape == shape or (mask.dim() == 1 and mask.numel() == numel):
            return
        if mask.numel() == numel:
            raise ValueError(
                f"freeze mask for param {name} has shape {tuple(mask.shape)}, the param has shape "
                f"{tuple(shape)}; pass a mask of the param's shape, or a flat one of "
                f"{numel} elements"
            )

    def _packed_freeze_mask(self, p: Tensor, mask: Tensor | None) -> Tensor | None:
        gi, i = self._find(p)
        name = self._param_name(gi, i)
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"freeze mask for param {name} must be a tensor, got {type(mask).__name__}")
        if _follows_torch(p, self.param_groups[gi]):
            raise ValueError(self._no_freeze_mask_message(p, self.param_groups[gi], name))
        layout = distributed.shard_layout(p, name)
        local = distributed.local_tensor(p)
        if layout is not None and distributed.is_dtensor(mask):
            if tuple(mask.placements) != tuple(p.placements) or mask.shape != p.shape:
                raise ValueError(
                    f"DTensor freeze mask for param {name} must have the param's shape "
                    f"{tuple(p.shape)} and placements {tuple(p.placements)}, got "
                    f"{tuple(mask.shape)} and {tuple(mask.placements)}"
                )
            mask = mask.to_local()
        elif layout is not None and mask.dtype == torch.bool:
            self._check_mask_shape(mask, p.shape, name)
            if mask.numel() != p.numel():
                raise ValueError(
                    f"freeze mask for param {name} has {mask.numel()} elements, the param has "
                    f"{p.numel()} (shape {tuple(p.shape)})"
                )
            # A whole-tensor mask: keep the range of the local shard.
            start = layout.element_offset
            mask = mask.reshape(-1)[start : start + local.numel()]
        numel = local.numel()
        nbytes = bitmaps.bitmap_bytes(numel)
        what = "the local shard has" if layout is not None else "the param has"
        if mask.dtype == torch.bool:
            self._check_mask_shape(mask, local.shape, name)
            if mask.numel() != numel:
                raise ValueError(
                    f"freeze mask for param {name} has {mask.numel()} elements, {what} "
                    f"{numel} (shape {tuple(local.shape)})"
                )
            return bitmaps.pack(mask).to(local.device)
        if mask.dtype == torch.uint8:
            if mask.dim() != 1 or mask.numel() != nbytes:
                raise ValueError(
                    f"packed freeze mask for param {name} must be a 1-D uint8 tensor of {nbytes} "
                    f"bytes (ceil({numel} / 8)), got shape {tuple(mask.shape)}"
                )
            # Padding bits past numel stay zero, as in every bitmap of this package.
            return bitmaps.pack(bitmaps.unpack(mask, numel)).to(local.device)
        raise ValueError(
            f"freeze mask for param {name} must be a bool tensor of the param's shape "
            f"(True = trained) or a packed uint8 bitmap, got dtype {mask.dtype}"
        )

    def _set_packed_freeze_mask(self, p: Tensor, packed: Tensor | None) -> None:
        self._forget_plans()
        layout = distributed.shard_layout(p)
        if packed is None:
            self.state[p].pop("freeze_mask", None)
        elif layout is None:
            self.state[p]["freeze_mask"] = packed
        else:
            self.state[p]["freeze_mask"] = layout.wrap(packed, layout.bitmap_slot_bytes)

    def set_freeze_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Train only part of ``param``.

        Args:
            param: a param of this optimizer.
            mask: bool tensor of the param's shape, or flat with its element count (True =
                trained, False = frozen: param, states and master stay bit-identical; a mask
                of another shape is refused), or a packed uint8
                bitmap of ``ceil(numel / 8)`` bytes (:mod:`rlvr_optim.bitmaps` format), or
                None to train every element again. For a DTensor param: a bool mask of the
                whole tensor (plain, or a DTensor with the param's placements), or the
                packed bitmap of the local shard.
        """
        self._set_packed_freeze_mask(param, self._packed_freeze_mask(param, mask))

    def freeze_mask(self, param: Tensor) -> Tensor | None:
        """The packed freeze mask of ``param`` (bit 1 = trained; of the local shard for a
        DTensor param), or None."""
        return self._per_shard(param, self.state.get(param, {}).get("freeze_mask"), "bitmap")

    # ---------------------------------------------------------------- the step

    def _forget_plans(self) -> None:
        """Drop the cached step plans: the next step checks everything again."""
        self.__dict__.pop("_plans", None)

    def _options_key(self, group: Mapping[str, Any]) -> tuple:
        """What a plan depends on besides its params and their state: the group's options
        (checked and canonical) and the identity and size of ``self.state``."""
        options = _normalize_options({k: group[k] for k in self._option_defaults})
        return (*options.values(), group["amsgrad"], group["capturable"], group["fused"],
                group["differentiable"], self.backend, id(self.state), len(self.state))

    def _cached_plan(self, group_index: int, options: tuple,
                     on_device: bool) -> tuple[_Plan, list[Tensor]] | None:
        """The group's plan and this step's grads if the plan still holds: same options,
        same params with gradients, in the same order, and every gradient a dense
        float32/bfloat16 tensor (anything else goes through the full checks, which name
        the param). A plan holds only params of the fused backends, so a group that also
        has params for torch's code (float16, float64, complex) with gradients takes the
        full checks in every step.

        A plan of the whole group costs one pass over the grads: they are read with their
        data pointers and dtypes (:func:`rlvr_optim.plan.read_gradients`, which fails on a
        missing or sparse grad), and the backend reuses that reading."""
        plan = self.__dict__.get("_plans", {}).get(group_index)
        if plan is None or plan.options != options or (on_device and not plan.steps_on_device):
            return None
        group_params = self.param_groups[group_index]["params"]
        if plan.whole_group:
            if not same_items(group_params, plan.params):
                return None
            grads = read_gradients(plan.params)
            if grads is None:
                return None
            if grads.key is None or grads.key != plan.grads_seen[0]:
                if not set(grads.dtypes) <= _PARAM_DTYPE_SET:
                    return None
                plan.grads_seen[0] = grads.key
            return plan, grads
        with_grad = [p for p in group_params if p.grad is not None]
        if not same_items(with_grad, plan.params):
            return None
        grads = [p.grad for p in with_grad]
        if not {g.dtype for g in grads} <= _PARAM_DTYPE_SET or any(g.is_sparse for g in grads):
            return None
        return plan, grads

    def _gather(self, group_index: int, on_device: bool = False) -> dict | None:
        """Validate a group and list its tensors; changes nothing. A group whose cached plan
        still holds skips the per-param checks (they passed when the plan was made)."""
        group = self.param_groups[group_index]
        _check_hyperparameters(group)
        options = self._options_key(group)
        cached = self._cached_plan(group_index, options, on_device)
        if cached is not None:
            return {"group": group, "index": group_index, "plan": cached[0],
                    "grads": cached[1], "options": options}
        _check_differentiable(group)
        items, torch_items = [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = self._param_name(group_index, i)
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError(
                    f"param {name}: rlvr_optim.AdamW does not support sparse gradients, "
                    "please consider SparseAdam instead"
                )
            self._check_param_options(p, group, name)
            torch_code = _follows_torch(p, group)
            if torch_code and grad.dtype != p.dtype:
                raise ValueError(
                    f"param {name}: gradient dtype {grad.dtype} differs from the param's "
                    f"{p.dtype}, which torch's AdamW code (stepping this param) needs"
                )
            if not torch_code and grad.dtype not in PARAM_DTYPES:
                raise ValueError(f"param {name}: gradient dtype {grad.dtype} is not supported")
            if distributed.is_dtensor(p) and (
                not distributed.is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements)
            ):
                got = tuple(grad.placements) if distributed.is_dtensor(grad) else "a plain tensor"
                raise ValueError(
                    f"param {name}: the gradient of a DTensor param must be a DTensor with the "
                    f"param's placements {tuple(p.placements)}, got {got}"
                )
            state = self.state.get(p, {})
            self._check_state(p, group, state, name, initialized="step" in state)
            if group["differentiable"] and getattr(state.get("step"), "requires_grad", False):
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            (torch_items if torch_code else items).append((i, p))
        if not items and not torch_items:
            return None
        return {"group": group, "index": group_index, "items": items,
                "torch_items": torch_items, "options": options}

    # In a torch.compile'd training step the optimizer step is a graph break and runs
    # eagerly. Traced, the reference's fp32 ops would be left to the compiler, which may
    # fuse multiply-adds and so change the stored bits (reference.py forbids contraction);
    # tracing it also took 14 s (eager backend) to 80 s (inductor) for a 4-param model
    # on 2 CPU cores. The fused backends are kernels of their own either way.
    # torch._disable_dynamo is torch.compiler.disable imported at the first call: applied
    # here, torch.compiler.disable imports torch._dynamo (and triton) with the class, which
    # made `import rlvr_optim` and `rlvr-optim --help` take seconds longer.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        on_device = found_inf is not None
        work = [self._gather(gi, on_device) for gi in range(len(self.param_groups))]
        for job in work:
            if job is None:
                continue
            if "plan" in job or job["items"]:
                plan = job.get("plan") or self._make_plan(job, on_device)
                self._launch(job["group"], plan, job.get("grads"), grad_scale, found_inf)
            if job.get("torch_items"):
                self._torch_step(job["group"], [p for _, p in job["torch_items"]],
                                 grad_scale, found_inf)
        return loss

    def _torch_step(self, group: Mapping[str, Any], params: list[Tensor], grad_scale,
                    found_inf) -> None:
        """Step checked params that follow torch (see :func:`_follows_torch`) with torch's
        functional AdamW and the group's options; then fill their tracking state, if any,
        by comparing their stored bits with a copy taken before the step."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            self._init_state(p, group, state)
        grads = [p.grad for p in params]
        skip = False
        if not group["fused"] and (grad_scale is not None or found_inf is not None):
            # torch's for-loop and foreach code take no GradScaler tensors: unscale here, and
            # skip on found_inf read on the host, which is what GradScaler does for them.
            if grad_scale is not None:
                grads = [g / grad_scale.to(g.device) for g in grads]
            skip = found_inf is not None and bool(found_inf.item())
            grad_scale = found_inf = None
        track = group["track_changes"]
        before = [_stored_bits(p).clone() for p in params] if track != "off" else None
        if not skip:
            beta1, beta2 = group["betas"]
            # torch's step runs with autograd on exactly when its defaults ask for it.
            with torch.set_grad_enabled(self.defaults["differentiable"]):
                torch_adamw(
                    params, grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                    [s["step"] for s in states],
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    has_complex=any(map(torch.is_complex, params)),
                    amsgrad=group["amsgrad"],
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )
        if before is None:
            return
        for p, state, old, grad in zip(params, states, before, grads):
            changed = _stored_bits(p) != old
            if p.is_complex():
                changed = changed.any(-1)
            changed = changed.reshape(-1)
            grad = distributed.local_tensor(grad)
            if grad_scale is not None:  # fused: torch's kernel unscaled it
                grad = grad / grad_scale.to(grad.device)
            count = changed.sum()
            nonfinite = (~torch.isfinite(grad)).sum()
            bits = bitmaps.pack(changed)
            self._per_shard(p, state["change_bitmap"], "bitmap").copy_(bits)
            if track == "cumulative":
                self._per_shard(p, state["cumulative_bitmap"], "bitmap").bitwise_or_(bits)
            self._per_shard(p, state["change_counts"], "counters").copy_(
                torch.stack([count, count, nonfinite]))

    def _ordinals(self) -> dict[Tensor, int]:
        """Stable per-param keys for the stochastic rounding stream: position in the groups."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                out.setdefault(p, len(out))
        return out

    def _make_plan(self, job: dict, on_device: bool) -> _Plan:
        """Create missing state for a checked group and gather the step's operand lists.

        Kept (``self._plans``) for groups of plain tensors, whose next steps then cost a
        pass over the gradients: with thousands of small tensors the per-param checks,
        not the kernel, were the step time. Anything that changes state through this class
        (``load_state_dict``, ``set_freeze_mask``, ``add_param_group``) or a group's options
        drops the plans; tensors assigned into ``self.state`` by hand are not seen, so
        call ``load_state_dict`` (or :meth:`_forget_plans`) after such surgery.

        The step counts of such a group become views of one buffer, so a step adds 1 to
        all of them in one op (per-tensor ``step`` values and state dicts are unchanged).
        """
        group = job["group"]
        params = [p for _, p in job["items"]]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            self._init_state(p, group, state, on_device=on_device)
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
        operands = OperandList if plain else list

        def per_shard(key: str, what: str = "bitmap") -> list:
            return operands(self._per_shard(p, s.get(key), what) for p, s in zip(params, states))

        def local_states(key: str) -> list:
            return operands(local(s[key]) for s in states)

        track = group["track_changes"]
        master = group["master_weights"]
        keys = None
        if group["rounding"] == "stochastic":
            ordinals = self._ordinals()
            keys = self._device_keys([ordinals[p] for p in params], steps[0].device)
        plan = _Plan(
            options=job["options"],
            params=params,
            states=states,
            plain=plain,
            step_buffer=step_buffer,
            steps_on_device=all(s["step"].device == p.device for p, s in zip(params, states)),
            backend=backends.select(self.backend, params[0].device),
            local_params=operands(map(local, params)),
            exp_avgs=local_states("exp_avg"),
            exp_avg_sqs=local_states("exp_avg_sq"),
            max_exp_avg_sqs=local_states("max_exp_avg_sq") if group["amsgrad"] else None,
            masters=local_states("master") if master == "fp32" else None,
            remainders=local_states("remainder") if master == "remainder" else None,
            freeze_masks=per_shard("freeze_mask"),
            change_bitmaps=per_shard("change_bitmap") if track != "off" else None,
            cumulative_bitmaps=per_shard("cumulative_bitmap") if track == "cumulative" else None,
            counters=per_shard("change_counts", "counters") if track != "off" else None,
            element_offsets=[0 if lay is None else lay.element_offset for lay in layouts],
            keys=keys,
            whole_group=len(params) == len(group["params"]),
            scalar_rows=ScalarRows(step_buffer) if step_buffer is not None else None,
            sr_keys=_sr_keys_function(steps[0].device),
            grads_seen=[None],
        )
        if plain:
            self.__dict__.setdefault("_plans", {})[job["index"]] = plan
        return plan

    def _launch(self, group: Mapping[str, Any], plan: _Plan, grads: list[Tensor] | None,
                grad_scale, found_inf) -> None:
        """Advance the step counts and run the backend over the plan's tensors (``grads``:
        the plain grads when the caller has them already)."""
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
        step_scalars = plan.scalar_rows or reference.step_scalars
        scalars = step_scalars(
            step_vec, group["lr"], float(beta1), float(beta2), group["weight_decay"], group["eps"]
        )
        sr_keys = None
        if plan.keys is not None:
            sr_keys = plan.sr_keys(group["seed"], step_vec, plan.keys)
        if grads is None:
            grads = [distributed.local_tensor(p.grad) for p in plan.params]
        plan.backend.adamw(
            plan.local_params,
            grads,
            plan.exp_avgs,
            plan.exp_avg_sqs,
            scalars=scalars,
            max_exp_avg_sqs=plan.max_exp_avg_sqs,
            masters=plan.masters,
            remainders=plan.remainders,
            freeze_masks=plan.freeze_masks,
            change_bitmaps=plan.change_bitmaps,
            cumulative_bitmaps=plan.cumulative_bitmaps,
            counters=plan.counters,
            rounding=group["rounding"],
            sr_keys=sr_keys,
            element_offsets=plan.element_offsets,
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )

    def _device_keys(self, keys: list[int], device: torch.device) -> Tensor:
        """The int64 tensor of ``keys`` on ``device``, built once per key list.

        Cached because building it copies from host memory, which a CUDA graph capture
        forbids; the first (warm-up) step builds it, captured steps reuse it.
        """
        cache = self.__dict__.setdefault("_device_key_cache", {})
        index = (tuple(keys), str(device))
        if index not in cache:
            cache[index] = torch.tensor(keys, dtype=torch.int64).to(device)
        return cache[index]

    # ---------------------------------------------------------------- state dicts

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``.

        Checks shapes and options against the current params first and raises, naming
        the param, without changing anything. Unlike torch's loader, which casts every
        floating state to the param's dtype, state keeps the dtype its options call for
        (fp32 master, int16 remainder, uint8 bitmaps, the group's state dtype). Hooks
        registered with ``register_load_state_dict_pre_hook`` run before the checks (the
        dict they return is the one checked and loaded), ``..._post_hook`` after the state
        has its final dtypes.
        """
        state_dict = state_dict.copy()  # shallow, as torch's loader does before its hooks
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        pairs = []  # (saved id, param, merged group, name)
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
            merged = dict(self.defaults)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            _normalize_options({k: merged[k] for k in self._option_defaults})
            _check_differentiable(merged)
            for i, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                pairs.append((pid, p, merged, self._param_name(gi, i)))
        saved_state = state_dict["state"]
        for pid, p, merged, name in pairs:
            self._check_param_options(p, merged, name)
            if pid in saved_state:
                st = saved_state[pid]
                self._check_state(p, merged, st, name, initialized="step" in st)
        # A dict without freeze masks (torch's, or saved before masks were set) keeps the
        # masks set on this optimizer; a dict with masks brings its own.
        masks = {p: m for p in self.state if (m := self.state[p].get("freeze_mask")) is not None}
        # The hooks run here, around our checks and casts, so torch's loader must not run them.
        hooks = (self._optimizer_load_state_dict_pre_hooks,
                 self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = type(hooks[0])()
        self._optimizer_load_state_dict_post_hooks = type(hooks[1])()
        try:
            super().load_state_dict(state_dict)
        finally:
            (self._optimizer_load_state_dict_pre_hooks,
             self._optimizer_load_state_dict_post_hooks) = hooks
        for p, mask in masks.items():
            self.state[p].setdefault("freeze_mask", mask)
        for pid, p, merged, _ in pairs:
            if pid not in saved_state:
                continue
            restored = self.state[p]
            expected = self._expected_state(p, merged)
            for key, value in saved_state[pid].items():
                if not isinstance(value, Tensor):
                    continue
                if key == "step":
                    # Same placement as torch, but never shared with the loaded dict.
                    restored[key] = restored[key].clone()
                    continue
                dtype = expected[key][1] if key in expected else value.dtype
                restored[key] = value.to(device=p.device, dtype=dtype, copy=True)
        self._forget_plans()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ---------------------------------------------------------------- results

    def change_bitmap(self, param: Tensor) -> Tensor | None:
        """Packed bitmap of the last step: bit i = element i's stored bf16 bits changed.

        For a DTensor param: the bitmap of the local shard (a plain tensor).
        """
        return self._per_shard(param, self.state.get(param, {}).get("change_bitmap"), "bitmap")

    def cumulative_bitmap(self, param: Tensor) -> Tensor | None:
        """OR of all change bitmaps since tracking began (``track_changes="cumulative"``)."""
        return self._per_shard(param, self.state.get(param, {}).get("cumulative_bitmap"),
                               "bitmap")

    def change_counts(self, param: Tensor) -> Tensor | None:
        """int64 device tensor ``[bf16 changed, fp32 moved, non-finite grads]`` of the last
        step (of the local shard for a DTensor param; see
        :func:`rlvr_optim.distributed.all_reduce_change_counts`)."""
        return self._per_shard(param, self.state.get(param, {}).get("change_counts"),
                               "counters")

    def change_summary(self) -> list[dict[str, Any]]:
        """One row per tracked param: name, numel and the last step's counters (one sync).

        For DTensor params the rows describe the local shards (``numel`` is the local count);
        :func:`rlvr_optim.distributed.global_change_summary` sums them over ranks.
        """
        names = self._names()
        tracked = [p for p in names if self.change_counts(p) is not None]
        if not tracked:
            return []
        counts = torch.stack([self.change_counts(p).cpu() for p in tracked]).tolist()
        cumulative = {}
        with_cumulative = [p for p in tracked if self.cumulative_bitmap(p) is not None]
        if with_cumulative:
            totals = torch.stack([bitmaps.popcount(self.cumulative_bitmap(p)).cpu()
                                  for p in with_cumulative]).tolist()
            cumulative = dict(zip(with_cumulative, totals))
        rows = []
        for p, c in zip(tracked, counts):
            row = {"name": names[p], "numel": distributed.local_tensor(p).numel()}
            row.update(zip(reference.COUNTER_NAMES, c))
            if p in cumulative:
                row["cumulative_changed"] = cumulative[p]
            rows.append(row)
        return rows

    def change_log(self, prefix: str = "rlvr_optim/") -> dict[str, float]:
        """Whole-model statistics of the last step as a flat dict for loggers (one sync).

        Keys: ``changed_fraction`` (share of tracked elements whose bf16 bits changed),
        ``moved_fraction`` (share whose fp32 value moved), ``filtered_fraction`` (share of
        the moved ones that bf16 storage did not show), ``nonfinite_grads``, and with
        cumulative tracking ``cumulative_changed_fraction`` and its complement
        ``never_changed_fraction``. The paper's update sparsity compares two checkpoints;
        a weight that leaves its start bits and returns counts as unchanged there, so the
        never-changed share is a lower bound on it.
        """
        return change_log_from_rows(self.change_summary(), prefix)


def change_log_from_rows(rows: Iterable[Mapping[str, Any]], prefix: str = "rlvr_optim/"
                         ) -> dict[str, float]:
    """The flat dict of :meth:`AdamW.change_log` from ``change_summary``-style rows."""
    rows = list(rows)
    if not rows:
        return {}
    numel = sum(r["numel"] for r in rows)
    changed = sum(r["bf16_changed"] for r in rows)
    moved = sum(r["fp32_moved"] for r in rows)
    out = {
        "changed_fraction": changed / numel if numel else 0.0,
        "moved_fraction": moved / numel if numel else 0.0,
        "filtered_fraction": (moved - changed) / moved if moved else 0.0,
        "nonfinite_grads": float(sum(r["nonfinite_grads"] for r in rows)),
    }
    cum_rows = [r for r in rows if "cumulative_changed" in r]
    if cum_rows:
        cum_numel = sum(r["numel"] for r in cum_rows)
        frac = sum(r["cumulative_changed"] for r in cum_rows) / cum_numel if cum_numel else 0.0
        out["cumulative_changed_fraction"] = frac
        out["never_changed_fraction"] = 1.0 - frac
    return {prefix + k: v for k, v in out.items()}


def format_table(rows: Iterable[Mapping[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A plain-text table of dict rows (floats with 4 significant digits)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
