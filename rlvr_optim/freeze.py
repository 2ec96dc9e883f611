"""Freeze masks: which elements of a param the optimizer trains (packed bitmaps, bit 1 =
trained, in the param's state as ``"freeze_mask"``; per local shard for a DTensor param)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import bitmaps, distributed
from .options import follows_torch
from .state import no_freeze_mask_message

__all__ = ["packed_freeze_mask", "set_packed_freeze_mask"]


def _find(opt, p: Tensor) -> tuple[int, int]:
    for gi, group in enumerate(opt.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                return gi, i
    raise ValueError("that tensor is not a param of this optimizer")


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


def packed_freeze_mask(opt, p: Tensor, mask: Tensor | None) -> Tensor | None:
    """``mask`` (see ``set_freeze_mask``) checked against param ``p`` of ``opt`` and packed
    for its local shard, on its device; None stays None."""
    gi, i = _find(opt, p)
    name = opt._param_name(gi, i)
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"freeze mask for param {name} must be a tensor, got {type(mask).__name__}")
    if follows_torch(p, opt.param_groups[gi]):
        raise ValueError(no_freeze_mask_message(p, opt.param_groups[gi], name))
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
        _check_mask_shape(mask, p.shape, name)
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
        _check_mask_shape(mask, local.shape, name)
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


def set_packed_freeze_mask(opt, p: Tensor, packed: Tensor | None) -> None:
    """Store (None: drop) the packed mask of ``p`` in its state; the next step plans anew."""
    opt._forget_plans()
    layout = distributed.shard_layout(p)
    if packed is None:
        opt.state[p].pop("freeze_mask", None)
    elif layout is None:
        opt.state[p]["freeze_mask"] = packed
    else:
        opt.state[p]["freeze_mask"] = layout.wrap(packed, layout.bitmap_slot_bytes)
