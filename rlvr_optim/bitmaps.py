"""Packed per-element bitmaps: the format of change bitmaps and freeze masks.

A bitmap of a tensor with ``numel`` elements is a ``torch.uint8`` tensor of
``ceil(numel / 8)`` bytes; bit ``i % 8`` of byte ``i // 8`` is element ``i`` of the
flattened (row-major) tensor. That is ``numpy.packbits(bits, bitorder="little")``, and
the byte order of 32-bit warp ballots stored little-endian. Padding bits past ``numel``
are zero.

Change bitmaps (bit 1 = the stored bf16 value changed in the step) and freeze masks
(bit 1 = the element is trained) share the format, so the helpers here serve both.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Mapping

import torch
from torch import Tensor

from . import files
from .errors import InputError

__all__ = [
    "bitmap_bytes",
    "or_accumulate",
    "pack",
    "popcount",
    "unpack",
    "load_bitmaps",
    "save_bitmaps",
    "summarize_bitmaps",
    "summarize_by_module",
]

_FORMAT = "rlvr_optim.bitmaps/1"
_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def bitmap_bytes(numel: int) -> int:
    """Bytes of the bitmap of a tensor with ``numel`` elements."""
    return (numel + 7) // 8


def pack(bits: Tensor) -> Tensor:
    """Pack a boolean (or 0/1) tensor of any shape into a uint8 bitmap of its flattened order."""
    flat = bits.reshape(-1).to(torch.uint8) != 0
    numel = flat.numel()
    padded = torch.zeros(bitmap_bytes(numel) * 8, dtype=torch.int64, device=bits.device)
    padded[:numel] = flat.to(torch.int64)
    # Shifts made on the device: no host copy (a sync on a GPU, refused in graph capture).
    shifts = torch.arange(8, dtype=torch.int64, device=bits.device)
    return (padded.reshape(-1, 8) << shifts).sum(dim=1).to(torch.uint8)


def unpack(bitmap: Tensor, numel: int | None = None, shape: Iterable[int] | None = None) -> Tensor:
    """Unpack a uint8 bitmap into a bool tensor.

    Args:
        bitmap: uint8 tensor of ``ceil(numel / 8)`` bytes.
        numel: element count (default: 8 * bytes, or the product of ``shape``).
        shape: optional shape of the result (default: flat).
    """
    _check_bitmap(bitmap)
    if shape is not None:
        shape = tuple(shape)
        numel = int(torch.Size(shape).numel())
    if numel is None:
        numel = bitmap.numel() * 8
    if bitmap.numel() != bitmap_bytes(numel):
        raise ValueError(
            f"a bitmap of {numel} elements has {bitmap_bytes(numel)} bytes, got {bitmap.numel()}"
        )
    shifts = torch.arange(8, dtype=torch.int64, device=bitmap.device)
    bits = ((bitmap.reshape(-1).to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel]
    bits = bits.bool()
    return bits.reshape(shape) if shape is not None else bits


def popcount(bitmap: Tensor) -> Tensor:
    """Number of set bits of a uint8 bitmap, as an int64 device tensor (no host sync)."""
    _check_bitmap(bitmap)
    table = _BYTE_POPCOUNT.to(bitmap.device)
    return table[bitmap.reshape(-1).to(torch.int64)].sum()


def or_accumulate(accumulator: Tensor, bitmap: Tensor) -> Tensor:
    """OR ``bitmap`` into ``accumulator`` in place and return it."""
    _check_bitmap(accumulator)
    _check_bitmap(bitmap)
    if accumulator.shape != bitmap.shape:
        raise ValueError(
            f"bitmaps differ in size: {tuple(accumulator.shape)} vs {tuple(bitmap.shape)}"
        )
    return accumulator.bitwise_or_(bitmap)


def _check_bitmap(bitmap: Tensor) -> None:
    if not isinstance(bitmap, Tensor) or bitmap.dtype != torch.uint8:
        got = bitmap.dtype if isinstance(bitmap, Tensor) else type(bitmap).__name__
        raise TypeError(f"a bitmap is a torch.uint8 tensor, got {got}")


def summarize_bitmaps(bitmaps: Mapping[str, Tensor], numels: Mapping[str, int]) -> list[dict]:
    """Per-tensor rows ``{name, numel, set, fraction}`` (one host sync for all tensors)."""
    names = list(bitmaps)
    if not names:
        return []
    counts = torch.stack([popcount(bitmaps[n]).cpu() for n in names]).tolist()
    return [
        {"name": n, "numel": numels[n], "set": c, "fraction": c / numels[n] if numels[n] else 0.0}
        for n, c in zip(names, counts)
    ]


def module_type(name: str) -> str:
    """The module-type key of a parameter name: its last two dotted parts without indices.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj.weight``.
    """
    parts = [p for p in name.split(".") if not p.isdigit()]
    return ".".join(parts[-2:])


def summarize_by_module(rows: Iterable[Mapping], key=module_type) -> list[dict]:
    """Aggregate per-tensor rows (``name``, ``numel``, ``set``) by ``key(name)``."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        total = totals[key(row["name"])]
        total[0] += row["numel"]
        total[1] += row["set"]
    return [
        {"module": k, "numel": n, "set": s, "fraction": s / n if n else 0.0}
        for k, (n, s) in sorted(totals.items())
    ]


def save_bitmaps(
    path: str | os.PathLike,
    bitmaps: Mapping[str, Tensor],
    numels: Mapping[str, int],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save named bitmaps (change bitmaps or freeze masks) to a safetensors file.

    Each tensor's element count is stored in the metadata under ``numel.<name>`` so that
    :func:`load_bitmaps` can check and unpack them. The file is written atomically
    (:func:`rlvr_optim.files.write_safetensors`).
    """
    meta = {"format": _FORMAT}
    meta.update(metadata or {})
    for name, bitmap in bitmaps.items():
        _check_bitmap(bitmap)
        if bitmap.numel() != bitmap_bytes(numels[name]):
            raise ValueError(
                f"bitmap {name!r} has {bitmap.numel()} bytes, {numels[name]} elements need "
                f"{bitmap_bytes(numels[name])}"
            )
        meta[f"numel.{name}"] = str(int(numels[name]))
    tensors = {name: b.detach().reshape(-1).contiguous().cpu() for name, b in bitmaps.items()}
    files.write_safetensors(path, tensors, metadata=meta)


def load_bitmaps(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, int], dict[str, str]]:
    """Load a file written by :func:`save_bitmaps`: (bitmaps, numels, metadata).

    Every size is checked before a tensor is read: each bitmap must be a 1-D uint8 tensor
    of ``ceil(numel / 8)`` bytes for the element count ``numel.<name>`` of the metadata
    (a whole number; padding bits are ignored, as :func:`unpack` does). A file that is missing, not safetensors,
    of another format or inconsistent raises :class:`~rlvr_optim.errors.InputError` (a
    ``ValueError``) naming it.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != _FORMAT:
                raise InputError(f"{path} is not an rlvr_optim bitmap file "
                                 f"(format={meta.get('format')!r}); expected {_FORMAT!r}")
            numels = {name: _recorded_numel(path, f, meta, name) for name in f.keys()}
            bitmaps = {name: f.get_tensor(name) for name in numels}
    except (SafetensorError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{path} is not a readable safetensors file ({reason})") from None
    extra = {k: v for k, v in meta.items() if k != "format" and not k.startswith("numel.")}
    return bitmaps, numels, extra


def _recorded_numel(path: str, handle, meta: Mapping[str, str], name: str) -> int:
    """The element count recorded for bitmap ``name``, checked against its dtype and size."""
    text = meta.get(f"numel.{name}")
    if text is None or not (text.isascii() and text.isdigit()):
        raise InputError(f"{path}: bitmap {name!r} has no element count (metadata "
                         f"numel.{name} is {text!r}, expected a whole number)")
    numel = int(text)
    view = handle.get_slice(name)
    shape, dtype = list(view.get_shape()), view.get_dtype()
    if dtype != "U8" or len(shape) != 1 or shape[0] != bitmap_bytes(numel):
        raise InputError(f"{path}: bitmap {name!r} does not match its recorded size: it is "
                         f"{dtype} of shape {shape}, and {numel} elements need a 1-D U8 tensor "
                         f"of {bitmap_bytes(numel)} bytes")
    return numel
