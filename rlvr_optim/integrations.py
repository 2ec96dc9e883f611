"""Change statistics in trainers' own logs: HF ``Trainer``, TRL trainers, custom loops.

``rlvr_optim.AdamW`` runs unchanged inside ``transformers.Trainer`` and TRL's trainers
(``optimizers=(opt, None)``). This module adds its change statistics to their logs::

    opt = rlvr_optim.AdamW(model.named_parameters(), lr=1e-6, track_changes="cumulative")
    trainer = GRPOTrainer(model=model, args=args, ..., optimizers=(opt, None))
    rlvr_optim.integrations.log_change_stats(trainer)
    trainer.train()   # every training log entry gains rlvr_optim/changed_fraction, ...

In a custom loop (verl-style), :class:`ChangeStats` does the same by hand::

    stats = ChangeStats(opt)
    for batch in loader:
        ...; opt.step(); stats.update()
        if step % log_every == 0:
            logger.log(stats.pop())

Per step the counters are summed on the device (no host sync); :meth:`ChangeStats.pop`
syncs once per log entry, and under ``torch.distributed`` all-reduces once so that every
rank logs whole-model numbers (sharded params summed over ranks, replicated ones once).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from . import bitmaps, distributed
from .optimizer import AdamW

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # the callback needs transformers; ChangeStats does not
    _TrainerCallback = object

__all__ = ["ChangeStats", "ChangeStatsCallback", "log_change_stats", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> AdamW:
    """The ``rlvr_optim.AdamW`` inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = optimizer
    while not isinstance(seen, AdamW) and hasattr(seen, "optimizer"):
        seen = seen.optimizer
    if not isinstance(seen, AdamW):
        raise TypeError(
            "change statistics need an rlvr_optim.AdamW optimizer, got "
            f"{type(optimizer).__name__}; "
            "pass optimizers=(rlvr_optim.AdamW(...), None) to the trainer"
        )
    return seen


class ChangeStats:
    """Means of the optimizer's change counters over the steps since the last :meth:`pop`.

    Args:
        optimizer: an ``rlvr_optim.AdamW`` (or a wrapper of one) with ``track_changes``
            set to ``"step"`` or ``"cumulative"``.
        prefix: prefix of the keys (default ``"rlvr_optim/"``).
        group: process group of the all-reduce (default None: the world, when initialized).

    Keys of :meth:`pop`, as in ``AdamW.change_log`` but over the window:
    ``changed_fraction`` and ``moved_fraction`` (mean per step, over tracked elements),
    ``filtered_fraction`` (share of the fp32 moves that bf16 storage did not show),
    ``nonfinite_grads`` (total), ``steps`` (steps in the window), and with cumulative
    tracking ``cumulative_changed_fraction`` / ``never_changed_fraction`` (now).
    """

    def __init__(self, optimizer: Any, prefix: str = "rlvr_optim/", group=None) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        if all(g["track_changes"] == "off" for g in self.optimizer.param_groups):
            raise ValueError("the optimizer tracks no changes: create it with "
                             "track_changes='step' or 'cumulative'")
        self.prefix = prefix
        self.group = group
        self._params: list[Tensor] = []
        self._sums: Tensor | None = None  # [params, 3] counter sums of the window
        self._element_steps: list[int] = []  # per param: numel x steps it was tracked
        self.steps = 0

    def update(self) -> None:
        """Add the last step's counters to the window (device ops only, no host sync)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        counts = [self.optimizer.change_counts(p) for p in params]
        if all(c is None for c in counts):
            return
        device = next(c.device for c in counts if c is not None)
        if self._sums is None or len(params) != len(self._params):
            self._grow(params, device)  # first step, or add_param_group appended params
        zeros = torch.zeros(3, dtype=torch.int64, device=device)
        self._sums += torch.stack([zeros if c is None else c.to(device) for c in counts])
        for i, (p, c) in enumerate(zip(params, counts)):
            if c is not None:
                self._element_steps[i] += p.numel()
        self.steps += 1

    def _grow(self, params: list[Tensor], device: torch.device) -> None:
        """Start or extend the window's table."""
        old = 0 if self._sums is None else self._sums.shape[0]
        table = torch.zeros(len(params), 3, dtype=torch.int64, device=device)
        if self._sums is not None:
            table[:old] = self._sums.to(device)
        self._params, self._sums = params, table
        self._element_steps += [0] * (len(params) - old)

    @property
    def pending(self) -> bool:
        """Whether steps were added since the last :meth:`pop`."""
        return self.steps > 0

    def pop(self) -> dict[str, float]:
        """The window's statistics as a flat dict; starts a new window (one host sync).

        Under ``torch.distributed`` every rank must call it (one all-reduce).
        """
        if self._sums is None:
            return {}
        cumulative = [self.optimizer.cumulative_bitmap(p) for p in self._params]
        zero = torch.zeros((), dtype=torch.int64, device=self._sums.device)
        popcounts = torch.stack([zero if b is None else bitmaps.popcount(b).to(zero.device)
                                 for b in cumulative])
        table = torch.cat([self._sums, popcounts.reshape(-1, 1)], dim=1)
        table = distributed.sum_over_shards(self._params, table, self.group).cpu().tolist()
        numel = sum(self._element_steps)
        changed = sum(row[0] for row in table)
        moved = sum(row[1] for row in table)
        out = {
            "changed_fraction": changed / numel if numel else 0.0,
            "moved_fraction": moved / numel if numel else 0.0,
            "filtered_fraction": (moved - changed) / moved if moved else 0.0,
            "nonfinite_grads": float(sum(row[2] for row in table)),
            "steps": float(self.steps),
        }
        with_cumulative = [i for i, b in enumerate(cumulative) if b is not None]
        if with_cumulative:
            total = sum(self._params[i].numel() for i in with_cumulative)
            frac = sum(table[i][3] for i in with_cumulative) / total if total else 0.0
            out["cumulative_changed_fraction"] = frac
            out["never_changed_fraction"] = 1.0 - frac
        self._sums.zero_()
        self._element_steps = [0] * len(self._params)
        self.steps = 0
        return {self.prefix + k: v for k, v in out.items()}


class ChangeStatsCallback(_TrainerCallback):
    """A ``transformers.TrainerCallback`` that feeds :class:`ChangeStats` after every step.

    :func:`log_change_stats` adds it and merges :meth:`pop` into the trainer's log
    entries; added alone, call :meth:`pop` yourself.

    Args:
        prefix: prefix of the logged keys (default ``"rlvr_optim/"``).
    """

    def __init__(self, prefix: str = "rlvr_optim/") -> None:
        self.prefix = prefix
        self.stats: ChangeStats | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.stats is None:
            self.stats = ChangeStats(optimizer, prefix=self.prefix)
        self.stats.update()

    @property
    def pending(self) -> bool:
        return self.stats is not None and self.stats.pending

    def pop(self) -> dict[str, float]:
        """The statistics since the last call (see :meth:`ChangeStats.pop`)."""
        return self.stats.pop() if self.stats is not None else {}


def log_change_stats(trainer, prefix: str = "rlvr_optim/") -> ChangeStatsCallback:
    """Log the optimizer's change statistics in ``trainer``'s own log entries.

    Adds a :class:`ChangeStatsCallback` and wraps ``trainer.log`` so that each entry
    logged after training steps also holds the statistics of those steps (means since
    the previous entry). The entry then reaches ``state.log_history`` and every
    ``report_to`` integration (TensorBoard, W&B, ...) like the loss does. Works for
    ``transformers.Trainer`` and the TRL trainers built on it (``GRPOTrainer``, ...).

    Args:
        trainer: the trainer, created with ``optimizers=(rlvr_optim.AdamW(...), None)``.
        prefix: prefix of the keys (default ``"rlvr_optim/"``).

    Returns the callback (its ``stats`` appear after the first step).
    """
    callback = ChangeStatsCallback(prefix)
    trainer.add_callback(callback)
    original = trainer.log

    @functools.wraps(original)
    def log(logs: dict[str, float], *args, **kwargs):
        if callback.pending:
            logs.update(callback.pop())
        return original(logs, *args, **kwargs)

    trainer.log = log
    return callback
