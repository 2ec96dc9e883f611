"""Sharded and replicated params: where a local shard sits, and global change statistics.

``rlvr_optim.AdamW`` steps a DTensor param (FSDP2 ``fully_shard``, ``distribute_tensor``)
on its local shard. Element-shaped states (``exp_avg``, ``master``, ...) are DTensors
with the param's placements, so ``torch.distributed.checkpoint`` saves and reshards them
like torch's own optimizer states. Stochastic rounding draws the random bits of an element
from its index in the *global* flattened tensor (:func:`ShardLayout.element_offset`), so a
run on N ranks stores the same bits as the same run on one.

Supported: a 1-D device mesh with ``Shard(0)`` (FSDP2's default; the local shard is then
a contiguous range of the global row-major order) or ``Replicate()``. Other placements
raise an error that names the param. DDP needs nothing here: its params are plain tensors,
identical on every rank.

Change bitmaps, cumulative bitmaps, freeze masks and counters are per local shard. For
checkpointing, each is held as a 1-D DTensor on the param's mesh: with ``Shard(0)`` every
rank owns one equal slot of ``bitmap_bytes(largest local shard)`` bytes (the tail of a
smaller shard's slot stays zero), with ``Replicate()`` the whole bitmap. They round-trip
through ``torch.distributed.checkpoint`` with the same number of ranks; unlike the
element-shaped states they cannot be resharded, since a shard boundary need not fall on
a byte. :func:`all_reduce_change_counts` and :func:`global_change_log` turn the local
counters into whole-model numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import bitmaps
from .table import COUNTER_NAMES
from .tracking import change_log_from_rows, summary_rows

__all__ = [
    "ShardLayout",
    "all_reduce_change_counts",
    "global_change_log",
    "global_change_summary",
    "init_optimizer_state",
    "is_dtensor",
    "local_tensor",
    "shard_layout",
    "sum_over_shards",
]


@functools.cache
def _dtensor_types():
    """(DTensor, Shard, Replicate), or None where torch has no torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor, Shard, Replicate


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """Where the local shard of a DTensor param lies in its global tensor.

    Attributes:
        mesh: the param's 1-D device mesh.
        sharded: True for ``Shard(0)``, False for ``Replicate()``.
        rank_numels: local element count on each rank of the mesh.
        rank: this process's coordinate on the mesh.
        element_offset: global flat index of the local shard's element 0.
    """

    mesh: Any
    sharded: bool
    rank_numels: tuple[int, ...]
    rank: int
    element_offset: int

    @property
    def local_numel(self) -> int:
        return self.rank_numels[self.rank]

    @property
    def bitmap_slot_bytes(self) -> int:
        """Bytes of each rank's slot in a per-shard bitmap DTensor."""
        return bitmaps.bitmap_bytes(max(self.rank_numels))

    def wrap(self, local: Tensor, slot: int) -> Tensor:
        """A per-shard 1-D tensor (bitmap or counters) as a DTensor on the mesh.

        With ``Shard(0)`` the local tensor is zero-padded to ``slot`` elements, so that
        every rank holds an equal piece of the global tensor.
        """
        DTensor, Shard, Replicate = _dtensor_types()
        if not self.sharded:
            return DTensor.from_local(local, self.mesh, [Replicate()], run_check=False)
        padded = torch.zeros(slot, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local.reshape(-1)
        world = len(self.rank_numels)
        return DTensor.from_local(padded, self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([world * slot]), stride=(1,))

    def global_shape(self, per_rank: int, replicated: int) -> torch.Size:
        """Global shape of a per-shard state held with ``per_rank`` elements per rank."""
        if self.sharded:
            return torch.Size([len(self.rank_numels) * per_rank])
        return torch.Size([replicated])


def shard_layout(param: Tensor, name: str = "param") -> ShardLayout | None:
    """The :class:`ShardLayout` of a DTensor param, None for a plain tensor.

    Args:
        param: the param.
        name: how errors name it (default ``"param"``).

    Raises ValueError for placements other than ``Shard(0)`` / ``Replicate()`` on a 1-D
    mesh, and for a local shard that does not follow ``torch.chunk`` (DTensor's rule).
    """
    if not is_dtensor(param):
        return None
    _, Shard, Replicate = _dtensor_types()
    mesh, placements = param.device_mesh, tuple(param.placements)
    supported = ("rlvr_optim.AdamW steps DTensor params on a 1-D device mesh with placement "
                 "Shard(0) (FSDP2 fully_shard's default) or Replicate()")
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"param {name} is a DTensor on a {mesh.ndim}-D device mesh with placements "
            f"{placements}; {supported}"
        )
    placement = placements[0]
    rank = mesh.get_local_rank()
    world = mesh.size()
    numel = param.numel()
    if isinstance(placement, Replicate):
        return ShardLayout(mesh, False, (numel,) * world, rank, 0)
    if type(placement) is not Shard or placement.dim % max(param.dim(), 1) != 0:
        raise ValueError(f"param {name} is a DTensor with placement {placement!r}; {supported}")
    rows = param.shape[0]
    row_numel = math.prod(param.shape[1:])
    chunk = -(-rows // world)
    rank_rows = [max(0, min(chunk, rows - r * chunk)) for r in range(world)]
    local_rows = param.to_local().shape[0] if param.dim() else 0
    if local_rows != rank_rows[rank]:
        raise ValueError(
            f"param {name}: rank {rank} holds {local_rows} of {rows} rows, torch.chunk "
            f"would give {rank_rows[rank]}; only even (torch.chunk) Shard(0) sharding is supported"
        )
    return ShardLayout(
        mesh,
        True,
        tuple(r * row_numel for r in rank_rows),
        rank,
        min(rank * chunk, rows) * row_numel,
    )


# ------------------------------------------------------------------------ checkpoints


@torch.no_grad()
def init_optimizer_state(optimizer) -> None:
    """Create the state of every param that has none, without changing any value.

    ``torch.distributed.checkpoint`` loads into the tensors of a state dict that already
    exists, and ``get_optimizer_state_dict`` creates them only for an optimizer whose
    state is empty, which freeze masks already are not. Call this on the fresh optimizer
    (after setting its freeze masks, if the run had any) before
    ``get_optimizer_state_dict`` + ``dcp.load`` + ``set_optimizer_state_dict``.

    It runs one step with zero gradients and lr 0 on the params without state: weights,
    masters, remainders and moments keep their values exactly (0 * w and 0 * m are zero,
    and an fp32 value that is already bf16 rounds to itself under either rounding); the
    step count becomes 1, which the loaded state then replaces. Existing gradients and
    learning rates are restored.
    """
    fresh = [p for g in optimizer.param_groups for p in g["params"]
             if "step" not in optimizer.state.get(p, {})]
    if not fresh:
        return
    fresh_ids = {id(p) for p in fresh}
    saved_grads = {p: p.grad for g in optimizer.param_groups for p in g["params"]}
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p) if id(p) in fresh_ids else None
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, saved_lrs):
            g["lr"] = lr
        for p, grad in saved_grads.items():
            p.grad = grad


# ------------------------------------------------------------------------ global statistics


def _tracked(optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]
            if optimizer.change_counts(p) is not None]


def _world(group) -> tuple[int, int]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sum_over_shards(params: list[Tensor], table: Tensor, group=None) -> Tensor:
    """Sum per-param rows of local statistics over the ranks (in place; returns ``table``).

    Row i belongs to ``params[i]``. A sharded param's row is summed over every rank; a
    replicated or plain param (identical on every rank, as under DDP) counts once, from
    rank 0. Without an initialized process group the table is returned as it is.
    """
    rank, world = _world(group)
    if world == 1:
        return table
    for i, p in enumerate(params):
        layout = shard_layout(p)
        if (layout is None or not layout.sharded) and rank != 0:
            table[i].zero_()
    torch.distributed.all_reduce(table, group=group)
    return table


def _reduce_rows(optimizer, group) -> tuple[list[Tensor], Tensor]:
    """Global counters (COUNTER_NAMES) and cumulative changed elements, per param."""
    params = _tracked(optimizer)
    if not params:
        return [], torch.zeros(0, len(COUNTER_NAMES) + 1, dtype=torch.int64)
    rows = []
    for p in params:
        counts = optimizer.change_counts(p)
        cumulative = optimizer.cumulative_bitmap(p)
        extra = (bitmaps.popcount(cumulative) if cumulative is not None
                 else torch.zeros((), dtype=torch.int64, device=counts.device))
        rows.append(torch.cat([counts, extra.reshape(1).to(counts.device)]))
    table = torch.stack([r.to(rows[0].device) for r in rows])
    return params, sum_over_shards(params, table, group)


def all_reduce_change_counts(optimizer, group=None) -> dict[Tensor, Tensor]:
    """Whole-tensor counters of the last step: param -> int64 ``[bf16 changed, fp32 moved,
    non-finite grads]`` summed over the shards of each param (one all-reduce, no host sync).

    Args:
        optimizer: an ``rlvr_optim.AdamW`` with change tracking on.
        group: process group (default None: the world). Without an initialized process
            group the local counters are returned.
    """
    params, table = _reduce_rows(optimizer, group)
    return {p: row[:len(COUNTER_NAMES)] for p, row in zip(params, table)}


def global_change_summary(optimizer, group=None) -> list[dict[str, Any]]:
    """``AdamW.change_summary`` rows for whole tensors: global numel and counters (one
    all-reduce, one host sync). ``cumulative_changed`` is present where tracked."""
    params, table = _reduce_rows(optimizer, group)
    names = optimizer._names()
    n = len(COUNTER_NAMES)
    values = table.cpu().tolist()
    cumulative = {i: row[n] for i, (p, row) in enumerate(zip(params, values))
                  if optimizer.cumulative_bitmap(p) is not None}
    return summary_rows([names[p] for p in params], [p.numel() for p in params],
                        [row[:n] for row in values], cumulative)


def global_change_log(optimizer, prefix: str = "rlvr_optim/", group=None) -> dict[str, float]:
    """``AdamW.change_log`` over the whole model on every rank (one all-reduce, one sync)."""
    return change_log_from_rows(global_change_summary(optimizer, group), prefix)
