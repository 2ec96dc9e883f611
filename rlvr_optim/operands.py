"""The operands of a step, named once: what the reference, the checks, the planner and the
fused backends pass around instead of ten parallel lists. Imports nothing of the package
(a leaf module).

A call of a backend's ``adamw(params, grads, exp_avgs, exp_avg_sqs, *, ...)`` becomes
:func:`call_operands`: an :class:`Operands` of lists (one entry per tensor) plus the grads,
which change every step and travel apart. ``ops.at(i)`` is the :class:`Operands` of one
tensor (its tensors, None where it has no such operand).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

__all__ = ["OPERANDS", "Operands", "StepInputs", "call_operands"]


class Operands(NamedTuple):
    """What a step reads and writes besides the gradients, by operand name.

    For a call, each field is a list with one entry per tensor, or None where no tensor
    has that operand (an entry may be None for a tensor without it, e.g. its freeze mask).
    For one tensor (:meth:`at`), each field is that tensor or None.
    """

    param: Any
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any = None  # amsgrad only
    master: Any = None  # fp32 master (bf16 params only)
    remainder: Any = None  # int16 remainder of the compact master form (bf16 params only)
    freeze_mask: Any = None  # packed bitmap, bit 1 = trained
    change_bitmap: Any = None  # packed bitmap of this step's bf16 changes
    cumulative_bitmap: Any = None  # packed bitmap OR-ed with this step's changes
    counter: Any = None  # int64 [len(COUNTER_NAMES)]

    @property
    def count(self) -> int:
        """Tensors in the call."""
        return len(self.param)

    def at(self, i: int) -> "Operands":
        """The operands of tensor ``i`` of the call."""
        return Operands(*(None if values is None else values[i] for values in self))

    def subset(self, index: Sequence[int]) -> "Operands":
        """The call restricted to tensors ``index`` (in that order)."""
        return Operands(*(None if values is None else [values[i] for i in index]
                          for values in self))


class StepInputs(NamedTuple):
    """What a step reads besides the operands and grads: the per-step scalars and the
    call's options (the keyword arguments of a backend's ``adamw`` of the same names)."""

    scalars: Any  # float32 [n, 8] of reference.step_scalars
    sr_keys: Any = None  # int64 [n, 2] of reference.stochastic_rounding_keys (stochastic)
    maximize: bool = False
    decoupled_weight_decay: bool = True  # False: Adam's L2 term (scalars' decay column)
    grad_scale: Any = None
    found_inf: Any = None


OPERANDS = ("param", "grad", *Operands._fields[1:])
"""Every operand of a tensor, the grad included, in the order of the planner's columns."""


def call_operands(params: Sequence, exp_avgs: Sequence, exp_avg_sqs: Sequence, *,
                  max_exp_avg_sqs=None, masters=None, remainders=None, freeze_masks=None,
                  change_bitmaps=None, cumulative_bitmaps=None, counters=None,
                  amsgrad: bool = False) -> Operands:
    """The :class:`Operands` of a backend call's lists (``max_exp_avg_sqs`` only with
    ``amsgrad``, as every backend reads them)."""
    return Operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                    masters, remainders, freeze_masks, change_bitmaps, cumulative_bitmaps,
                    counters)
