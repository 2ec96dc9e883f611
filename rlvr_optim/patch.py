"""Patches between two checkpoints, in the delta format of :mod:`rlvr_optim.sync`.

A patch is a :class:`~rlvr_optim.sync.Delta` with no chain: the changed elements of NEW
against BASE (or those flagged by change bitmaps, checked against the diff), their
values in each tensor's own dtype, and the state checksums of BASE and NEW, so that it
applies only to BASE and, in a list, only in order. It is also TRL's sparse safetensors
patch, with TRL's SHA-256 of NEW, so TRL's reader applies and checks it too.

``rlvr-optim patch make`` and ``patch apply`` are this module over files; training runs use
:class:`~rlvr_optim.sync.DeltaTracker`, which needs no second checkpoint.
"""

from __future__ import annotations

from typing import Iterable, Mapping, MutableMapping

import torch
from torch import Tensor

from . import bitmaps
from .errors import InputError
from .sync import Delta, DeltaError, _index_dtype, _sum_of_entries, _trl_sha256, state_checksums
from .sync import apply_delta as _apply_delta

__all__ = ["Delta", "DeltaError", "apply_patches", "load_patch", "make_patch"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_view(t: Tensor) -> Tensor:
    """The flat bit patterns of ``t`` as integers of its element size (NaN, -0.0 exact)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(_BITS[t.element_size()]) if t.dtype != torch.bool else t


def make_patch(new: Mapping[str, Tensor], *, base: Mapping[str, Tensor], sequence: int,
               changed: Mapping[str, Tensor] | None = None, label: str = "") -> Delta:
    """The patch that turns ``base`` into ``new``.

    Args:
        new: name -> tensor, the weights after (whole tensors, any device).
        base: the weights before: the same names, shapes and dtypes.
        sequence: the sequence number recorded in the patch (its base is ``sequence - 1``).
        changed: name -> packed change bitmap (:mod:`rlvr_optim.bitmaps` format), e.g. the
            optimizer's; its set bits are the elements sent, and every element that differs
            must have one. A name without a bitmap counts as unchanged. Default: the bitwise
            difference of ``base`` and ``new``.
        label: a free label (TRL's ``base_model_id``).

    Weights or bitmaps that do not fit each other raise
    :class:`~rlvr_optim.errors.InputError` naming the tensor.
    """
    if set(base) != set(new):
        raise InputError(f"base and new weights differ in names: "
                         f"{sorted(set(base) ^ set(new))[:5]}; a patch joins two checkpoints "
                         "of one model")
    for name, t in new.items():
        if base[name].shape != t.shape or base[name].dtype != t.dtype:
            raise InputError(f"tensor {name!r}: base is {tuple(base[name].shape)} "
                             f"{base[name].dtype}, new is {tuple(t.shape)} {t.dtype}")
    if changed is not None and set(changed) - set(new):
        raise InputError(f"bitmaps for unknown tensors: {sorted(set(changed) - set(new))[:5]}")
    patch = Delta(sequence=int(sequence), label=label)
    pairs = []
    for name in sorted(new):
        t = new[name]
        patch.shapes[name], patch.dtypes[name] = tuple(t.shape), t.dtype
        diff = _bit_view(t) != _bit_view(base[name]).to(t.device)
        if changed is None:
            mask = diff
        else:
            mask = (bitmaps.unpack(changed[name].detach().to(t.device), t.numel())
                    if name in changed else torch.zeros_like(diff))
            missed = diff & ~mask
            if bool(missed.any()):
                raise InputError(
                    f"tensor {name!r}: {int(missed.sum())} elements differ from the base but "
                    "their change bits are 0; these bitmaps do not describe this base -> new")
        indices = torch.nonzero(mask).reshape(-1)
        if indices.numel():
            values = torch.take(t.detach(), indices)
            patch.indices[name] = indices.to(_index_dtype(t.numel()))
            patch.values[name] = values
            pairs.append((patch.indices[name], values))
    patch.sums = dict(zip(patch.values, _sum_of_entries(pairs)))
    patch.base_sums = state_checksums(base)
    patch.result_sums = state_checksums(new)
    patch.sha256 = _trl_sha256(new, new)
    return patch


def load_patch(path) -> Delta:
    """Read a patch (any delta file: :meth:`rlvr_optim.sync.Delta.load`)."""
    return Delta.load(path)


def apply_patches(weights: MutableMapping[str, Tensor], patches: Iterable[Delta]) -> None:
    """Apply patches in order to ``weights`` in place, all or nothing.

    Before writing anything: each patch's base is the previous one's result (order, by
    their state checksums), and each applies as :func:`rlvr_optim.sync.apply_delta`
    checks it (the first one's base is these weights). The patches are applied to copies
    of the tensors they change, which replace the originals' values only when every patch
    has applied. Raises :class:`~rlvr_optim.sync.DeltaError`, with ``weights`` untouched.
    """
    patches = list(patches)
    for i in range(1, len(patches)):
        before, patch = patches[i - 1], patches[i]
        if (patch.base_sums is not None and before.result_sums is not None
                and patch.base_sums != before.result_sums):
            raise DeltaError(
                f"patches out of order: patch {i} (sequence {patch.sequence}) applies to other "
                f"weights than patch {i - 1} (sequence {before.sequence}) produces; give the "
                "patches in the order they were made")
    work = dict(weights)
    copied: set[str] = set()
    for patch in patches:
        for name in patch.values:
            if name in weights and name not in copied:
                work[name] = weights[name].detach().clone()
                copied.add(name)
        _apply_delta(work, patch)
    with torch.no_grad():
        for name in copied:
            weights[name].copy_(work[name])
