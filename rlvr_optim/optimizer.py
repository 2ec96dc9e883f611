"""``rlvr_optim.AdamW`` and ``rlvr_optim.Adam``: torch's AdamW and Adam, with bf16 rounding
made visible and controllable.

The classes validate and gather tensors and pick a backend; the arithmetic lives in the
backends (:mod:`rlvr_optim.reference` is the specification). Behind them:
:mod:`~rlvr_optim.options` (the per-group options), :mod:`~rlvr_optim.state` (state tensors,
their checks, state dicts), :mod:`~rlvr_optim.freeze` (freeze masks),
:mod:`~rlvr_optim.step_plan` (the kept plan of a group's steps),
:mod:`~rlvr_optim.torch_step` (params stepped by torch's code) and
:mod:`~rlvr_optim.tracking` (summaries).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from . import backends, bitmaps, distributed, freeze, state, step_plan
from .options import (OPTION_NAMES, check_differentiable, check_hyperparameters,
                      check_param_options, normalize_options)
from .torch_step import torch_step
from .tracking import change_log_from_rows, format_table, summary_rows

__all__ = ["Adam", "AdamW", "RoundingAdam", "change_log_from_rows", "format_table"]

_OPTIONS_DOC = """
    Keyword-only options (each may also be set per param group, except ``freeze_masks``
    and ``backend``; a value set later in ``param_groups`` is taken as here):
        rounding: how a bf16 or float16 param is stored: ``"nearest"`` (round to nearest
            even, default) or ``"stochastic"`` (unbiased; needs bf16 or float16 params).
        master_weights: ``None`` (default), ``"fp32"`` (fp32 copy, bf16 or float16 params
            only) or ``"remainder"`` (int16 remainder beside the bf16 param that rebuilds
            the exact fp32 value; the bf16 half is rounded to nearest, ties away from zero;
            bf16 params only).
        state_dtype: dtype of exp_avg / exp_avg_sq: ``None`` (the param's, as torch;
            float32 for float16 params that the fused backends step), ``torch.float32`` or
            ``torch.bfloat16``.
        track_changes: ``"off"`` (default), ``"step"`` (per-step change bitmap and
            counters) or ``"cumulative"`` (also the OR of all steps' bitmaps). For
            float16 params ``rounding="stochastic"``, ``master_weights`` or ``state_dtype``
            sends them through the fused backends (docs/fp16.md), tracking alone does not.
            For float16 params stepped by torch's code, float64 and complex params a bit
            says that the stored value changed: its own
            bits (either part of a complex element) differ after the step, so ``bf16
            changed`` and ``fp32 moved`` both count those elements. They are found by
            comparing against a copy taken before the step (one copy of each such param
            per step), not inside a kernel.
        seed: seed of the stochastic rounding stream (default 0).
        change_dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the nearest-even
            image an fp32 param's change bitmap and counters compare (float16 for trainers
            that keep fp32 weights and serve float16); 16-bit params compare their own bits.
        freeze_masks: ``{param: mask}``; see :meth:`set_freeze_mask`.
        backend: ``"auto"`` (default), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``;
            it steps the float32 and bfloat16 params, and the float16 params of groups that
            set one of the options above.

    DTensor params (FSDP2 ``fully_shard``: ``Shard(0)`` or ``Replicate()`` on a 1-D mesh)
    step on their local shards, with stochastic rounding keyed by each element's global
    index, so N ranks store the bits of one; bitmaps and counters are then per local shard
    (:mod:`rlvr_optim.distributed` sums them over ranks).

    Results (device tensors; reading them does not sync until you call ``.tolist()``):
    :meth:`change_bitmap`, :meth:`cumulative_bitmap`, :meth:`change_counts`; for the
    whole model :meth:`change_summary` and :meth:`change_log` (these sync once).
"""


class RoundingAdam:
    """The body of :class:`AdamW` and :class:`Adam`, put before torch's class in their
    bases: groups with rlvr_optim's options, state, the step, state dicts and results.

    float32 and bfloat16 params go through this package's fused backends, for which
    ``foreach`` and ``fused`` change nothing, and so do float16 params in groups that set
    ``rounding="stochastic"``, ``master_weights`` or ``state_dtype`` (their moments are
    then float32 unless ``state_dtype`` says bfloat16). Other params
    (float64, complex, float16 in groups without those options) and every param of a
    ``differentiable=True`` group are stepped by
    torch's own Adam code with the group's options (``foreach``, ``fused``, ``capturable``,
    ...), so they behave as under torch's class, autograd included; their states have
    torch's keys and dtypes. For float64 and complex params ``rounding="stochastic"``,
    ``master_weights`` (both need a 16-bit store), ``state_dtype`` and freeze masks raise
    (and for float16 params with default options, freeze masks); a differentiable group also
    refuses ``track_changes`` and a ``backend`` other than ``"auto"``. With a
    ``GradScaler`` and without ``fused=True`` their step reads ``found_inf`` on the host
    (one sync), as the scaler itself does for torch's for-loop code.
    """

    # Our step unscales and skips on found_inf itself (GradScaler's contract). A class
    # attribute, unlike torch's, so that deep copies and unpickled optimizers keep it.
    _step_supports_amp_scaling = True

    def _set_up(self, init: Callable, backend: str, options: dict[str, Any],
                freeze_masks: Mapping[Tensor, Tensor] | None, differentiable: bool) -> None:
        """The constructors' common part: check, then torch's constructor (``init``)."""
        backends.check_backend(backend)
        if differentiable and backend != "auto":
            raise ValueError(
                f"differentiable=True cannot be combined with backend={backend!r}: torch's "
                "Adam code steps every param then; leave backend='auto'"
            )
        self._option_defaults = normalize_options(options)
        self.backend = backend
        init()
        self.defaults.update(self._option_defaults)
        if freeze_masks:
            packed = {p: freeze.packed_freeze_mask(self, p, m) for p, m in freeze_masks.items()}
            for p, mask in packed.items():
                freeze.set_packed_freeze_mask(self, p, mask)

    # ---------------------------------------------------------------- groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        options = {k: group.get(k, v) for k, v in self._option_defaults.items()}
        group.update(normalize_options(options))
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        check_hyperparameters(group)
        check_differentiable(group)
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
                check_param_options(tensor, group, name)
        group["params"] = params
        super().add_param_group(group)
        self._forget_plans()

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        out["backend"] = self.backend
        out["_option_defaults"] = self._option_defaults
        return out

    def __setstate__(self, saved: dict[str, Any]) -> None:
        super().__setstate__(saved)
        self._forget_plans()
        # load_state_dict passes only state and groups; a torch state dict has none of our
        # options, so its groups take this optimizer's defaults.
        for group in self.param_groups:
            for k, v in self._option_defaults.items():
                group.setdefault(k, v)

    def _param_name(self, group_index: int, index: int) -> str:
        names = self.param_groups[group_index].get("param_names")
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

    def _forget_plans(self) -> None:
        """Drop the kept step plans: the next step checks everything again."""
        self.__dict__.pop("_plans", None)
        self.__dict__.pop("_checked_options", None)

    # ---------------------------------------------------------------- the step

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
        work = [step_plan.gather(self, gi, on_device) for gi in range(len(self.param_groups))]
        for job in work:
            if job is None:
                continue
            if "plan" in job or job["items"]:
                plan = job.get("plan") or step_plan.make(self, job, on_device)
                step_plan.launch(job["group"], plan, job.get("grads"), grad_scale, found_inf)
            if job.get("torch_items"):
                torch_step(self, job["group"], [p for _, p in job["torch_items"]],
                           grad_scale, found_inf)
        return loss

    # ---------------------------------------------------------------- state dicts

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of torch's.

        Checks shapes and options against the current params first and raises, naming
        the param, without changing anything. Unlike torch's loader, which casts every
        floating state to the param's dtype, state keeps the dtype its options call for
        (fp32 master, int16 remainder, uint8 bitmaps, the group's state dtype). Hooks
        registered with ``register_load_state_dict_pre_hook`` run before the checks (the
        dict they return is the one checked and loaded), ``..._post_hook`` after the state
        has its final dtypes.
        """
        state.load_state_dict(self, state_dict, super().load_state_dict)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict of this optimizer. Refused, naming the param, when a param's
        shape changed since its state was made (``p.data = p.data.view(...)``): such a dict
        could not be loaded, and torch's Adam refuses to step that param. (A step checks
        the shapes whenever it plans a group again: at a new grad address, for one.)"""
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                saved = self.state.get(p, {})
                moments = [saved[k] for k in state.MOMENT_KEYS if isinstance(saved.get(k), Tensor)]
                if any(m.shape != p.shape for m in moments):
                    state.check_state(p, group, saved, self._param_name(gi, i),
                                      initialized="step" in saved)
        return super().state_dict()

    # ---------------------------------------------------------------- freeze masks

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
        freeze.set_packed_freeze_mask(self, param, freeze.packed_freeze_mask(self, param, mask))

    def freeze_mask(self, param: Tensor) -> Tensor | None:
        """The packed freeze mask of ``param`` (bit 1 = trained; of the local shard for a
        DTensor param), or None."""
        return state.per_shard(param, self.state.get(param, {}).get("freeze_mask"), "bitmap")

    # ---------------------------------------------------------------- results

    def change_bitmap(self, param: Tensor) -> Tensor | None:
        """Packed bitmap of the last step: bit i = element i's stored bf16 bits changed.

        For a DTensor param: the bitmap of the local shard (a plain tensor).
        """
        return state.per_shard(param, self.state.get(param, {}).get("change_bitmap"), "bitmap")

    def cumulative_bitmap(self, param: Tensor) -> Tensor | None:
        """OR of all change bitmaps since tracking began (``track_changes="cumulative"``)."""
        return state.per_shard(param, self.state.get(param, {}).get("cumulative_bitmap"),
                               "bitmap")

    def change_counts(self, param: Tensor) -> Tensor | None:
        """int64 device tensor ``[bf16 changed, fp32 moved, non-finite grads]`` of the last
        step (of the local shard for a DTensor param; see
        :func:`rlvr_optim.distributed.all_reduce_change_counts`)."""
        return state.per_shard(param, self.state.get(param, {}).get("change_counts"),
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
        with_cumulative = [i for i, p in enumerate(tracked)
                           if self.cumulative_bitmap(p) is not None]
        if with_cumulative:
            totals = torch.stack([bitmaps.popcount(self.cumulative_bitmap(tracked[i])).cpu()
                                  for i in with_cumulative]).tolist()
            cumulative = dict(zip(with_cumulative, totals))
        return summary_rows([names[p] for p in tracked],
                            [distributed.local_tensor(p).numel() for p in tracked], counts,
                            cumulative)

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


def _options(rounding, master_weights, state_dtype, track_changes, seed,
             change_dtype) -> dict[str, Any]:
    return dict(zip(OPTION_NAMES, (rounding, master_weights, state_dtype, track_changes, seed,
                                   change_dtype)))


class AdamW(RoundingAdam, torch.optim.AdamW):
    __doc__ = """Drop-in ``torch.optim.AdamW`` with controllable bf16 rounding and change tracking.

    The positional and keyword arguments of ``torch.optim.AdamW`` keep their meaning and
    defaults; with none of the options below set, results match ``torch.optim.AdamW``
    (fp32 math in the order of torch's fused kernel, the weight decay as its for-loop
    applies it: docs/numerics.md). See :class:`RoundingAdam` for params of other dtypes.
""" + _OPTIONS_DOC

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
        change_dtype: torch.dtype | str = torch.bfloat16,
        freeze_masks: Mapping[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> None:
        def init():
            torch.optim.AdamW.__init__(
                self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                foreach=foreach, capturable=capturable, differentiable=differentiable,
                fused=fused)

        self._set_up(init, backend,
                     _options(rounding, master_weights, state_dtype, track_changes, seed,
                              change_dtype),
                     freeze_masks, differentiable)


class Adam(RoundingAdam, torch.optim.Adam):
    __doc__ = """Drop-in ``torch.optim.Adam`` with controllable bf16 rounding and change tracking.

    The positional and keyword arguments of ``torch.optim.Adam`` keep their meaning and
    defaults: ``weight_decay`` is an L2 penalty added to the gradient (``g + weight_decay
    * w``, in fp32, before the moments), or with ``decoupled_weight_decay=True`` AdamW's
    decay. With none of the options below set, results match ``torch.optim.Adam`` (fp32
    math in the order of torch's fused kernel). See :class:`RoundingAdam` for params of
    other dtypes.
""" + _OPTIONS_DOC

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        track_changes: str | bool | None = "off",
        seed: int = 0,
        change_dtype: torch.dtype | str = torch.bfloat16,
        freeze_masks: Mapping[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> None:
        def init():
            torch.optim.Adam.__init__(
                self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                maximize=maximize, capturable=capturable, differentiable=differentiable,
                fused=fused, decoupled_weight_decay=decoupled_weight_decay)

        self._set_up(init, backend,
                     _options(rounding, master_weights, state_dtype, track_changes, seed,
                              change_dtype),
                     freeze_masks, differentiable)
