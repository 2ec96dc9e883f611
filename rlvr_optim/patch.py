"""Sparse weight sync: delta patches built from change bitmaps, applied in order.

Async RL trainers ship new weights to their inference engines after every step; today
they find what changed by snapshotting and diffing. The optimizer's per-step change
bitmaps already say which stored values changed, so a step's patch is just those
indices and their new values.

A patch is a safetensors file. Per changed tensor ``NAME`` it holds

* ``NAME::indices``: uint8, the flat indices of the changed elements, ascending, as
  gaps ``index[k] - index[k - 1] - 1`` (``index[-1] = -1``) in unsigned LEB128
  varints: 7 bits per byte, high bit set on every byte but a number's last. Changes
  cluster, so most gaps take one byte;
* ``NAME::values``: the new values, in the weights' dtype (bf16: 2 bytes each);

and metadata: ``format``, ``sequence`` (the step), ``base_checksum`` (checksum of the
weights it applies to), ``checksum`` (of the weights it produces; the next patch's
base), ``full_bytes`` (size of the tensors of a full checkpoint) and per tensor
``numel::NAME``, ``dtype::NAME``, ``changed::NAME``.

:func:`weights_checksum` is the SHA-256 of the tensors in sorted name order, each as
its name, dtype and shape then its raw bytes (row-major, little-endian). Applying checks
the base checksum before and the result checksum after, and writes nothing unless both
match: a patch for another base, a patch out of order or a corrupt one is refused with
the weights untouched.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, MutableMapping

import torch
from torch import Tensor

from . import bitmaps, distributed
from .errors import InputError

__all__ = [
    "FORMAT",
    "Patch",
    "PatchError",
    "apply_patch",
    "apply_patches",
    "changes_from_optimizer",
    "decode_indices",
    "encode_indices",
    "load_patch",
    "make_patch",
    "weights_checksum",
]

FORMAT = "rlvr_optim.patch/1"
_INDICES, _VALUES = "::indices", "::values"
_MAX_VARINT_BYTES = 10  # 64-bit numbers


class PatchError(InputError):
    """A patch that does not fit the weights it is applied to, or is corrupt.

    An :class:`~rlvr_optim.errors.InputError` (so a ``ValueError``): the command line
    reports it as one line.
    """


# ------------------------------------------------------------------------ checksums


def weights_checksum(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of named tensors: sorted by name, each as name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach()
        if distributed.is_dtensor(t):
            raise TypeError(f"tensor {name!r} is a DTensor; patches describe whole tensors "
                            "(gather it with full_tensor() first)")
        digest.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0"
                      .encode())
        digest.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------ index coding


def encode_indices(indices: Tensor) -> Tensor:
    """Ascending int64 flat indices -> uint8 LEB128 varints of their gaps (see module doc)."""
    indices = indices.reshape(-1).to(torch.int64).cpu()
    if indices.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(indices, prepend=torch.tensor([-1])) - 1
    if bool((gaps < 0).any()):
        raise ValueError("indices must be strictly ascending and non-negative")
    lengths = torch.ones_like(gaps)
    for k in range(1, _MAX_VARINT_BYTES):
        lengths += (gaps >> (7 * k)) > 0
    starts = torch.cumsum(lengths, 0) - lengths
    out = torch.empty(int(lengths.sum()), dtype=torch.int64)
    for k in range(int(lengths.max())):
        has = lengths > k
        more = (lengths[has] > k + 1).to(torch.int64) << 7
        out[starts[has] + k] = ((gaps[has] >> (7 * k)) & 0x7F) | more
    return out.to(torch.uint8)


def decode_indices(data: Tensor, count: int | None = None) -> Tensor:
    """uint8 varint gaps -> ascending int64 flat indices (inverse of :func:`encode_indices`).

    Args:
        data: the encoded bytes.
        count: the expected number of indices (checked when given).
    """
    b = data.reshape(-1).to(torch.int64).cpu()
    if b.numel() == 0:
        indices = torch.zeros(0, dtype=torch.int64)
    else:
        last = (b & 0x80) == 0
        if not bool(last[-1]):
            raise PatchError("index data ends inside a number")
        ends = torch.nonzero(last).reshape(-1)
        number = torch.cumsum(last.to(torch.int64), 0) - last.to(torch.int64)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
        position = torch.arange(b.numel()) - starts[number]
        if int(position.max()) >= _MAX_VARINT_BYTES:
            raise PatchError("index data holds a number longer than 64 bits")
        gaps = torch.zeros(ends.numel(), dtype=torch.int64)
        gaps.index_add_(0, number, (b & 0x7F) << (7 * position))
        indices = torch.cumsum(gaps + 1, 0) - 1
    if count is not None and indices.numel() != count:
        raise PatchError(f"index data holds {indices.numel()} indices, expected {count}")
    return indices


# ------------------------------------------------------------------------ patches


@dataclass
class Patch:
    """One step's changes: per tensor the changed flat indices and their new values.

    Attributes:
        sequence: the step (or any increasing number) the patch brings the weights to.
        base_checksum: :func:`weights_checksum` of the weights it applies to.
        checksum: :func:`weights_checksum` of the weights it produces.
        indices: name -> ascending int64 flat indices of the changed elements.
        values: name -> their new values (1-D, the tensor's dtype).
        numels: name -> element count of every tensor of the weights.
        dtypes: name -> dtype of every tensor of the weights.
    """

    sequence: int
    base_checksum: str
    checksum: str
    indices: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        """Changed elements over all tensors."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def numel(self) -> int:
        """Elements of the whole weights."""
        return sum(self.numels.values())

    @property
    def full_bytes(self) -> int:
        """Bytes of the tensors of a full checkpoint of the weights."""
        return sum(n * _itemsize(self.dtypes[k]) for k, n in self.numels.items())

    def to_bytes(self) -> bytes:
        """The patch as a safetensors file."""
        from safetensors.torch import save

        tensors, metadata = {}, {
            "format": FORMAT,
            "sequence": str(self.sequence),
            "base_checksum": self.base_checksum,
            "checksum": self.checksum,
            "full_bytes": str(self.full_bytes),
        }
        for name in sorted(self.numels):
            metadata["numel::" + name] = str(self.numels[name])
            metadata["dtype::" + name] = str(self.dtypes[name]).removeprefix("torch.")
        for name in sorted(self.indices):
            tensors[name + _INDICES] = encode_indices(self.indices[name])
            tensors[name + _VALUES] = self.values[name].reshape(-1).contiguous().cpu()
            metadata["changed::" + name] = str(int(self.indices[name].numel()))
        return save(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike) -> int:
        """Write the patch to ``path``; returns its size in bytes."""
        data = self.to_bytes()
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def report(self) -> dict[str, float | int]:
        """Sizes of this patch against a full checkpoint (bytes as written)."""
        size = len(self.to_bytes())
        return {
            "sequence": self.sequence,
            "changed": self.changed,
            "numel": self.numel,
            "changed_fraction": self.changed / self.numel if self.numel else 0.0,
            "patch_bytes": size,
            "full_bytes": self.full_bytes,
            "patch_to_full": size / self.full_bytes if self.full_bytes else 0.0,
        }


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PatchError(f"unknown dtype {name!r} in patch")
    return dtype


def load_patch(path: str | os.PathLike) -> Patch:
    """Read a patch written by :meth:`Patch.save` (decodes the indices).

    A missing, truncated or corrupt file raises :class:`PatchError` naming it.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise PatchError(f"no patch file at {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise PatchError(f"{path} is not an rlvr_optim patch "
                                 f"(format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise PatchError(f"{path} is not a readable patch file ({exc}); it may be truncated: "
                         "copy or make it again") from None
    try:
        return _patch_from(meta, tensors)
    except PatchError as exc:
        raise PatchError(f"{path}: {exc}") from None
    except (KeyError, ValueError) as exc:  # metadata missing or not numbers
        raise PatchError(f"{path}: corrupt patch metadata ({exc!r})") from None


def _patch_from(meta: dict[str, str], tensors: dict[str, Tensor]) -> Patch:
    """The :class:`Patch` that a patch file's metadata and tensors describe, checked."""
    patch = Patch(int(meta["sequence"]), meta["base_checksum"], meta["checksum"])
    for key, value in meta.items():
        if key.startswith("numel::"):
            name = key[len("numel::"):]
            patch.numels[name] = int(value)
            patch.dtypes[name] = _dtype(meta["dtype::" + name])
    for key, value in meta.items():
        if key.startswith("changed::"):
            name = key[len("changed::"):]
            try:
                data, values = tensors[name + _INDICES], tensors[name + _VALUES]
            except KeyError:
                raise PatchError(f"tensor {name!r} lacks its indices or values") from None
            try:
                indices = decode_indices(data, int(value))
            except PatchError as exc:
                raise PatchError(f"indices of {name!r}: {exc}") from None
            if values.numel() != indices.numel() or values.dtype != patch.dtypes[name]:
                raise PatchError(f"values of {name!r} do not match its indices/dtype")
            if indices.numel() and int(indices[-1]) >= patch.numels[name]:
                raise PatchError(f"an index of {name!r} is past its {patch.numels[name]} "
                                 "elements")
            patch.indices[name], patch.values[name] = indices, values
    return patch


def _bits(t: Tensor) -> Tensor:
    """Integer view of a tensor's bit patterns (so that NaNs and -0.0 compare exactly)."""
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().cpu().reshape(-1).view(views[t.element_size()])


def make_patch(
    new: Mapping[str, Tensor],
    *,
    sequence: int,
    base: Mapping[str, Tensor] | None = None,
    changed: Mapping[str, Tensor] | None = None,
    base_checksum: str | None = None,
) -> Patch:
    """The patch that turns ``base`` into ``new``.

    Args:
        new: name -> tensor, the weights after the step (whole tensors, any device).
        sequence: the step number recorded in the patch.
        base: the weights before the step (same names, shapes, dtypes). With
            ``changed=None`` the patch is their bitwise difference; with ``changed``
            the bitmaps are checked against it (no change may be missed).
        changed: name -> packed change bitmap (``rlvr_optim.bitmaps`` format), e.g. the
            optimizer's bitmaps of the step (:func:`changes_from_optimizer`); a name
            without a bitmap counts as unchanged.
        base_checksum: :func:`weights_checksum` of the base, when ``base`` is not given
            (the previous patch's ``checksum`` in a chain, so the base is not hashed again).

    The new weights are hashed once (the patch's ``checksum``). Weights or bitmaps that do
    not fit each other raise :class:`~rlvr_optim.errors.InputError`.
    """
    if base is None and changed is None:
        raise ValueError("make_patch needs the base weights or the change bitmaps (or both)")
    if base is None and base_checksum is None:
        raise ValueError("without the base weights, pass base_checksum (the previous "
                         "patch's checksum, or weights_checksum(base))")
    if base is not None:
        if set(base) != set(new):
            raise InputError(f"base and new weights differ in names: "
                             f"{sorted(set(base) ^ set(new))[:5]}; a patch joins two "
                             "checkpoints of one model")
        for name, t in new.items():
            if base[name].shape != t.shape or base[name].dtype != t.dtype:
                raise InputError(f"tensor {name!r}: base is {tuple(base[name].shape)} "
                                 f"{base[name].dtype}, new is {tuple(t.shape)} {t.dtype}")
        computed = weights_checksum(base)
        if base_checksum is not None and base_checksum != computed:
            raise InputError("base_checksum does not match the base weights")
        base_checksum = computed
    if changed is not None and set(changed) - set(new):
        raise InputError(f"bitmaps for unknown tensors: {sorted(set(changed) - set(new))[:5]}")
    patch = Patch(int(sequence), base_checksum, weights_checksum(new))
    for name, t in new.items():
        patch.numels[name], patch.dtypes[name] = t.numel(), t.dtype
        new_bits = _bits(t)
        diff = None if base is None else new_bits != _bits(base[name])
        if changed is None:
            mask = diff
        elif name in changed:
            mask = bitmaps.unpack(changed[name].detach().cpu(), t.numel())
        else:
            mask = torch.zeros(t.numel(), dtype=torch.bool)
        if diff is not None and changed is not None and bool((diff & ~mask).any()):
            raise InputError(
                f"tensor {name!r}: {int((diff & ~mask).sum())} elements differ from the base "
                "but their change bits are 0; these bitmaps do not describe this base -> new"
            )
        indices = torch.nonzero(mask).reshape(-1)
        if indices.numel():
            patch.indices[name] = indices
            patch.values[name] = t.detach().reshape(-1).cpu()[indices].clone()
    return patch


def changes_from_optimizer(optimizer, named_params: Iterable[tuple[str, Tensor]]
                           ) -> dict[str, Tensor]:
    """name -> the optimizer's change bitmap of the last step, for :func:`make_patch`.

    Needs ``track_changes`` on. A param the last step skipped (no gradient) keeps an
    older bitmap; its extra indices are harmless (their values are the current ones).
    """
    out = {}
    for name, p in named_params:
        if distributed.is_dtensor(p):
            raise TypeError(f"param {name!r} is a DTensor: patches describe whole tensors")
        bitmap = optimizer.change_bitmap(p)
        if bitmap is None:
            raise ValueError(f"param {name!r} has no change bitmap: create the optimizer with "
                             "track_changes='step' or 'cumulative' and run a step first")
        out[name] = bitmap
    return out


# ------------------------------------------------------------------------ applying


def _check_fits(weights: Mapping[str, Tensor], patch: Patch, label: str) -> None:
    if set(weights) != set(patch.numels):
        missing = sorted(set(patch.numels) - set(weights))[:5]
        extra = sorted(set(weights) - set(patch.numels))[:5]
        raise PatchError(f"{label} is for other tensors (missing here: {missing}, not in the "
                         f"patch: {extra})")
    for name, t in weights.items():
        if t.numel() != patch.numels[name] or t.dtype != patch.dtypes[name]:
            raise PatchError(f"{label}: tensor {name!r} is {t.numel()} x {t.dtype} here, "
                             f"{patch.numels[name]} x {patch.dtypes[name]} in the patch")


def apply_patches(weights: MutableMapping[str, Tensor], patches: Iterable[Patch]) -> str:
    """Apply patches in order to ``weights`` in place; returns the final checksum.

    Checks, before writing anything: each patch fits the tensors, the first one's base
    checksum is the weights' checksum, each next one's base is the previous one's result
    (order), and the weights that result hash to the last patch's checksum. On any
    mismatch raises :class:`PatchError` and leaves ``weights`` untouched.
    """
    patches = list(patches)
    if not patches:
        return weights_checksum(weights)
    for i, patch in enumerate(patches):
        _check_fits(weights, patch, f"patch {i} (sequence {patch.sequence})")
    for i in range(1, len(patches)):
        prev, patch = patches[i - 1], patches[i]
        if patch.base_checksum != prev.checksum:
            raise PatchError(
                f"patches out of order: patch {i} (sequence {patch.sequence}) applies to "
                f"weights {patch.base_checksum[:12]}, but patch {i - 1} (sequence "
                f"{prev.sequence}) produces {prev.checksum[:12]}; give the patches in the "
                "order they were made"
            )
    current = weights_checksum(weights)
    first = patches[0]
    if current != first.base_checksum:
        later = [p.sequence for p in patches if p.checksum == current]
        hint = (f"; these weights are what sequence {later[0]} produces (already applied)"
                if later else "; apply it to the weights it was made from, after the patches "
                "before it")
        raise PatchError(
            f"patch sequence {first.sequence} applies to weights {first.base_checksum[:12]}, "
            f"these weights are {current[:12]}{hint}"
        )
    result = dict(weights)
    copied = set()
    for patch in patches:
        for name, indices in patch.indices.items():
            if name not in copied:
                result[name] = weights[name].detach().clone(memory_format=torch.contiguous_format)
                copied.add(name)
            flat = result[name].view(-1)
            flat[indices.to(flat.device)] = patch.values[name].to(flat.device)
    final = weights_checksum(result)
    if final != patches[-1].checksum:
        raise PatchError(
            f"applying the patches gives weights {final[:12]}, the last patch (sequence "
            f"{patches[-1].sequence}) promises {patches[-1].checksum[:12]}: a patch is corrupt "
            "or was made from bitmaps that missed changes"
        )
    with torch.no_grad():
        for name in copied:
            weights[name].copy_(result[name])
    return final


def apply_patch(weights: MutableMapping[str, Tensor], patch: Patch) -> str:
    """Apply one patch in place (see :func:`apply_patches`); returns the new checksum."""
    return apply_patches(weights, [patch])
