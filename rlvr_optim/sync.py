"""Weight sync for RL trainers: deltas cut from the optimizer's own change bitmaps.

Async RL trainers push new weights to their inference engines every step or every few
steps. Most bf16 elements do not change in a step, so trainers send only the changed ones,
and today find them by keeping a bf16 snapshot of the model and diffing it (TRL, verl,
slime). ``rlvr_optim.AdamW`` already knows: its kernels write a change bitmap per step.

Sender::

    tracker = DeltaTracker(opt, model.named_parameters())   # one per consumer
    ...  opt.step() as usual; the tracker ORs each step's bitmap into its window
    delta = tracker.collect()          # everything changed since the last collect()
    engine.send(delta.to_bytes())      # or delta.save(path); tracker.anchor(): full weights

Receiver::

    apply_delta(weights, Delta.from_bytes(data))   # dict of tensors or nn.Module, in place

**What a delta holds.** Per changed tensor, the flat indices of its changed elements
(ascending; int32, int64 for tensors of 2^31 elements or more) and their new values in
the synced dtype: the param's own dtype for bf16, float16 and float64 params, and for fp32
params the round-to-nearest-even image that their change bitmap describes, in their
group's ``change_dtype``: bf16 by default, float16 with ``change_dtype=torch.float16``
(what an inference engine serving that dtype holds). Plus, for every tracked tensor
(changed or not), its shape and synced dtype; a receiver holds each tensor in that dtype.
An *anchor* holds every element of every tensor instead. The image and the bitmap must
speak of the same format: a tracker reads each fp32 param's ``change_dtype`` when it is
made and at each :meth:`DeltaTracker.anchor`, and refuses to :meth:`~DeltaTracker.collect`
a window in which the optimizer stepped the param under another ``change_dtype``.

**Integrity, at the cost of the delta.** A delta names its *chain* (the tracker: random per
tracker, or given) and its *sequence* (1, 2, ... per ``collect()``/``anchor()``); it
applies to weights at sequence ``sequence - 1`` of the same chain, which
:func:`apply_delta` records per tensor. A delta file carries a checksum per tensor: the sum
(two 32-bit lanes, each mod 2^32) of a hash of (flat index, value bits) over its entries.
The hash is a bijective mix (MurmurHash3's finalizer) of an odd-weighted sum of the index
and bit words, so one changed index or value always changes the sum; the receiver
recomputes it from what arrived, which costs what the delta costs, and a digest of the
header covers the rest of the file. The same sum over *all* elements of a tensor is its
state checksum: anchors carry it (their payload is the whole tensor), the tracker's first
delta carries it for the weights the tracker started from, and a receiver keeps it up to
date from the old and new values of the changed elements only. A delta for another chain,
out of order, repeated, truncated or with a flipped byte is refused with one
:class:`DeltaError`, and the weights stay as they were. A tensor changed in place by other
code since the last delta (its version counter moved) is refused too. (``collect()`` does
not hash: the checksums are computed on the delta's device when it is written, or by
:meth:`Delta.checksums`.)

**Sharded training.** Under FSDP2 each rank's tracker emits its shard's delta (a *part*
``(rank, world)``) with global indices; :func:`merge_deltas` joins the parts of one
sequence. Replicated DTensors are sent by rank 0 only.

**The file format** is TRL's sparse safetensors patch (``trl.experimental.async_grpo``,
huggingface/trl#5417), so TRL's reader applies our deltas:

* a delta: tensors ``<name>.indices`` (int32, or int64 from 2^31 elements) and
  ``<name>.values`` per changed tensor; metadata ``format=sparse_weight_patch``,
  ``version=1``, ``model_version`` (the sequence), ``prev_model_version`` (sequence - 1),
  ``anchor_step`` (the chain's last anchor, 0 if none), ``base_model_id`` (a free label),
  ``num_changed_params``, ``total_changed_elements``, ``total_elements``, ``sparsity``,
  ``changed_params`` (JSON list of the changed names) and ``checksum_sha256`` (TRL's SHA-256
  of all the weights after the delta; empty unless the whole weights were at hand, since it
  costs a pass over the model);
* an anchor: the full tensors under their names; metadata ``format=anchor_checkpoint``,
  ``version=1``, ``model_version``, ``base_model_id``, ``checksum_sha256``;
* in both, one more key, ``rlvr_optim``: a JSON object with ``format``
  (``rlvr_optim.delta/1``), ``chain`` (null for patches between two checkpoints),
  ``anchor``, ``part`` (``[rank, world]`` or null), ``tensors`` (name -> ``[shape, dtype]``
  of every tensor described, the dtype its values are sent in: ``"bfloat16"``,
  ``"float16"``, ...), ``sums`` (name -> 16 hex digits, the payload checksum of each
  tensor in the file), ``base`` and ``result`` (name -> state checksum of the weights
  before and after, or null when unknown).

float16 images of fp32 params (``change_dtype=torch.float16``) did not change the format:
the table has always named each tensor's synced dtype (float16 params were sent as float16
from the start), and the payload is safetensors' ``F16``; so it stays version 1, and a
reader of version 1 applies them to float16 weights.

Files are written byte for byte the same from the same delta: JSON with sorted keys,
tensors in name order, the header padded to 8 bytes with spaces. Reading never runs code
(safetensors), and checks every index before use: sorted, unique, non-negative, in range.
Files written by TRL (no ``rlvr_optim`` key) are read too; they apply in their
``model_version`` order, checked by their ``checksum_sha256`` when they have one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import bitmaps, distributed, files
from .errors import InputError
from .reference import HALF_DTYPES, fp32_bits, half_from_bits, round_nearest

__all__ = [
    "FORMAT",
    "Delta",
    "DeltaError",
    "DeltaTracker",
    "apply_delta",
    "merge_deltas",
    "position",
    "state_checksums",
    "synced_dtype",
    "synced_values",
]

FORMAT = "rlvr_optim.delta/1"
TRL_DELTA, TRL_ANCHOR = "sparse_weight_patch", "anchor_checkpoint"
_KEY = "rlvr_optim"
_DIGEST = "rlvr_optim_digest"
_INDICES, _VALUES = ".indices", ".values"
_M32 = 0xFFFFFFFF
_INT32_LIMIT = 2**31
# Elements hashed per pass over a whole tensor (state checksums): bounds the int64
# temporaries to a few tens of MB.
_CHUNK = 1 << 20
# Bytes of change windows compacted at once by collect() (2^25 elements): bounds its
# temporaries to about 1 GB when every element changed, a few MB in RL's sparse steps.
_WINDOW_BATCH = 1 << 22


class DeltaError(InputError):
    """A delta that does not fit the weights it is applied to, or is corrupt.

    An :class:`~rlvr_optim.errors.InputError` (a ``ValueError``): the command line reports
    it as one line. Raised before anything is written.
    """


# ------------------------------------------------------------------------ checksums

# Weights of the two hash lanes over (index low word, index high word, bits low word, bits
# high word, constant): arbitrary odd numbers below 2^29, so that the weighted sum of four
# 32-bit words stays below 2^63 in int64.
_LANES = ((0x1B873593, 0x0E6546B5, 0x19E3779B, 0x052DCE73, 0x0A2F1B3D),
          (0x0C2B2AE3, 0x1656667B, 0x0D35A2D9, 0x17F4A7C1, 0x1D8E4E27))


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for uint32 values in int64, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection of uint32 values held in int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _value_bits(values: Tensor) -> Tensor:
    """The bit patterns of ``values`` as non-negative int64 (64-bit dtypes: signed)."""
    size = values.element_size()
    ints = values.reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                    8: torch.int64}[size]).to(torch.int64)
    return ints if size == 8 else ints & ((1 << (8 * size)) - 1)


def _hashes(indices: Tensor, bits: Tensor) -> Tensor:
    """``[n, 2]`` int64 hashes (uint32 lanes) of (flat index, value bits) pairs."""
    words = (indices & _M32, indices >> 32, bits & _M32, (bits >> 32) & _M32)
    lanes = []
    for weights in _LANES:
        x = weights[4] + sum(w * word for w, word in zip(weights, words))
        lanes.append(_mix32(x & _M32))
    return torch.stack(lanes, dim=1)


def _fold(low: Tensor, high: Tensor) -> Tensor:
    """Lane sums mod 2^32 from the sums of the hashes' low and high 16-bit halves, which
    are summed apart so that int64 cannot overflow below 2^47 elements."""
    return (low + ((high & 0xFFFF) << 16)) & _M32


def _to_int(lanes: Sequence[int]) -> int:
    return (int(lanes[1]) << 32) | int(lanes[0])


def _add(a: int, b: int, sign: int = 1) -> int:
    """Lane-wise ``a + sign * b`` mod 2^32 of two checksums."""
    low = ((a & _M32) + sign * (b & _M32)) & _M32
    high = ((a >> 32) + sign * (b >> 32)) & _M32
    return (high << 32) | low


def _text(checksum: int) -> str:
    return f"{checksum:016x}"


def _texts(checksums: Mapping[str, int] | None) -> dict[str, str] | None:
    return None if checksums is None else {n: _text(c) for n, c in checksums.items()}


def _sum_of_entries(pairs: list[tuple[Tensor, Tensor]]) -> list[int]:
    """Checksum of each (flat indices, values) pair, computed on their devices (one sync).

    Pairs are hashed in pieces of at most ``_CHUNK`` elements (small pairs together), so
    the int64 temporaries stay a few tens of MB however large the delta.
    """
    if not pairs:
        return []
    halves: dict[torch.device, Tensor] = {}  # [2, pairs, 2]: sums of low and high halves
    pending: dict[torch.device, list[tuple[int, Tensor, Tensor]]] = {}
    pending_size: dict[torch.device, int] = {}

    def flush(device: torch.device) -> None:
        pieces = pending.pop(device)
        pending_size[device] = 0
        indices = torch.cat([i.to(torch.int64) for _, i, _ in pieces])
        bits = torch.cat([_value_bits(v) for _, _, v in pieces])
        counts = torch.tensor([i.numel() for _, i, _ in pieces], device=device)
        rows = torch.tensor([k for k, _, _ in pieces], device=device)
        segments = torch.repeat_interleave(rows, counts, output_size=indices.numel())
        hashes = _hashes(indices, bits)
        halves[device][0].index_add_(0, segments, hashes & 0xFFFF)
        halves[device][1].index_add_(0, segments, hashes >> 16)

    for k, (indices, values) in enumerate(pairs):
        device = indices.device
        if device not in halves:
            halves[device] = torch.zeros(2, len(pairs), 2, dtype=torch.int64, device=device)
        indices, values = indices.reshape(-1), values.reshape(-1)
        for start in range(0, indices.numel(), _CHUNK):
            piece = (k, indices[start:start + _CHUNK], values[start:start + _CHUNK])
            pending.setdefault(device, []).append(piece)
            pending_size[device] = pending_size.get(device, 0) + piece[1].numel()
            if pending_size[device] >= _CHUNK:
                flush(device)
    for device in list(pending):
        flush(device)
    total = sum(_fold(low, high).cpu() for low, high in halves.values()) & _M32
    return [_to_int(pair) for pair in total.tolist()]


def _device_state_sum(flat: Tensor, offset: int = 0) -> Tensor:
    """``[2]`` lane sums over every element of a flat tensor whose element 0 has global
    index ``offset``; on its device, in chunks, no host sync."""
    low = torch.zeros(2, dtype=torch.int64, device=flat.device)
    high = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        index = torch.arange(offset + start, offset + start + part.numel(), device=flat.device)
        hashes = _hashes(index, _value_bits(part))
        low += (hashes & 0xFFFF).sum(0)
        high += (hashes >> 16).sum(0)
    return _fold(low, high)


def synced_values(t: Tensor, change_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """What a delta sends of tensor ``t``: ``t`` itself, or for float32 the
    ``change_dtype`` tensor (bf16 by default, or float16) of its round-to-nearest-even
    images: the values the change bitmap of an fp32 param with that ``change_dtype``
    describes (the spec's integer rounding, :func:`rlvr_optim.reference.round_nearest`;
    NaN stays a quiet NaN as in the optimizer)."""
    t = t.detach()
    if t.dtype != torch.float32:
        return t
    if change_dtype not in HALF_DTYPES:
        raise ValueError(f"change_dtype must be torch.bfloat16 or torch.float16, got "
                         f"{change_dtype!r}")
    return half_from_bits(round_nearest(fp32_bits(t), change_dtype), change_dtype)


def synced_dtype(param_dtype: torch.dtype, change_dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta sends a param of ``param_dtype`` in (see :func:`synced_values`)."""
    return change_dtype if param_dtype == torch.float32 else param_dtype


def state_checksums(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """Per tensor, the checksum of all its elements as stored (what anchors carry; see the
    module doc); computed on the tensors' devices, one host sync."""
    names = list(weights)
    sums = [_device_state_sum(_plain(weights[n], n).detach().reshape(-1)) for n in names]
    if not sums:
        return {}
    lanes = torch.stack([s.cpu() for s in sums]).tolist()
    return {n: _to_int(pair) for n, pair in zip(names, lanes)}


def _plain(t: Tensor, name: str) -> Tensor:
    if distributed.is_dtensor(t):
        raise TypeError(f"tensor {name!r} is a DTensor; deltas are applied to whole tensors "
                        "(use DeltaTracker on the sharded side, full_tensor() on the receiver)")
    return t


# ------------------------------------------------------------------------ the delta


_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _DTYPES}


def _dtype(name: Any) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise DeltaError(f"unknown dtype {name!r}")
    return _DTYPE_NAMES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


@dataclass
class Delta:
    """Changed elements of named tensors, with what it takes to check them (module doc).

    Attributes:
        sequence: the sequence number the delta brings the weights to.
        chain: the tracker's chain id; None for patches between two checkpoints and for
            files written by TRL.
        anchor: every element of every tensor (a full checkpoint).
        shapes: name -> shape of every tensor the delta describes (changed or not).
        dtypes: name -> dtype of the synced values of every tensor.
        indices: name -> ascending flat indices (int32 / int64) of the changed elements;
            absent for a whole tensor of an anchor.
        values: name -> 1-D new values of the changed elements (all elements for a whole
            tensor of an anchor).
        sums: name -> checksum of that tensor's (index, value) entries; computed when
            first needed (:meth:`checksums`: writing a file; a receiver computes them from
            what arrived anyway), so that ``collect()`` stays a compaction and a gather.
        base_sums: name -> state checksum of the weights the delta applies to, or None.
        result_sums: name -> state checksum of the weights it produces, or None.
        part: ``(rank, world)`` for one rank's shard of a sharded model, else None.
        anchor_sequence: sequence of the chain's latest anchor (0: none).
        label: a free label (TRL's ``base_model_id``).
        sha256: TRL's ``checksum_sha256`` of the whole weights after the delta, or "".
    """

    sequence: int
    chain: str | None = None
    anchor: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    indices: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, int] = field(default_factory=dict)
    base_sums: dict[str, int] | None = None
    result_sums: dict[str, int] | None = None
    part: tuple[int, int] | None = None
    anchor_sequence: int = 0
    label: str = ""
    sha256: str = ""

    # ---------------------------------------------------------------- sizes

    @property
    def changed(self) -> int:
        """Elements sent (changed elements; all of them for an anchor)."""
        return sum(v.numel() for v in self.values.values())

    @property
    def numel(self) -> int:
        """Elements of all tensors the delta describes."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: indices and values (a file adds its header)."""
        return sum(t.numel() * t.element_size()
                   for t in (*self.indices.values(), *self.values.values()))

    @property
    def full_bytes(self) -> int:
        """Bytes of the described tensors in full, in their synced dtypes."""
        return sum(math.prod(s) * torch.empty(0, dtype=self.dtypes[n]).element_size()
                   for n, s in self.shapes.items())

    def checksums(self) -> dict[str, int]:
        """The payload checksum of every tensor sent (computing, on the delta's devices,
        those not known yet); an anchor's are also its result's state checksums."""
        missing = [n for n in self.values if n not in self.sums]
        if missing:
            pairs = [(_all_indices(self, n), self.values[n]) for n in missing]
            self.sums.update(zip(missing, _sum_of_entries(pairs)))
            if self.anchor and self.part is None:
                self.result_sums = dict(self.sums)
        return self.sums

    def to(self, device: str | torch.device) -> Delta:
        """The delta with its indices and values on ``device`` (a new Delta)."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update({k: dict(v) for k, v in fields.items() if isinstance(v, dict)})
        fields["indices"] = {n: t.to(device) for n, t in self.indices.items()}
        fields["values"] = {n: t.to(device) for n, t in self.values.items()}
        return Delta(**fields)

    # ---------------------------------------------------------------- files

    def _entries(self) -> list[tuple[str, Tensor]]:
        if self.anchor and self.part is None:
            return [(n, self.values[n].reshape(self.shapes[n])) for n in sorted(self.values)]
        out = []
        for name in sorted(self.values):
            out.append((name + _INDICES, self.indices[name]))
            out.append((name + _VALUES, self.values[name]))
        return out

    def _metadata(self) -> dict[str, str]:
        ours = {
            "format": FORMAT,
            "chain": self.chain,
            "anchor": self.anchor,
            "part": list(self.part) if self.part is not None else None,
            "tensors": {n: [list(s), _dtype_name(self.dtypes[n])] for n, s in self.shapes.items()},
            "sums": {n: _text(s) for n, s in self.checksums().items()},
            "base": _texts(self.base_sums),
            "result": _texts(self.result_sums),
        }
        meta = {_KEY: json.dumps(ours, sort_keys=True, separators=(",", ":")),
                "version": "1", "model_version": str(self.sequence),
                "base_model_id": self.label, "checksum_sha256": self.sha256}
        if self.anchor and self.part is None:
            meta["format"] = TRL_ANCHOR
            return meta
        numel = self.numel
        meta.update({
            "format": TRL_DELTA,
            "prev_model_version": str(self.sequence - 1),
            "anchor_step": str(self.anchor_sequence),
            "num_changed_params": str(len(self.values)),
            "total_changed_elements": str(self.changed),
            "total_elements": str(numel),
            "sparsity": repr(1.0 - self.changed / numel if numel else 0.0),
            "changed_params": json.dumps(sorted(self.values)),
        })
        return meta

    def write(self, f: IO[bytes]) -> int:
        """Write the delta as a safetensors file to the binary stream ``f``; returns bytes."""
        entries, metadata = self._entries(), self._metadata()
        metadata[_DIGEST] = _header_digest(metadata, [(n, t.dtype, tuple(t.shape))
                                                      for n, t in entries])
        return _write_safetensors(f, entries, metadata)

    def to_bytes(self) -> bytes:
        """The delta as a safetensors file (see the module doc), byte-reproducible."""
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike) -> int:
        """Write the file to ``path`` (atomically: nothing half-written, even if killed);
        returns its size in bytes."""
        with files.atomic_write_unnamed(path) as f:
            return self.write(f)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "delta") -> Delta:
        """Read a delta or anchor file's bytes (ours or TRL's); checks everything in it
        and raises :class:`DeltaError` naming ``source`` for anything that does not fit."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        metadata = _header_metadata(data, source)
        try:
            tensors = load(bytes(data))
        except (SafetensorError, ValueError, OverflowError) as exc:
            raise DeltaError(f"{source} is not a readable safetensors file ({exc}); it may be "
                             "truncated: copy or make it again") from None
        return _decode(metadata, tensors.__getitem__, set(tensors), source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Delta:
        """Read a delta or anchor file (see :meth:`from_bytes`)."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            raise DeltaError(f"{path} is a folder; expected a delta file")
        if not os.path.isfile(path):
            raise DeltaError(f"no delta file at {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                return _decode(metadata, handle.get_tensor, set(handle.keys()), path)
        except (SafetensorError, OSError) as exc:
            raise DeltaError(f"{path} is not a readable delta file ({exc}); it may be "
                             "truncated: copy or make it again") from None

    def report(self) -> dict[str, Any]:
        """Sizes of this delta against the full weights (file bytes as written)."""
        size = len(self.to_bytes())
        return {"sequence": self.sequence, "changed": self.changed, "numel": self.numel,
                "changed_fraction": self.changed / self.numel if self.numel else 0.0,
                "file_bytes": size, "full_bytes": self.full_bytes,
                "file_to_full": size / self.full_bytes if self.full_bytes else 0.0}


def _write_safetensors(f: IO[bytes], entries: list[tuple[str, Tensor]],
                       metadata: Mapping[str, str]) -> int:
    """Write a safetensors file with sorted JSON keys and tensors in the order given,
    streaming one tensor at a time; returns the bytes written."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in entries:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for _, t in entries:
        if t.numel():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return 8 + len(text) + offset


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (sorted by name) to a safetensors file at ``path``, atomically and
    byte-reproducibly; returns its size."""
    entries = [(n, tensors[n]) for n in sorted(tensors)]
    with files.atomic_write_unnamed(path) as f:
        return _write_safetensors(f, entries, metadata or {})


def _header_digest(metadata: Mapping[str, str],
                   entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> str:
    """SHA-256 of a file's metadata (but this digest) and its tensors' names, dtypes and
    shapes: with the payload sums, which cover the tensors' bytes, any changed byte of a
    file is found."""
    described = {"metadata": {k: v for k, v in metadata.items() if k != _DIGEST},
                 "tensors": sorted([n, _dtype_name(d), list(s)] for n, d, s in entries)}
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _header_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes, checked before any allocation."""
    if len(data) < 8:
        raise DeltaError(f"{source} is {len(data)} bytes, too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise DeltaError(f"{source}: its header claims {size} bytes, the file has "
                         f"{len(data) - 8} after the length; it is truncated")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (UnicodeDecodeError, ValueError):
        raise DeltaError(f"{source}: its header is not JSON; the file is corrupt") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DeltaError(f"{source}: its header has no string metadata; the file is corrupt")
    return meta


def _parse_sums(value: Any, what: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DeltaError(f"{what} is not a table of checksums")
    out = {}
    for name, text in value.items():
        if not (isinstance(text, str) and len(text) == 16):
            raise DeltaError(f"{what} of {name!r} is not 16 hex digits")
        try:
            out[name] = int(text, 16)
        except ValueError:
            raise DeltaError(f"{what} of {name!r} is not 16 hex digits") from None
    return out


def _int(meta: Mapping[str, str], key: str, default: int | None = None) -> int:
    text = meta.get(key)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise DeltaError(f"metadata {key}={text!r} is not an integer") from None


def _decode(meta: Mapping[str, str], get, keys: set[str], source: str) -> Delta:
    """The :class:`Delta` a file's metadata and tensors describe, every part checked."""
    try:
        return _decode_checked(meta, get, keys)
    except DeltaError as exc:
        raise DeltaError(f"{source}: {exc}") from None


def _decode_checked(meta: Mapping[str, str], get, keys: set[str]) -> Delta:
    kind = meta.get("format")
    if kind not in (TRL_DELTA, TRL_ANCHOR):
        raise DeltaError(f"not a delta or anchor file (format={kind!r}; expected "
                         f"{TRL_DELTA!r} or {TRL_ANCHOR!r})")
    sequence = _int(meta, "model_version")
    if _KEY not in meta:
        return _decode_trl(meta, get, keys, kind, sequence)
    try:
        ours = json.loads(meta[_KEY])
    except ValueError:
        raise DeltaError(f"metadata {_KEY} is not JSON; the file is corrupt") from None
    if not isinstance(ours, dict) or ours.get("format") != FORMAT:
        raise DeltaError(f"metadata {_KEY} is not of format {FORMAT}")
    loaded = {k: get(k) for k in sorted(keys)}
    digest = _header_digest(meta, [(k, t.dtype, tuple(t.shape)) for k, t in loaded.items()])
    if meta.get(_DIGEST) != digest:
        raise DeltaError("its header does not match its digest; the file is corrupt")
    get = loaded.__getitem__
    part = ours.get("part")
    if part is not None and not (isinstance(part, list) and len(part) == 2 and
                                 all(isinstance(x, int) for x in part) and 0 <= part[0] < part[1]):
        raise DeltaError(f"part {part!r} is not [rank, world]")
    delta = Delta(sequence=sequence, chain=ours.get("chain"), anchor=bool(ours.get("anchor")),
                  part=tuple(part) if part is not None else None,
                  anchor_sequence=_int(meta, "anchor_step", 0), label=meta.get("base_model_id", ""),
                  sha256=meta.get("checksum_sha256", ""))
    if delta.chain is not None and not isinstance(delta.chain, str):
        raise DeltaError("chain is not a string")
    table = ours.get("tensors")
    if not isinstance(table, dict):
        raise DeltaError("the tensor table is missing")
    for name, entry in table.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(isinstance(d, int) and d >= 0 for d in entry[0])):
            raise DeltaError(f"tensor {name!r}: its table entry is not [shape, dtype]")
        delta.shapes[name] = tuple(entry[0])
        delta.dtypes[name] = _dtype(entry[1])
    delta.sums = _parse_sums(ours.get("sums"), "sum") or {}
    delta.base_sums = _parse_sums(ours.get("base"), "base checksum")
    delta.result_sums = _parse_sums(ours.get("result"), "result checksum")
    whole = delta.anchor and delta.part is None
    expected = set()
    for name in delta.sums:
        if name not in delta.shapes:
            raise DeltaError(f"tensor {name!r} has a sum but no table entry")
        numel = math.prod(delta.shapes[name])
        if whole:
            expected.add(name)
            values = _tensor(get, keys, name, delta.dtypes[name])
            if tuple(values.shape) != delta.shapes[name]:
                raise DeltaError(f"tensor {name!r} has shape {tuple(values.shape)}, the table "
                                 f"says {delta.shapes[name]}")
            delta.values[name] = values.reshape(-1)
            continue
        expected.update((name + _INDICES, name + _VALUES))
        indices = _tensor(get, keys, name + _INDICES, None)
        values = _tensor(get, keys, name + _VALUES, delta.dtypes[name])
        delta.indices[name], delta.values[name] = _checked_entries(name, indices, values, numel)
    if whole and set(delta.sums) != set(delta.shapes):
        raise DeltaError("an anchor lacks tensors of its table: "
                         f"{sorted(set(delta.shapes) - set(delta.sums))[:5]}")
    if keys - expected:
        raise DeltaError(f"tensors not in its table: {sorted(keys - expected)[:5]}")
    pairs = [(_all_indices(delta, n), delta.values[n]) for n in delta.values]
    for name, got in zip(delta.values, _sum_of_entries(pairs)):
        if got != delta.sums[name]:
            raise DeltaError(f"tensor {name!r}: its indices and values hash to {_text(got)}, "
                             f"the file says {_text(delta.sums[name])}; the file is corrupt")
    return delta


def _tensor(get, keys: set[str], key: str, dtype: torch.dtype | None) -> Tensor:
    if key not in keys:
        raise DeltaError(f"tensor {key!r} is missing")
    t = get(key)
    if dtype is not None and t.dtype != dtype:
        raise DeltaError(f"tensor {key!r} is {t.dtype}, the table says {dtype}")
    return t


def _checked_entries(name: str, indices: Tensor, values: Tensor,
                     numel: int | None) -> tuple[Tensor, Tensor]:
    """Indices and values of one tensor, checked: 1-D integer indices, sorted, unique,
    non-negative, below ``numel`` (when known), as many as the values."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise DeltaError(f"indices of {name!r} are {indices.dtype} of shape "
                         f"{tuple(indices.shape)}, not a 1-D int32/int64 tensor")
    if values.dim() != 1 or values.numel() != indices.numel():
        raise DeltaError(f"tensor {name!r} has {indices.numel()} indices and values of shape "
                         f"{tuple(values.shape)}")
    bad = _first_bad_index(indices, numel)
    if bad is not None:
        raise DeltaError(f"indices of {name!r}: {bad}")
    return indices, values


def _first_bad_index(indices: Tensor, numel: int | None) -> str | None:
    """What is wrong with the first bad index (a host sync), or None when all are good."""
    if indices.numel() == 0:
        return None
    wide = indices.to(torch.int64)
    problems = torch.stack([
        (wide[1:] <= wide[:-1]).any() if wide.numel() > 1 else wide.new_zeros((), dtype=torch.bool),
        wide[0] < 0,
        wide[-1] >= numel if numel is not None else wide.new_zeros((), dtype=torch.bool),
    ]).tolist()
    if problems[0]:
        k = int(torch.nonzero(wide[1:] <= wide[:-1])[0]) + 1
        return (f"index {k} ({int(wide[k])}) is not above index {k - 1} ({int(wide[k - 1])}); "
                "indices must be sorted and unique")
    if problems[1]:
        return f"index 0 is negative ({int(wide[0])})"
    if problems[2]:
        k = int(torch.nonzero(wide >= numel)[0])
        return f"index {k} ({int(wide[k])}) is past the tensor's {numel} elements"
    return None


def _decode_trl(meta: Mapping[str, str], get, keys: set[str], kind: str, sequence: int) -> Delta:
    """A file written by TRL: no chain and no payload checksums; shapes known for anchors
    only."""
    delta = Delta(sequence=sequence, anchor=kind == TRL_ANCHOR, label=meta.get("base_model_id", ""),
                  sha256=meta.get("checksum_sha256", ""),
                  anchor_sequence=_int(meta, "anchor_step", 0))
    if delta.anchor:
        for name in sorted(keys):
            t = get(name)
            delta.shapes[name], delta.dtypes[name] = tuple(t.shape), t.dtype
            delta.values[name] = t.reshape(-1)
    else:
        if _int(meta, "prev_model_version", sequence - 1) != sequence - 1:
            raise DeltaError("prev_model_version is not model_version - 1")
        try:
            names = json.loads(meta.get("changed_params", "[]"))
        except ValueError:
            raise DeltaError("changed_params is not JSON") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise DeltaError("changed_params is not a list of names")
        for name in names:
            values = _tensor(get, keys, name + _VALUES, None)
            indices, values = _checked_entries(name, _tensor(get, keys, name + _INDICES, None),
                                               values, None)
            delta.indices[name], delta.values[name] = indices, values
            delta.dtypes[name] = values.dtype
    return delta


def _all_indices(delta: Delta, name: str) -> Tensor:
    """The flat indices of a tensor's entries (``arange`` for a whole tensor of an anchor)."""
    if name in delta.indices:
        return delta.indices[name]
    return torch.arange(delta.values[name].numel(), device=delta.values[name].device)


def _trl_sha256(weights: Mapping[str, Tensor], names: Iterable[str]) -> str:
    """TRL's ``checksum_sha256``: SHA-256 of the tensors' raw bytes in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        t = weights[name].detach().contiguous().cpu().reshape(-1)
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------ the sender


@dataclass
class _Slot:
    """One tracked param: its window and what the tracker knows of it."""

    name: str
    param: Tensor
    window: Tensor  # uint8 bitmap of the local shard: a slice of its device's buffer
    seen: float | Tensor  # the step count at the last look (a device tensor on device steps)
    offset: int  # global flat index of the local shard's element 0
    emits: bool  # False for the copies of a replicated DTensor on ranks other than 0
    group: dict  # the param's optimizer group (its change_dtype says what the bitmap means)
    image: torch.dtype  # the dtype the delta sends it in (synced_dtype)


class DeltaTracker:
    """Everything an optimizer changed since the last :meth:`collect`, for one consumer.

    A step post-hook ORs the optimizer's change bitmap of each param stepped in that step
    into this tracker's window, on the param's device, without a host sync. A param the step
    skipped (no gradient) keeps an older bitmap in the optimizer's state; it is recognised by
    its step count, which did not move, and not OR-ed. Several trackers may watch one
    optimizer (an engine synced every step, a checkpoint writer every 100).

    Args:
        optimizer: an ``rlvr_optim.AdamW`` (or a wrapper with ``.optimizer``) whose groups of
            the tracked params have ``track_changes="step"`` or ``"cumulative"``. An fp32
            param is sent as the image its group's ``change_dtype`` names (bf16 or float16),
            the image its change bitmap compares.
        named_params: ``(name, param)`` pairs, e.g. ``model.named_parameters()``.
        chain: this tracker's chain id (default: 16 random hex digits; under FSDP2 rank 0's,
            so that every rank's deltas name one chain).
        label: a free label written into the files (TRL's ``base_model_id``).

    The weights must change only through ``optimizer.step()`` while tracked; after loading
    other weights into the model, or changing an fp32 param's ``change_dtype``, send an
    :meth:`anchor`.
    """

    def __init__(self, optimizer, named_params: Iterable[tuple[str, Tensor]], *,
                 chain: str | None = None, label: str = "") -> None:
        while not hasattr(optimizer, "change_bitmap") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        if not hasattr(optimizer, "change_bitmap"):
            raise TypeError("DeltaTracker needs an rlvr_optim.AdamW, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.label = label
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._slots: list[_Slot] = []
        self._parts: set[tuple[int, int]] = set()
        for name, p in named_params:
            group = groups.get(id(p))
            if group is None:
                raise ValueError(f"param {name!r} is not a param of this optimizer")
            if group["track_changes"] == "off":
                raise ValueError(f"param {name!r}: its group has track_changes='off'; create the "
                                 "optimizer with track_changes='step' (or 'cumulative')")
            if any(s.name == name for s in self._slots):
                raise ValueError(f"param name {name!r} is given twice")
            self._slots.append(self._slot(name, p, group))
        # One buffer per device holds every window, so that collect() compacts them in place
        # (a concatenation would copy them: a 16th of the bf16 weights).
        self._buffers: dict[torch.device, tuple[Tensor, list[_Slot]]] = {}
        by_device: dict[torch.device, list[_Slot]] = {}
        for slot in self._slots:
            by_device.setdefault(slot.window.device, []).append(slot)
        for device, slots in by_device.items():
            sizes = [bitmaps.bitmap_bytes(distributed.local_tensor(s.param).numel()) for s in slots]
            buffer = torch.zeros(sum(sizes), dtype=torch.uint8, device=device)
            for slot, window in zip(slots, buffer.split(sizes)):
                slot.window = window
            self._buffers[device] = (buffer, slots)
        if len(self._parts) > 1:
            raise ValueError(f"tracked DTensor params lie on meshes of different ranks/sizes: "
                             f"{sorted(self._parts)}")
        self.part = next(iter(self._parts)) if self._parts else None
        if self.part is not None:  # a plain param beside sharded ones: rank 0 sends it
            for slot in self._slots:
                if not distributed.is_dtensor(slot.param):
                    slot.emits = self.part[0] == 0
        self.chain = chain if chain is not None else self._new_chain()
        self.sequence = 0
        self.anchor_sequence = 0
        self._blind: set[str] = set()  # params stepped without a change bitmap
        self._reimaged: set[str] = set()  # fp32 params stepped under another change_dtype
        self._groups = optimizer.param_groups  # the list the slots' groups come from
        self._start_sums = [_device_state_sum(self._synced_local(s).reshape(-1), s.offset)
                            if s.emits else None for s in self._slots]
        self._hook = optimizer.register_step_post_hook(self._after_step)

    def _slot(self, name: str, p: Tensor, group: dict) -> _Slot:
        layout = distributed.shard_layout(p, name)
        local = distributed.local_tensor(p)
        if layout is not None:
            self._parts.add((layout.rank, len(layout.rank_numels)))
        step = self.optimizer.state.get(p, {}).get("step")
        seen: float | Tensor = 0.0
        if isinstance(step, Tensor) and step.device.type != "cpu":
            seen = step.detach().clone()
        elif step is not None:
            seen = float(step)
        return _Slot(
            name=name, param=p,
            window=torch.zeros(0, dtype=torch.uint8, device=local.device),  # set below
            seen=seen,
            offset=0 if layout is None else layout.element_offset,
            emits=layout is None or layout.sharded or layout.rank == 0,
            group=group, image=synced_dtype(p.dtype, _change_dtype(group)),
        )

    def _new_chain(self) -> str:
        """16 random hex digits; with DTensor params, rank 0's (a broadcast on the mesh)."""
        ids = torch.tensor(list(secrets.token_bytes(8)), dtype=torch.uint8)
        dtensors = [s.param for s in self._slots if distributed.is_dtensor(s.param)]
        if dtensors:
            mesh = dtensors[0].device_mesh
            group = mesh.get_group()
            ids = ids.to(distributed.local_tensor(dtensors[0]).device)
            torch.distributed.broadcast(ids, src=torch.distributed.get_global_rank(group, 0),
                                        group=group)
        return bytes(ids.cpu().tolist()).hex()

    @staticmethod
    def _synced_local(slot: _Slot) -> Tensor:
        return synced_values(distributed.local_tensor(slot.param), slot.image)

    # ---------------------------------------------------------------- the hook

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if optimizer.param_groups is not self._groups:  # load_state_dict made new groups
            self._groups = optimizer.param_groups
            groups = {id(p): g for g in self._groups for p in g["params"]}
            for slot in self._slots:
                slot.group = groups.get(id(slot.param), slot.group)
        for slot in self._slots:
            step = optimizer.state.get(slot.param, {}).get("step")
            if step is None:
                continue
            bitmap = optimizer.change_bitmap(slot.param)
            if bitmap is None:  # its group's track_changes was set to "off"
                self._blind.add(slot.name)
                continue
            if synced_dtype(slot.param.dtype, _change_dtype(slot.group)) != slot.image:
                self._reimaged.add(slot.name)  # the bitmap now speaks of another image
            if isinstance(step, Tensor) and step.device.type != "cpu":
                # A device step count (capturable, fused, GradScaler): compare on the device.
                if not isinstance(slot.seen, Tensor):
                    slot.seen = torch.full_like(step, slot.seen)
                stepped = (step != slot.seen).to(torch.uint8)
                slot.window.bitwise_or_(bitmap * stepped.to(bitmap.device))
                slot.seen.copy_(step)
            else:
                count = float(step)  # a CPU tensor: no device sync
                if count != slot.seen:
                    slot.window.bitwise_or_(bitmap)
                    slot.seen = count

    def close(self) -> None:
        """Stop watching the optimizer (remove the step hook)."""
        self._hook.remove()

    # ---------------------------------------------------------------- deltas

    def _new_delta(self, anchor: bool) -> Delta:
        self.sequence += 1
        if anchor:
            self.anchor_sequence = self.sequence
        delta = Delta(sequence=self.sequence, chain=self.chain, anchor=anchor, part=self.part,
                      anchor_sequence=self.anchor_sequence, label=self.label)
        for slot in self._slots:
            delta.shapes[slot.name] = tuple(slot.param.shape)
            delta.dtypes[slot.name] = slot.image
        return delta

    @torch.no_grad()
    def collect(self) -> Delta:
        """The delta of everything changed since the previous :meth:`collect` /
        :meth:`anchor` (or since the tracker was made), and clear the window.

        Built on the params' devices: the windows are compacted into indices (one
        ``nonzero`` per device and batch of windows) and the changed values gathered;
        nothing the size of a weight tensor is copied or moved to the host. The first
        delta also carries the state checksums of the weights the tracker started from,
        so that a receiver holding them can start without an anchor.
        """
        if self._blind:
            raise RuntimeError(
                f"param {sorted(self._blind)[0]!r} was stepped while its group had "
                "track_changes='off', so this tracker cannot know what changed; turn tracking "
                "back on and send an anchor() (the next collect() then works again)")
        if self._reimaged:
            name = sorted(self._reimaged)[0]
            slot = next(s for s in self._slots if s.name == name)
            raise RuntimeError(
                f"param {name!r} was stepped with change_dtype={slot.group['change_dtype']}, "
                f"and this tracker sends it as {_dtype_name(slot.image)} images, so its change "
                "bitmap no longer says which of them changed; send an anchor() (it takes the "
                "new change_dtype; the next collect() then works again)")
        delta = self._new_delta(anchor=False)
        found = []
        for buffer, slots in self._buffers.values():
            found += zip(slots, _compact(buffer, [s.window.numel() for s in slots]))
        for slot, local_indices in found:
            if local_indices.numel() == 0 or not slot.emits:
                continue
            local = distributed.local_tensor(slot.param).detach()
            if local.is_contiguous():
                values = local.reshape(-1).index_select(0, local_indices)
            else:  # take() reads the elements in place; reshape() would copy the tensor
                values = torch.take(local, local_indices.to(torch.int64))
            values = synced_values(values, slot.image)
            indices = local_indices.to(_index_dtype(slot.param.numel()))
            if slot.offset:
                indices = indices + slot.offset
            delta.indices[slot.name], delta.values[slot.name] = indices, values
        for buffer, _ in self._buffers.values():
            buffer.zero_()
        if delta.sequence == 1:
            delta.base_sums = self._start_checksums()
        return delta

    def _start_checksums(self) -> dict[str, int]:
        sums = [(s.name, t) for s, t in zip(self._slots, self._start_sums) if t is not None]
        lanes = torch.stack([t.cpu() for _, t in sums]).tolist() if sums else []
        out = {name: 0 for name in (s.name for s in self._slots)}
        out.update({name: _to_int(pair) for (name, _), pair in zip(sums, lanes)})
        return out

    @torch.no_grad()
    def anchor(self) -> Delta:
        """Every element of the tracked weights as they are now (a full checkpoint, with
        its state checksums), and clear the window: the next :meth:`collect` holds what
        changes after it. Under FSDP2 each rank's anchor holds its shard."""
        for slot in self._slots:
            slot.image = synced_dtype(slot.param.dtype, _change_dtype(slot.group))
        delta = self._new_delta(anchor=True)
        self._blind.clear()
        self._reimaged.clear()
        for buffer, _ in self._buffers.values():
            buffer.zero_()
        for slot in self._slots:
            if not slot.emits:
                continue
            values = self._synced_local(slot).reshape(-1).clone()
            if self.part is not None:
                delta.indices[slot.name] = torch.arange(
                    slot.offset, slot.offset + values.numel(), device=values.device,
                    dtype=_index_dtype(slot.param.numel()))
            delta.values[slot.name] = values
        return delta


def _change_dtype(group: Mapping[str, Any]) -> torch.dtype:
    """A group's ``change_dtype`` (stored by name: ``"bfloat16"`` or ``"float16"``)."""
    value = group.get("change_dtype", torch.bfloat16)
    return value if isinstance(value, torch.dtype) else getattr(torch, value)


# Row v: the 8 bits of byte value v, least significant first (the bitmap's bit order).
_BYTE_BITS = {torch.device("cpu"): (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1 == 1}


def _compact(buffer: Tensor, sizes: list[int]) -> list[Tensor]:
    """Ascending element indices (int32; int64 past 2^31) of the set bits of each bitmap
    lying in ``buffer`` one after another (``sizes`` bytes each), on its device.

    The bitmaps are compacted in place, a batch of up to ``_WINDOW_BATCH`` bytes at a time:
    one ``nonzero`` over their bytes, the set bytes expanded to bits (a table row per byte),
    a ``nonzero`` over those, then one split: three host syncs per batch however many
    tensors, and temporaries of about 20 bytes per changed element.
    """
    batches: list[list[int]] = []  # window numbers
    total = 0
    for k, size in enumerate(sizes):
        if not batches or total + size > _WINDOW_BATCH:
            batches.append([])
            total = 0
        batches[-1].append(k)
        total += size
    out: list[Tensor] = []
    first = 0  # byte of the batch's first window in the buffer
    table = _BYTE_BITS.setdefault(buffer.device,
                                  _BYTE_BITS[torch.device("cpu")].to(buffer.device))
    for batch in batches:
        flat = buffer[first:first + sum(sizes[k] for k in batch)]
        first += flat.numel()
        index_dtype = torch.int64 if flat.numel() * 8 >= _INT32_LIMIT else torch.int32
        set_bytes = torch.nonzero(flat).reshape(-1).to(index_dtype)
        bits = table.index_select(0, flat.index_select(0, set_bytes).to(index_dtype))
        where = torch.nonzero(bits.reshape(-1)).reshape(-1).to(index_dtype)
        del bits
        positions = set_bytes.mul_(8).index_select(0, where >> 3).add_(where & 7)
        del set_bytes, where
        starts = [0]
        for k in batch:
            starts.append(starts[-1] + sizes[k] * 8)
        bounds = torch.searchsorted(positions, torch.tensor(starts, dtype=index_dtype,
                                                            device=buffer.device)).tolist()
        for j in range(len(batch)):
            piece = positions[bounds[j]:bounds[j + 1]]
            out.append(piece - starts[j] if starts[j] else piece)
    return out


def merge_deltas(parts: Sequence[Delta]) -> Delta:
    """Join the parts of one sequence from all ranks of a sharded model into one delta.

    Raises :class:`DeltaError` unless the parts are one of each rank ``0 .. world - 1``
    of one chain and sequence, describing the same tensors.
    """
    if not parts:
        raise DeltaError("no parts to merge")
    first = parts[0]
    if first.part is None:
        raise DeltaError("these deltas are whole, not parts of a sharded model")
    world = first.part[1]
    ranks = sorted(p.part[0] if p.part else -1 for p in parts)
    if ranks != list(range(world)) or any(p.part[1] != world for p in parts):
        raise DeltaError(f"merging needs one part of each of the {world} ranks, got ranks {ranks}")
    for p in parts:
        if (p.chain, p.sequence, p.anchor) != (first.chain, first.sequence, first.anchor) or \
                p.shapes != first.shapes or p.dtypes != first.dtypes:
            raise DeltaError(f"part {p.part} is of chain {p.chain} sequence {p.sequence}, part "
                             f"{first.part} of chain {first.chain} sequence {first.sequence}")
    ordered = sorted(parts, key=lambda p: p.part[0])
    merged = Delta(sequence=first.sequence, chain=first.chain, anchor=first.anchor,
                   shapes=dict(first.shapes), dtypes=dict(first.dtypes),
                   anchor_sequence=first.anchor_sequence, label=first.label)
    for name in first.shapes:
        pieces = [p for p in ordered if name in p.values]
        if not pieces:
            continue
        indices = torch.cat([p.indices[name].to(pieces[0].indices[name].device) for p in pieces])
        values = torch.cat([p.values[name].to(pieces[0].values[name].device) for p in pieces])
        bad = _first_bad_index(indices, math.prod(first.shapes[name]))
        if bad is not None:
            raise DeltaError(f"the parts' indices of {name!r} overlap or are out of order: {bad}")
        if merged.anchor:
            if values.numel() != math.prod(first.shapes[name]):
                raise DeltaError(f"the parts of anchor tensor {name!r} hold {values.numel()} of "
                                 f"its {math.prod(first.shapes[name])} elements")
            merged.values[name] = values
        else:
            merged.indices[name], merged.values[name] = indices, values
    if all(p.base_sums is not None for p in parts):
        merged.base_sums = {}
        for name in first.shapes:
            total = 0
            for p in parts:
                total = _add(total, p.base_sums.get(name, 0))
            merged.base_sums[name] = total
    return merged


# ------------------------------------------------------------------------ the receiver


@dataclass
class _Position:
    """Where a receiver's tensor stands: the last delta written into it."""

    chain: str | None
    sequence: int
    checksum: int | None  # state checksum, when known
    version: int  # the tensor's version counter after that write


_POSITIONS = None


def _positions():
    global _POSITIONS
    if _POSITIONS is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _POSITIONS = WeakTensorKeyDictionary()
    return _POSITIONS


def _named_tensors(weights) -> dict[str, Tensor]:
    if isinstance(weights, torch.nn.Module):
        return {**dict(weights.named_buffers()), **dict(weights.named_parameters())}
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict of tensors or an nn.Module, got "
                        f"{type(weights).__name__}")
    return dict(weights)


def position(weights, name: str | None = None) -> tuple[str | None, int] | None:
    """``(chain, sequence)`` of the last delta applied to ``weights`` (to tensor ``name``,
    default: the first tensor with one), or None."""
    tensors = _named_tensors(weights)
    names = [name] if name is not None else list(tensors)
    for n in names:
        record = _positions().get(tensors[n])
        if record is not None and record.version == tensors[n]._version:
            return record.chain, record.sequence
    return None


def apply_delta(weights, delta: Delta) -> None:
    """Apply ``delta`` in place to ``weights`` (a dict of tensors or an ``nn.Module``).

    Everything is checked before anything is written, at a cost that grows with the
    delta, not the model: the tensors exist with the delta's element counts and dtypes; the
    indices are sorted, unique and in range; the payload hashes to its checksums; the
    weights are where the delta starts (same chain, the sequence before it, not changed
    in place since; or, for the first delta of a tracker and for patches between
    checkpoints, weights whose state checksums match the delta's base, computed once);
    and, where the delta names the result's state checksums, the result matches them.
    Any mismatch raises :class:`DeltaError` and leaves ``weights`` untouched. Values are
    scattered on each tensor's own device.
    """
    tensors = _named_tensors(weights)
    if delta.part is not None:
        raise DeltaError(f"this delta is part {delta.part[0]} of {delta.part[1]} (one rank's "
                         "shard): merge the parts of all ranks with merge_deltas() first")
    plan = _plan(tensors, delta)
    with torch.no_grad():
        for name, (indices, values) in plan.writes.items():
            target = tensors[name]
            if indices is None:
                target.copy_(values.reshape(target.shape))
            else:
                target.put_(indices, values)
    positions = _positions()
    for name in plan.names:
        positions[tensors[name]] = _Position(delta.chain, delta.sequence,
                                             plan.checksums.get(name), tensors[name]._version)


@dataclass
class _Plan:
    names: list[str]
    writes: dict[str, tuple[Tensor | None, Tensor]]
    checksums: dict[str, int | None]


def _plan(tensors: dict[str, Tensor], delta: Delta) -> _Plan:
    """The writes of :func:`apply_delta` and the checksums after them, all checks done."""
    names = list(delta.shapes) if delta.shapes else list(delta.values)
    for name in names:
        if name not in tensors:
            raise DeltaError(f"tensor {name!r} of the delta is not in these weights")
        t = _plain(tensors[name], name)
        shape = delta.shapes.get(name)
        if shape is not None and t.numel() != math.prod(shape):
            raise DeltaError(f"tensor {name!r} has {t.numel()} elements here, "
                             f"{math.prod(shape)} in the delta")
        if t.dtype != delta.dtypes[name]:
            raise DeltaError(f"tensor {name!r} is {t.dtype} here, {delta.dtypes[name]} in the "
                             "delta")
    writes: dict[str, tuple[Tensor | None, Tensor]] = {}
    for name, values in delta.values.items():
        t = tensors[name]
        if name in delta.indices:
            indices = delta.indices[name]
            bad = _first_bad_index(indices, t.numel())
            if bad is not None:
                raise DeltaError(f"indices of {name!r}: {bad}")
            writes[name] = (indices.to(device=t.device, dtype=torch.int64),
                            values.to(t.device))
        else:
            if values.numel() != t.numel():
                raise DeltaError(f"anchor tensor {name!r} holds {values.numel()} values, the "
                                 f"tensor has {t.numel()}")
            writes[name] = (None, values.to(t.device))
    arrived = dict(zip(writes, _sum_of_entries([(_entry_indices(w), w[1])
                                                 for w in writes.values()])))
    for name, got in arrived.items():
        if name in delta.sums and got != delta.sums[name]:
            raise DeltaError(f"tensor {name!r}: its indices and values hash to {_text(got)}, the "
                             f"delta says {_text(delta.sums[name])}; the delta is corrupt")
    current = _current_checksums(tensors, names, delta)
    checksums = _after(tensors, delta, writes, current, arrived)
    if delta.result_sums is not None:
        for name in names:
            want = delta.result_sums.get(name)
            if want is not None and checksums.get(name) is not None and checksums[name] != want:
                raise DeltaError(
                    f"tensor {name!r}: applying the delta gives state {_text(checksums[name])}, "
                    f"the delta promises {_text(want)}: it was made from other weights")
    if delta.chain is None and delta.base_sums is None and delta.sha256:
        _check_trl_sha256(tensors, delta, writes)
    return _Plan(names, writes, checksums)


def _entry_indices(write: tuple[Tensor | None, Tensor]) -> Tensor:
    indices, values = write
    return indices if indices is not None else torch.arange(values.numel(), device=values.device)


def _current_checksums(tensors: dict[str, Tensor], names: list[str],
                       delta: Delta) -> dict[str, int | None]:
    """The state checksums of the weights before the delta (None where unknown and not
    needed), after checking that the weights are where the delta starts."""
    records = {n: _positions().get(tensors[n]) for n in names}
    valid = {n: r for n, r in records.items()
             if r is not None and r.version == tensors[n]._version}
    known = {n: r.checksum for n, r in valid.items()}
    if delta.anchor and delta.part is None:
        return {n: None for n in names}
    moved = [n for n, r in records.items() if r is not None and n not in valid]
    if moved and delta.base_sums is None:
        record = records[moved[0]]
        raise DeltaError(f"tensor {moved[0]!r} was changed in place since delta "
                         f"{record.sequence} was applied to it (not by apply_delta); these "
                         "weights are no longer that delta's result: apply an anchor")
    positioned = len(valid) == len(names) and names and \
        len({(r.chain, r.sequence) for r in valid.values()}) == 1
    at = next(iter(valid.values())) if positioned else None
    if delta.chain is not None and at is not None and at.chain == delta.chain:
        if at.sequence >= delta.sequence:
            raise DeltaError(f"these weights are at sequence {at.sequence} of chain {delta.chain}; "
                             f"delta {delta.sequence} was already applied (repeated)")
        if at.sequence != delta.sequence - 1:
            raise DeltaError(f"delta {delta.sequence} of chain {delta.chain} applies to sequence "
                             f"{delta.sequence - 1}, these weights are at {at.sequence}: apply "
                             f"deltas {at.sequence + 1}..{delta.sequence - 1} first (out of order)")
        return known
    if delta.base_sums is not None:
        missing = [n for n in names if known.get(n) is None]
        computed = state_checksums({n: tensors[n] for n in missing})
        known.update(computed)
        for name in names:
            want = delta.base_sums.get(name)
            if want is not None and known[name] != want:
                where = (f"delta {delta.sequence} of chain {delta.chain}" if delta.chain
                         else f"patch sequence {delta.sequence}")
                raise DeltaError(f"{where} applies to other weights: tensor {name!r} has state "
                                 f"{_text(known[name])} here, the delta's base is {_text(want)}")
        return known
    if delta.chain is None and (delta.sha256 or (at is not None and at.chain is None
                                                 and at.sequence == delta.sequence - 1)):
        return known  # a TRL file: checked by its SHA-256 after, or by its model_version
    if delta.chain is None:
        raise DeltaError(f"this TRL delta (model_version {delta.sequence}) has no checksum_sha256 "
                         f"and these weights did not receive model_version {delta.sequence - 1}: "
                         "apply its anchor first")
    if at is not None:
        raise DeltaError(f"delta {delta.sequence} is of chain {delta.chain}, these weights follow "
                         f"chain {at.chain} (at sequence {at.sequence}): it is for another base")
    raise DeltaError(f"these weights have no position in chain {delta.chain}: apply its anchor "
                     f"(or its first delta) before delta {delta.sequence}")


def _after(tensors: dict[str, Tensor], delta: Delta, writes: dict,
           current: dict[str, int | None], arrived: dict[str, int]) -> dict[str, int | None]:
    """State checksums after the writes: from the old and new values of the changed
    elements (O(delta)); an anchor's payload sums are its state checksums."""
    if delta.anchor and delta.part is None:
        return dict(arrived)
    changed = [n for n in writes if current.get(n) is not None]
    old = _sum_of_entries([(writes[n][0], torch.take(tensors[n], writes[n][0]))
                           for n in changed])
    out = dict(current)
    for name, old_sum in zip(changed, old):
        out[name] = _add(_add(current[name], old_sum, -1), arrived[name])
    return out


def _check_trl_sha256(tensors: dict[str, Tensor], delta: Delta, writes: dict) -> None:
    """TRL's whole-model SHA-256 of the result (a TRL file's only check; a pass over the
    model), computed with copies of the changed tensors only."""
    result = dict(tensors)
    for name, (indices, values) in writes.items():
        result[name] = tensors[name].detach().clone()
        if indices is None:
            result[name].copy_(values.reshape(result[name].shape))
        else:
            result[name].put_(indices, values)
    got = _trl_sha256(result, result)
    if got != delta.sha256:
        raise DeltaError(f"applying it gives weights with SHA-256 {got[:16]}, its "
                         f"checksum_sha256 is {delta.sha256[:16]}: it is for other weights or "
                         "corrupt")
