"""Fused AdamW step in Triton: each input read once, each output written once, bit for bit
equal to :func:`rlvr_optim.reference.adamw`, in a handful of launches per step.

Layout: the step of one chunk is the reference's three stages, :func:`_load_weight`, the
optimizer's math :func:`_adamw_math` (registers only, in the order of the reference) and
:func:`_store_and_flag` (its storage format in :func:`_store_weight`), called by
:func:`_adamw_chunk`, which loads and places one chunk of a work item; the ``_*_bf16``
helpers are the bf16 conversions. ``adamw_table_kernel`` steps a whole group of tensors of
one layout in one launch of persistent programs, reading each tensor's pointers from a
cached device table (rows of :mod:`rlvr_optim.table`) once per work item (a long run of one
tensor), because launch overhead dominates models with many small tensors and per-chunk
overhead dominates large ones. :func:`adamw` checks inputs, groups and launches. Every mode
is a ``tl.constexpr`` flag, so a launch compiles only the branches it uses.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), where fp32
arithmetic is numpy fp32 (IEEE, no contraction); on a GPU it is launched with
``enable_fp_fusion=False`` and uses ``tl.div_rn`` / ``tl.sqrt_rn``, so no operation is
fused or approximated. bf16 tensors are read through int16 pointers and converted with integer
bit operations: the interpreter's own fp32 -> bf16 cast truncates.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from rlvr_optim.checks import STRICT_GRADS, Policy, check_tensors
from rlvr_optim.operands import Operands, StepInputs, call_operands
from rlvr_optim.plan import PlannedCall, Planner
from rlvr_optim.reference import check_arguments
from rlvr_optim.table import COUNTER_NAMES, ROW, ROW_FIELDS

__all__ = [
    "adamw",
    "adamw_table_kernel",
    "prepare",
    "planner",
    "DEFAULT_BLOCK_CPU",
    "DEFAULT_ITEM_CPU",
    "DEFAULT_BLOCK_GPU",
    "DEFAULT_NUM_WARPS_GPU",
    "DEFAULT_ITEM_GPU",
    "DEFAULT_STAGES_GPU",
    "DEFAULT_PROGRAMS_PER_SM",
    "SmLimits",
    "programs_per_sm",
    "sm_limits",
]

# Launch shape. Under the interpreter every Triton op is one numpy call, so large chunks
# amortize the per-op Python cost. On a GPU: 8 elements per thread (a bitmap byte is one
# thread's), chunks of 1024 elements at 4 warps as in the feasibility probe (DESIGN.md),
# work items of 64 chunks so the table row and scalars are read once per 65536 elements,
# three pipeline stages (the chunk loop copies chunk i + 2 while it computes chunk i; at two
# the loop head waits for every copy, issued after the chunk's stores, so loads overlap no
# math: bench/static_report.py, loads_overlap_math), as many programs per SM as fit at once
# (:func:`programs_per_sm` of the compiled kernel; a number here overrides it). None of
# these is tuned on a GPU yet; ``python bench/static_report.py`` prints what they compile to.
DEFAULT_BLOCK_CPU = 65536
DEFAULT_ITEM_CPU = 2**20
DEFAULT_BLOCK_GPU = 1024
DEFAULT_NUM_WARPS_GPU = 4
DEFAULT_ITEM_GPU = 65536
DEFAULT_STAGES_GPU = 3
DEFAULT_PROGRAMS_PER_SM: int | None = None


# ---------------------------------------------------------------------------------------
# bf16 bit patterns. Patterns are uint32 tensors; a bf16 pattern sits in the low 16 bits.
# ---------------------------------------------------------------------------------------


@triton.jit
def _is_nan_bits(bits):
    return (bits & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _bf16_bits_to_fp32(bits):
    """Exact fp32 value of bf16 patterns."""
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_nearest_bf16(bits):
    """fp32 patterns -> bf16 patterns, nearest with ties to even; NaN -> quiet NaN.

    No uint32 wrap-around: the largest non-NaN pattern, 0xFF800000 (-inf), plus 0x8000 fits.
    """
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(_is_nan_bits(bits), (bits >> 16) | 0x0040, rounded)


@triton.jit
def _round_computed_bf16(x, HW_BF16: tl.constexpr):
    """A computed fp32 value -> its bf16 pattern, nearest with ties to even as
    :func:`_round_nearest_bf16`, any NaN as the spec's canonical 0x7FC0 (so the value need
    not be canonical). ``HW_BF16`` (compiled for a GPU): by the hardware conversion
    (``cvt.rn.bf16x2.f32``, one instruction per two values); the interpreter's cast
    truncates, so there the integer formula."""
    if HW_BF16:
        bits = x.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        bits = _round_nearest_bf16(x.to(tl.uint32, bitcast=True))
    return tl.where(x != x, 0x7FC0, bits)


@triton.jit
def _round_stochastic_bf16(bits, random16):
    """fp32 patterns -> bf16 patterns, rounding up with probability (low half) / 2**16."""
    rounded = (bits + random16) >> 16
    return tl.where(_is_nan_bits(bits), (bits >> 16) | 0x0040, rounded)


@triton.jit
def _split_remainder(bits):
    """fp32 patterns -> (bf16 pattern rounded half away from zero, int16 remainder).

    ``(hi << 16) + remainder == bits``; the uint32 difference wraps to the two's complement
    of the signed remainder in [-0x8000, 0x7FFF], so truncating it to int16 is exact.
    """
    nan = _is_nan_bits(bits)
    hi = tl.where(nan, (bits >> 16) | 0x0040, (bits + 0x8000) >> 16)
    remainder = tl.where(nan, 0, bits - (hi << 16))
    return hi, remainder.to(tl.int32, bitcast=True).to(tl.int16)


@triton.jit
def _join_remainder(hi, remainder):
    """Exact fp32 patterns from bf16 patterns and int16 remainders (modulo 2**32)."""
    return (hi << 16) + remainder.to(tl.int32).to(tl.uint32, bitcast=True)


# ---------------------------------------------------------------------------------------
# float16 bit patterns (reference.py, "float16 storage"), uint32 tensors as above.
# ---------------------------------------------------------------------------------------


@triton.jit
def _fp16_bits_to_fp32(bits, HW_BF16: tl.constexpr):
    """The fp32 value of float16 patterns: exact but for a NaN's payload. ``HW_BF16``
    (compiled for a GPU): the hardware conversion, exact on every other pattern (it may
    quiet a NaN); else integer operations that keep a NaN's sign and payload unquieted
    (numpy's conversion handles NaNs its own way). Only the step's math and the "moved"
    count read the result, and neither depends on a NaN's bits (:func:`_store_and_flag`)."""
    if HW_BF16:
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    sign = (bits & 0x8000) << 16
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    normal = ((exponent + 112) << 23) | (mantissa << 13)
    subnormal = (mantissa.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
    special = 0x7F800000 | (mantissa << 13)
    magnitude = tl.where(exponent == 31, special, tl.where(exponent == 0, subnormal, normal))
    return (sign | magnitude).to(tl.float32, bitcast=True)


@triton.jit
def _fp16_window(bits):
    """(sign, kept, window, sticky) of fp32 patterns on the way to float16, as
    ``reference._fp16_window``, in 32-bit operations with every shift below 32: the
    significand (implicit bit included) shifted right by ``max(126 - exponent, 13)`` bits,
    capped at 40, above the float16 exponent ``exponent - 113`` (normal range only)."""
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    exponent = (magnitude >> 23).to(tl.int32)
    significand = tl.where(exponent > 0, (magnitude & 0x7FFFFF) | 0x800000, magnitude)
    shift = tl.minimum(tl.maximum(126 - tl.maximum(exponent, 1), 13), 40).to(tl.uint32)
    above = (tl.maximum(exponent - 113, 0).to(tl.uint32)) << 10
    kept = above + (significand >> tl.minimum(shift, 24))
    short = shift <= 16  # all discarded bits are in the window
    window = tl.where(short, significand << (16 - tl.minimum(shift, 16)),
                      significand >> (tl.maximum(shift, 16) - 16)) & 0xFFFF
    sticky = tl.where(short, 0, ((significand << (48 - tl.maximum(shift, 17))) != 0).to(tl.uint32))
    return sign, kept, window, sticky


@triton.jit
def _fp16_nan(bits):
    """The float16 quiet NaN of fp32 NaN patterns: sign | 0x7E00 | top 9 payload bits, as
    torch's cast."""
    return ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)


@triton.jit
def _round_nearest_fp16(bits):
    """fp32 patterns -> float16 patterns, nearest even as torch's cast (+-inf past the
    largest float16, NaN -> :func:`_fp16_nan`)."""
    sign, kept, window, sticky = _fp16_window(bits)
    kept = kept + ((window + 0x7FFF + ((kept & 1) | sticky)) >> 16)
    rounded = sign | tl.minimum(kept, 0x7C00)
    return tl.where(_is_nan_bits(bits), _fp16_nan(bits), rounded)


@triton.jit
def _round_stochastic_fp16(w, random16):
    """A computed fp32 value -> its float16 pattern, rounded up with probability window /
    2**16 (reference.fp32_to_fp16_bits_stochastic), any NaN as 0x7E00 (the image of the
    canonical NaN the spec makes of every computed NaN, so ``w`` need not be canonical).

    One word ``aligned`` holds the kept magnitude above its 16-bit window (kept << 16 |
    window) and the sign on top, so that adding ``random16`` carries into the kept LSB
    exactly when the spec rounds up, and ``>> 16`` is the result. Normal float16 range: the
    pattern rebased by 112 exponents and shifted left by 3, which is ``(m << 3) +
    0x40000000`` modulo 2**32, magnitudes from 2**16 clamped to 2**16 (0x7C00, +-inf);
    below 2**-14: ``floor(|w| * 2**40)`` by the truncating conversion, exact (a power of two
    scaling, < 2**26), the spec's ``significand << 16 >> shift`` with every bit past the
    window dropped. Out of its range that conversion overflows; its lanes are not selected
    (the interpreter's numpy warns, :func:`_run` silences it)."""
    bits = w.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    normal = (tl.minimum(magnitude, 0x47800000) << 3) + 0x40000000
    subnormal = (tl.abs(w) * 1099511627776.0).to(tl.uint32)
    aligned = tl.where(magnitude < 0x38800000, subnormal, normal) | (bits & 0x80000000)
    return tl.where(w != w, 0x7E00, (aligned + random16) >> 16)


@triton.jit
def _round_computed_fp16(x, HW_BF16: tl.constexpr):
    """A computed fp32 value -> its float16 pattern, nearest even, any NaN as 0x7E00 (the
    image of the canonical NaN). ``HW_BF16`` (compiled for a GPU): by the hardware
    conversion (``cvt.rn.f16.f32``), else the integer formula."""
    if HW_BF16:
        bits = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        bits = _round_nearest_fp16(x.to(tl.uint32, bitcast=True))
    return tl.where(x != x, 0x7E00, bits)


@triton.jit
def _round_nearest_half(bits, FP16: tl.constexpr):
    """fp32 patterns (any, stored ones included) -> their nearest-even bf16 or float16
    (``FP16``) patterns."""
    if FP16:
        return _round_nearest_fp16(bits)
    else:
        return _round_nearest_bf16(bits)


@triton.jit
def _round_computed_half(x, FP16: tl.constexpr, HW_BF16: tl.constexpr):
    if FP16:
        return _round_computed_fp16(x, HW_BF16)
    else:
        return _round_computed_bf16(x, HW_BF16)


@triton.jit
def _half_bits_to_fp32(bits, FP16: tl.constexpr, HW_BF16: tl.constexpr):
    if FP16:
        return _fp16_bits_to_fp32(bits, HW_BF16)
    else:
        return _bf16_bits_to_fp32(bits)


@triton.jit
def _random16(seed, index_base, offs, row_offs, SR_ROW_CALLS: tl.constexpr,
              HALVES: tl.constexpr):
    """The 16 random bits of the elements at global indices ``index_base`` (int64) +
    ``offs`` (:func:`_chunk_offsets`): element i takes the 16-bit half i & 7 of
    Philox4x32-10 keyed by (key_lo, key_hi) (``seed``: key_lo | key_hi << 32, as
    ``tl.philox`` takes it), countered by (c_lo, c_hi, 0, 0) for c = i >> 3 (word
    (i & 7) >> 1, low half when i is even; reference.py).

    ``SR_ROW_CALLS``: ``index_base`` is a multiple of 8, so row r (``row_offs``) is exactly
    the call for counter ``index_base // 8 + r`` and each element's half is fixed by its
    position: one call per 8 elements, the selects resolved at compile time. Otherwise
    (a shard starting inside a group of 8) each element makes its own call and picks its
    half at run time.
    """
    if SR_ROW_CALLS:
        counter = (index_base >> 3) + row_offs
        position = _bit_positions(HALVES)  # i & 7 of each element of a row
    else:
        index = index_base + offs
        counter = index >> 3
        position = (index & 7).to(tl.int32)
    counter_lo = counter.to(tl.uint32)
    counter_hi = (counter >> 32).to(tl.uint32)
    zero = counter_lo * 0
    x0, x1, x2, x3 = tl.philox(seed, counter_lo, counter_hi, zero, zero)
    if SR_ROW_CALLS:
        x0 = _by_row(x0, HALVES)
        x1 = _by_row(x1, HALVES)
        x2 = _by_row(x2, HALVES)
        x3 = _by_row(x3, HALVES)
    word = tl.where(position < 4, tl.where(position < 2, x0, x1),
                    tl.where(position < 6, x2, x3))
    return (word >> (16 * (position & 1)).to(tl.uint32)) & 0xFFFF


# ---------------------------------------------------------------------------------------
# Loads, stores and packed bitmaps.
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_bf16_bits(ptr, offs, mask):
    """bf16 patterns (from an int16 view) as uint32."""
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _store_bf16_bits(ptr, offs, bits, mask):
    tl.store(ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _keep(update, new, old):
    """``new`` where the element is updated, else ``old`` (its loaded bits, unchanged).
    Without a freeze mask or found_inf, ``update`` on a full chunk is a constant true mask
    and the select folds away."""
    return tl.where(update, new, old)


@triton.jit
def _load_state(ptr, at, IS_BF16: tl.constexpr):
    """A state as loaded at a chunk's elements (:class:`_Place`): fp32 values, or bf16
    patterns (from an int16 view) as uint32."""
    if IS_BF16:
        raw = _load_bf16_bits(ptr, at.offs, at.in_range)
    else:
        raw = tl.load(ptr + at.offs, mask=at.in_range, other=0.0)
    return raw


@triton.jit
def _state_value(raw, IS_BF16: tl.constexpr):
    """The exact fp32 value of a state as loaded by :func:`_load_state`."""
    if IS_BF16:
        raw = _bf16_bits_to_fp32(raw)
    return raw


@triton.jit
def _store_state(ptr, at, value, raw, update, IS_BF16: tl.constexpr, HW_BF16: tl.constexpr):
    """Store fp32 ``value`` at a chunk's elements (:class:`_Place`) of an fp32 tensor, or a
    bf16 one (int16 view) by nearest-even, a NaN as the canonical one of the dtype; where
    ``update`` is false store ``raw``, the state as loaded, bit for bit (selected as bits:
    rounding a loaded bf16 NaN would quiet it)."""
    if IS_BF16:
        bits = _keep(update, _round_computed_bf16(value, HW_BF16), raw)
        _store_bf16_bits(ptr, at.offs, bits, at.in_range)
    else:
        tl.store(ptr + at.offs, _keep(update, _canonical_nan(value), raw), mask=at.in_range)


@triton.jit
def _chunk_offsets(BLOCK: tl.constexpr, HALVES: tl.constexpr):
    """Element offsets of a chunk in rows of 8 (one bitmap byte each), shaped so that the
    compiler gives each thread whole rows, so a row's bitmap byte is one thread's and
    packing it needs no other thread: [BLOCK // 8, 8], element 8 r + c at [r, c]. The
    compiler gives a thread as many consecutive elements as one 16-byte access of the
    narrowest stream holds, 8 of bf16 or float16 (one access; fp32 streams: two); with
    every stream 4 bytes wide (``HALVES``) that would be 4, half a row, so such layouts take
    [2, BLOCK // 8, 4] instead, element 8 r + 4 h + c at [h, r, c]: a half is one 16-byte
    access and both halves are the thread's."""
    if HALVES:
        h = tl.arange(0, 2)[:, None, None]
        r = tl.arange(0, BLOCK // 8)[None, :, None]
        c = tl.arange(0, 4)[None, None, :]
        offs = 8 * r + 4 * h + c
    else:
        offs = 8 * tl.arange(0, BLOCK // 8)[:, None] + tl.arange(0, 8)[None, :]
    return offs


@triton.jit
def _bit_positions(HALVES: tl.constexpr):
    """Bit of each position of a row in its bitmap byte, shaped as
    :func:`_chunk_offsets` places a row ([1, 8], or [2, 1, 4] with ``HALVES``)."""
    if HALVES:
        positions = 4 * tl.arange(0, 2)[:, None, None] + tl.arange(0, 4)[None, None, :]
    else:
        positions = tl.arange(0, 8)[None, :]
    return positions


@triton.jit
def _by_row(x, HALVES: tl.constexpr):
    """A value per row ([BLOCK // 8]) placed to broadcast over the rows' elements."""
    if HALVES:
        x = x[None, :, None]
    else:
        x = x[:, None]
    return x


@triton.jit
def _unpack_bits(packed, HALVES: tl.constexpr):
    """Bitmap bytes, one per row ([BLOCK // 8]), as the rows' booleans (shaped as
    :func:`_chunk_offsets`): bit i % 8 of byte i // 8."""
    return ((_by_row(packed.to(tl.int32), HALVES) >> _bit_positions(HALVES)) & 1) != 0


@triton.jit
def _pack_bits(bits, HALVES: tl.constexpr):
    """Booleans of a chunk (shaped as :func:`_chunk_offsets`) as the rows' bitmap bytes
    (int32 [BLOCK // 8], < 256)."""
    shifted = bits.to(tl.int32) << _bit_positions(HALVES)
    if HALVES:
        packed = tl.sum(tl.sum(shifted, axis=2), axis=0)
    else:
        packed = tl.sum(shifted, axis=1)
    return packed


@triton.jit
def _pack_words(packed):
    """The rows' bitmap bytes (int32 [R], < 256, R a multiple of 8) as the 8-byte bitmap
    words they make (uint64 [R]): row r gets word r // 8, byte j of which is row
    8 (r // 8) + j, so every row of a word holds all of it.

    Rows are one thread each: the 8 bytes of a word come from 8 threads of a warp, whose
    butterfly reductions leave every one of them with the sum (disjoint bits: the sum is
    their OR). Four bytes combine in 32 bits, then the two halves, a little cheaper on
    sm_90 than one 64-bit reduction over 8 (bench/static_report.py). Broadcasting the word
    back to its rows keeps it where the reduction left it, so the store needs no layout
    change through shared memory; a word's 8 threads then store the same 8 bytes at one
    address, one 32-byte sector per warp as the byte stores were."""
    n: tl.constexpr = packed.shape[0]
    quads = tl.reshape(packed.to(tl.uint32), [n // 4, 4])
    halves = tl.sum(quads << (8 * tl.arange(0, 4)).to(tl.uint32)[None, :], axis=1)
    pairs = tl.reshape(halves, [n // 8, 2]).to(tl.uint64)
    words = tl.sum(pairs << (32 * tl.arange(0, 2)).to(tl.uint64)[None, :], axis=1)
    return tl.reshape(tl.broadcast_to(words[:, None], [n // 8, 8]), [n])


@triton.jit
def _as_words(bitmap_ptr):
    """A bitmap's byte pointer as a pointer to its 8-byte words (the caller knows it is a
    multiple of 8 bytes)."""
    return bitmap_ptr.to(tl.pointer_type(tl.uint64))


@triton.jit
def _word_bytes(words, rows):
    """Each row's byte (int32 [R]) of the bitmap words its rows hold (uint64 [R], as
    :func:`_pack_words` returns them); ``rows``: the rows' indices, from a multiple of 8."""
    return ((words >> (8 * (rows % 8)).to(tl.uint64)) & 0xFF).to(tl.int32)


@triton.jit
def _popcount8(byte, HW_POPC: tl.constexpr):
    """Set bits of int32 values below 256 (a packed row's booleans). ``HW_POPC`` (compiled
    for a GPU): the hardware's ``popc``, one instruction (the interpreter has no libdevice);
    else by halves of halves."""
    if HW_POPC:
        return tl.extra.cuda.libdevice.popc(byte)
    pairs = byte - ((byte >> 1) & 0x55)
    nibbles = (pairs & 0x33) + ((pairs >> 2) & 0x33)
    return (nibbles + (nibbles >> 4)) & 0x0F


@triton.jit
def _negate(x):
    """IEEE negation as a sign-bit flip (PTX leaves ``neg.f32`` of a NaN unspecified; the
    spec makes computed NaNs canonical, so a NaN's sign does not reach any output)."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def _maximum(a, b):
    """max(a, b), NaN if either is NaN, as ``torch.maximum`` (its payload: see
    :func:`_adamw_element`)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _canonical_nan(x):
    """Any NaN as the quiet NaN 0x7FC00000: the spec stores computed NaNs canonically."""
    return tl.where(x != x, tl.full(x.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True), x)


# ---------------------------------------------------------------------------------------
# The step of one chunk, in the reference's three stages: _load_weight, the optimizer's
# math (_adamw_math), _store_and_flag. Arguments travel in named tuples: _Pointers (a work
# item's operands), _Scalars (a row of step_scalars), _Place (where a chunk's elements and
# bitmap bytes are) and _Layout (the launch's compile-time flags), so that each stage's
# signature says what it reads.
# ---------------------------------------------------------------------------------------


class _Pointers(NamedTuple):
    """A work item's operands, each pointer moved to the item's element 0 (bitmaps: its
    byte); bf16 tensors as int16 pointers. Absent ones are never dereferenced."""

    param: tl.tensor
    grad: tl.tensor
    exp_avg: tl.tensor
    exp_avg_sq: tl.tensor
    max_exp_avg_sq: tl.tensor
    master: tl.tensor
    remainder: tl.tensor
    freeze_mask: tl.tensor
    change_bitmap: tl.tensor
    cumulative_bitmap: tl.tensor


class _Scalars(NamedTuple):
    """A tensor's row of :func:`rlvr_optim.reference.step_scalars`."""

    step_size: tl.tensor
    bc2_sqrt: tl.tensor
    decay: tl.tensor
    beta1: tl.tensor
    one_minus_beta1: tl.tensor
    beta2: tl.tensor
    one_minus_beta2: tl.tensor
    eps: tl.tensor


class _Place(NamedTuple):
    """Where a chunk's elements are: ``offs`` (:func:`_chunk_offsets`)
    from the item's element 0 and which are in the tensor; its rows of 8 (one bitmap byte
    each): ``rows`` (0 .. BLOCK // 8 - 1), their bytes from the item's first and which are
    in the tensor; the 8-byte bitmap word of each row (``WORDS`` chunks only)."""

    offs: tl.tensor
    in_range: tl.tensor
    rows: tl.tensor
    row_offs: tl.tensor
    row_in_range: tl.tensor
    word_offs: tl.tensor


class _Layout(NamedTuple):
    """The compile-time flags of a launch (``adamw_table_kernel``'s, of the same names)."""

    PARAM_BF16: tl.constexpr
    PARAM_FP16: tl.constexpr
    IMAGE_FP16: tl.constexpr
    GRAD_BF16: tl.constexpr
    GRAD_FP16: tl.constexpr
    STATE_BF16: tl.constexpr
    HAS_MASTER: tl.constexpr
    HAS_REMAINDER: tl.constexpr
    STOCHASTIC: tl.constexpr
    SR_ROW_CALLS: tl.constexpr
    AMSGRAD: tl.constexpr
    MAXIMIZE: tl.constexpr
    L2_DECAY: tl.constexpr
    HAS_FREEZE_MASK: tl.constexpr
    HAS_CHANGE_BITMAP: tl.constexpr
    HAS_CUMULATIVE_BITMAP: tl.constexpr
    HAS_COUNTERS: tl.constexpr
    HAS_GRAD_SCALE: tl.constexpr
    HAS_FOUND_INF: tl.constexpr
    HW_BF16: tl.constexpr
    BLOCK: tl.constexpr
    ALIGNED: tl.constexpr
    HALVES: tl.constexpr


@triton.jit
def _load_weight(p, at, L):
    """Stage 1 (reference.load_weight): (the stored 16-bit pattern before the step (fp32
    params: their nearest-even bf16 or, ``IMAGE_FP16``, float16 image), the fp32 weight
    before it, the param as loaded (fp32 params), the remainder as loaded (remainder
    form))."""
    param = 0.0
    remainder = 0
    FP16: tl.constexpr = L.PARAM_FP16 or L.IMAGE_FP16
    if L.PARAM_BF16 or L.PARAM_FP16:
        image = _load_bf16_bits(p.param, at.offs, at.in_range)
    else:
        param = tl.load(p.param + at.offs, mask=at.in_range, other=0.0)
        image = _round_nearest_half(param.to(tl.uint32, bitcast=True), FP16)
    if L.HAS_MASTER:
        w = tl.load(p.master + at.offs, mask=at.in_range, other=0.0)
    elif L.HAS_REMAINDER:
        remainder = tl.load(p.remainder + at.offs, mask=at.in_range, other=0)
        w = _join_remainder(image, remainder).to(tl.float32, bitcast=True)
    elif L.PARAM_BF16 or L.PARAM_FP16:
        w = _half_bits_to_fp32(image, FP16, L.HW_BF16)
    else:
        w = param
    return image, w, param, remainder


@triton.jit
def _unscaled_grad(grad, grad_scale, L):
    """The fp32 gradient the math sees (reference.unscaled_grad)."""
    g = grad
    if L.HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if L.MAXIMIZE:
        g = _negate(g)
    return g


@triton.jit
def _adamw_math(g, w, m, v, vmax, s, AMSGRAD: tl.constexpr, L2_DECAY: tl.constexpr,
                CANONICAL_W: tl.constexpr):
    """Stage 2, the optimizer's math (reference.adamw_math), fp32 registers only; returns
    (w, m, v, vmax). ``L2_DECAY`` (torch's Adam): ``s.decay`` times the weight is added to
    the gradient instead of decaying the weight (AdamW).

    The reference makes every computed NaN canonical where it is computed; here only ``w``
    is, and only where ``CANONICAL_W`` (its bits are compared and stored as they are). A
    NaN in ``m``, ``v`` or ``vmax`` reaches ``w`` as a NaN whatever its payload, and their
    stores make it canonical (:func:`_store_state`), where the bf16 rounding tests for NaN
    anyway: the same bits, one select per element and state fewer with bf16 states. A
    float16 param without a master stores no fp32 bits: its roundings map any NaN to the
    canonical one's image and its "moved" count tests ``w`` for NaN
    (:func:`_store_and_flag`), so ``w`` stays as computed."""
    if L2_DECAY:
        g = g + s.decay * w
    else:
        w = w * s.decay
    m = s.beta1 * m + s.one_minus_beta1 * g
    v = s.beta2 * v + s.one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = _maximum(vmax, v)
        denom = tl.div_rn(tl.sqrt_rn(vmax), s.bc2_sqrt) + s.eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), s.bc2_sqrt) + s.eps
    w = w - tl.div_rn(s.step_size * m, denom)
    if CANONICAL_W:
        w = _canonical_nan(w)
    return w, m, v, vmax


@triton.jit
def _store_weight(w, w_bits, sr_seed, index_base, at, L):
    """The stored form of a new weight ``w`` (fp32 bits ``w_bits``; reference.store_weight):
    (its 16-bit image, the remainder (remainder form, bf16 only)); an fp32 param stores w
    itself, its image is the nearest-even bf16 or (``IMAGE_FP16``) float16. The one place
    that knows a storage format."""
    remainder = 0
    FP16: tl.constexpr = L.PARAM_FP16 or L.IMAGE_FP16
    if not (L.PARAM_BF16 or L.PARAM_FP16):
        image = _round_computed_half(w, FP16, L.HW_BF16)
    elif L.HAS_REMAINDER:
        image, remainder = _split_remainder(w_bits)
    elif L.STOCHASTIC:
        random16 = _random16(sr_seed, index_base, at.offs, at.row_offs, L.SR_ROW_CALLS,
                              L.HALVES)
        if FP16:
            image = _round_stochastic_fp16(w, random16)
        else:
            image = _round_stochastic_bf16(w_bits, random16)
    else:
        image = _round_computed_half(w, FP16, L.HW_BF16)
    return image, remainder


@triton.jit
def _store_and_flag(p, at, update, train, before, after, loaded, g, cumulative,
                    sr_seed, index_base, L, WORDS: tl.constexpr):
    """Stage 3 (reference.store_and_flag): store the new weight and states (elements not
    updated get back the bits they were loaded with), write the change bitmaps and return
    the chunk's per-row counts ([BLOCK // 8] int32): 16-bit changes, fp32 moves, non-finite
    grads. ``before``: :func:`_load_weight`'s result; ``after``: the math's; ``loaded``:
    (m, v, vmax) as loaded; ``cumulative``: the cumulative bitmap bytes (or words) as
    loaded."""
    image_old, w_old, param_old, remainder_old = before
    w, m, v, vmax = after
    m_old, v_old, vmax_old = loaded
    w_bits = w.to(tl.uint32, bitcast=True)
    image, remainder = _store_weight(w, w_bits, sr_seed, index_base, at, L)
    image = _keep(update, image, image_old)

    # Write back; elements not updated keep their bits.
    _store_state(p.exp_avg, at, m, m_old, update, L.STATE_BF16, L.HW_BF16)
    _store_state(p.exp_avg_sq, at, v, v_old, update, L.STATE_BF16, L.HW_BF16)
    if L.AMSGRAD:
        _store_state(p.max_exp_avg_sq, at, vmax, vmax_old, update, L.STATE_BF16, L.HW_BF16)
    if L.HAS_MASTER:
        tl.store(p.master + at.offs, _keep(update, w, w_old), mask=at.in_range)
    if L.HAS_REMAINDER:
        tl.store(p.remainder + at.offs, _keep(update, remainder, remainder_old),
                 mask=at.in_range)
    if L.PARAM_BF16 or L.PARAM_FP16:
        _store_bf16_bits(p.param, at.offs, image, at.in_range)
    else:
        tl.store(p.param + at.offs, _keep(update, w, param_old), mask=at.in_range)

    # Not updated elements kept their pattern, so ``changed`` is 0 there; out-of-range ones
    # are masked explicitly (their loads are zeros, which a step need not keep at zero).
    changed = (image != image_old) & at.in_range
    n_changed = tl.zeros(at.row_offs.shape, tl.int32)
    n_moved = tl.zeros(at.row_offs.shape, tl.int32)
    n_nonfinite = tl.zeros(at.row_offs.shape, tl.int32)
    if L.HAS_CHANGE_BITMAP or L.HAS_CUMULATIVE_BITMAP or L.HAS_COUNTERS:
        packed = _pack_bits(changed, L.HALVES)
        if WORDS and (L.HAS_CHANGE_BITMAP or L.HAS_CUMULATIVE_BITMAP):
            words = _pack_words(packed)
            if L.HAS_CHANGE_BITMAP:
                tl.store(_as_words(p.change_bitmap) + at.word_offs, words)
            if L.HAS_CUMULATIVE_BITMAP:
                tl.store(_as_words(p.cumulative_bitmap) + at.word_offs, cumulative | words)
        else:
            if L.HAS_CHANGE_BITMAP:
                tl.store(p.change_bitmap + at.row_offs, packed.to(tl.uint8),
                         mask=at.row_in_range)
            if L.HAS_CUMULATIVE_BITMAP:
                tl.store(p.cumulative_bitmap + at.row_offs, cumulative | packed.to(tl.uint8),
                         mask=at.row_in_range)
        if L.HAS_COUNTERS:
            n_changed = _popcount8(packed, L.HW_BF16)
    if L.HAS_COUNTERS:
        moved = (w_bits != w_old.to(tl.uint32, bitcast=True)) & update
        EXACT_BITS: tl.constexpr = not (L.PARAM_FP16 and not L.HAS_MASTER)
        if not EXACT_BITS:
            # Where the new w is a NaN the spec's is the canonical one, and the weight before
            # (decoded from the stored float16) moved unless it was that NaN too, whose
            # pattern is the canonical NaN's image: it moved exactly where the pattern
            # changed. Elsewhere neither is a NaN, the decoded bits are exact
            # (:func:`_fp16_bits_to_fp32`), and a changed pattern means moved bits. So
            # moved = changed | (bits differ & w is no NaN), the OR on the packed rows.
            moved = moved & (w == w)
        g_exponent = g.to(tl.uint32, bitcast=True) & 0x7F800000
        nonfinite = (g_exponent == 0x7F800000) & train
        # Each count is the popcount of its rows' packed bits: one popc per row on a GPU.
        moved_rows = _pack_bits(moved, L.HALVES)
        if not EXACT_BITS:
            moved_rows = moved_rows | packed
        n_moved = _popcount8(moved_rows, L.HW_BF16)
        n_nonfinite = _popcount8(_pack_bits(nonfinite, L.HALVES), L.HW_BF16)
    return n_changed, n_moved, n_nonfinite


@triton.jit
def _adamw_chunk(p, s, first, limit, index_base, skip, sr_seed, grad_scale,
                 FULL: tl.constexpr, L):
    """One chunk of a work item: its ``BLOCK`` elements from element ``first`` (int32, a
    multiple of ``BLOCK``) of the item's pointers ``p`` (:class:`_Pointers`), of which the
    first ``limit`` are in the tensor, placed as :func:`_chunk_offsets` says (a row of 8
    per bitmap byte); ``s``: the tensor's :class:`_Scalars`; ``index_base`` (int64): the
    global index of the item's element 0. Returns the chunk's per-row counts
    (:func:`_store_and_flag`).

    ``FULL``: the caller knows all elements are in range. The masks are then constant true,
    which the compiler drops, so loads and stores can be vectors; a mask made from a
    runtime limit would keep them one element wide. Elements not updated (frozen, or the
    step skipped by ``found_inf``) are written back with the bits they were loaded with
    rather than masked out of the store, for the same reason. A full chunk of an
    ``ALIGNED`` group (every pointer a multiple of 16 bytes, the item's bitmaps then of 8)
    moves its bitmaps as 8-byte words (:func:`_pack_words`); a tail chunk moves bytes, so
    a bitmap's last byte is written alone and no byte beyond it is touched.
    """
    offs = first + _chunk_offsets(L.BLOCK, L.HALVES)
    rows = tl.arange(0, L.BLOCK // 8)
    row_offs = first // 8 + rows
    WORDS: tl.constexpr = FULL and L.ALIGNED and L.BLOCK >= 64
    word_offs = row_offs // 8  # each row's word: :func:`_pack_words`
    if FULL:
        in_range = tl.full(offs.shape, 1, tl.int1)
        row_in_range = tl.full(row_offs.shape, 1, tl.int1)
    else:
        in_range = offs < limit
        row_in_range = row_offs * 8 < limit
    at = _Place(offs, in_range, rows, row_offs, row_in_range, word_offs)

    # Raw loads, all issued before any arithmetic: fp32 values, or bf16 patterns as uint32.
    if L.GRAD_BF16:
        grad = _bf16_bits_to_fp32(_load_bf16_bits(p.grad, offs, in_range))
    else:  # fp32, or float16 (exact; a NaN's payload does not reach any output)
        grad = tl.load(p.grad + offs, mask=in_range, other=0.0).to(tl.float32)
    before = _load_weight(p, at, L)
    m_old = _load_state(p.exp_avg, at, L.STATE_BF16)
    v_old = _load_state(p.exp_avg_sq, at, L.STATE_BF16)
    vmax_old = v_old
    if L.AMSGRAD:
        vmax_old = _load_state(p.max_exp_avg_sq, at, L.STATE_BF16)
    cumulative = 0
    if L.HAS_CUMULATIVE_BITMAP:
        if WORDS:
            cumulative = tl.load(_as_words(p.cumulative_bitmap) + word_offs)
        else:
            cumulative = tl.load(p.cumulative_bitmap + row_offs, mask=row_in_range, other=0)

    # Which elements are trained, and whether this step is applied at all.
    if L.HAS_FREEZE_MASK:
        if WORDS:
            mask_words = tl.load(_as_words(p.freeze_mask) + word_offs)
            train = _unpack_bits(_word_bytes(mask_words, rows), L.HALVES)
        else:
            train = _unpack_bits(tl.load(p.freeze_mask + row_offs, mask=row_in_range, other=0),
                                 L.HALVES)
        train = train & in_range
    else:
        train = in_range
    update = train
    if L.HAS_FOUND_INF:
        update = train & ~skip

    g = _unscaled_grad(grad, grad_scale, L)
    after = _adamw_math(g, before[1], _state_value(m_old, L.STATE_BF16),
                        _state_value(v_old, L.STATE_BF16), _state_value(vmax_old, L.STATE_BF16),
                        s, L.AMSGRAD, L.L2_DECAY, not (L.PARAM_FP16 and not L.HAS_MASTER))
    return _store_and_flag(p, at, update, train, before, after, (m_old, v_old, vmax_old), g,
                           cumulative, sr_seed, index_base, L, WORDS)


@triton.jit
def _item(p, s, length, index_base, skip, sr_seed, grad_scale, STAGES: tl.constexpr, L):
    """A work item of ``length`` elements: its full chunks in a loop pipelined over
    ``STAGES`` (``tl.range``), then its last, partial chunk (only a tensor's last item has
    one), masked. Returns its per-row counts summed over the chunks (bf16 changes, fp32
    moves, non-finite grads; int32 [BLOCK // 8]). The two calls compile the chunk twice,
    with constant and with run-time masks: one call in a loop run at most once for the tail
    cost 9 to 21 registers in the tracked modes (bench/static_report.py, Triton 3.9)."""
    n_changed = tl.zeros([L.BLOCK // 8], tl.int32)
    n_moved = tl.zeros([L.BLOCK // 8], tl.int32)
    n_nonfinite = tl.zeros([L.BLOCK // 8], tl.int32)
    full = length // L.BLOCK
    for chunk in tl.range(0, full, num_stages=STAGES):
        c = _adamw_chunk(p, s, chunk * L.BLOCK, length, index_base, skip, sr_seed,
                         grad_scale, True, L)
        n_changed += c[0]
        n_moved += c[1]
        n_nonfinite += c[2]
    if full * L.BLOCK < length:
        c = _adamw_chunk(p, s, full * L.BLOCK, length, index_base, skip, sr_seed,
                         grad_scale, False, L)
        n_changed += c[0]
        n_moved += c[1]
        n_nonfinite += c[2]
    return n_changed, n_moved, n_nonfinite


# Fields of a table row (csrc/step_table.h, read by rlvr_optim.table).
_ROW_INT64S = tl.constexpr(len(ROW_FIELDS))
_PARAM = tl.constexpr(ROW["param"])
_GRAD = tl.constexpr(ROW["grad"])
_EXP_AVG = tl.constexpr(ROW["exp_avg"])
_EXP_AVG_SQ = tl.constexpr(ROW["exp_avg_sq"])
_MAX_EXP_AVG_SQ = tl.constexpr(ROW["max_exp_avg_sq"])
_MASTER = tl.constexpr(ROW["master"])
_FREEZE_MASK = tl.constexpr(ROW["freeze_mask"])
_CHANGE_BITMAP = tl.constexpr(ROW["change_bitmap"])
_CUMULATIVE_BITMAP = tl.constexpr(ROW["cumulative_bitmap"])
_COUNTERS = tl.constexpr(ROW["counters"])
_NUMEL = tl.constexpr(ROW["numel"])
_ELEMENT_OFFSET = tl.constexpr(ROW["element_offset"])
_SCALAR_ROW = tl.constexpr(ROW["scalar_row"])
# Per tensor in the workspace: the counter sums (in the order of COUNTER_NAMES) and a ticket.
_WORKSPACE_INT64S = tl.constexpr(len(COUNTER_NAMES) + 1)


@triton.jit
def _table_pointer(entry, column: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Field ``column`` of a table row as a pointer to ``dtype``; ``ALIGNED``: the host
    checked that it is a multiple of 16 bytes, which lets full chunks use vector accesses
    (a pointer read from memory tells the compiler nothing)."""
    pointer = tl.load(entry + column).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit(do_not_specialize=["n_items"])  # one compile for any number of items
def adamw_table_kernel(
    table_ptr, work_ptr, workspace_ptr, n_items, scalars_ptr, sr_keys_ptr, grad_scale_ptr,
    found_inf_ptr,
    BLOCK: tl.constexpr, ITEM: tl.constexpr, STAGES: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_BF16: tl.constexpr, GRAD_BF16: tl.constexpr, STATE_BF16: tl.constexpr,
    PARAM_FP16: tl.constexpr, GRAD_FP16: tl.constexpr, IMAGE_FP16: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_REMAINDER: tl.constexpr, STOCHASTIC: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, L2_DECAY: tl.constexpr,
    HAS_FREEZE_MASK: tl.constexpr, HAS_CHANGE_BITMAP: tl.constexpr,
    HAS_CUMULATIVE_BITMAP: tl.constexpr, HAS_COUNTERS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SR_ROW_CALLS: tl.constexpr,
    HW_BF16: tl.constexpr,
):
    """A group of tensors of one layout, stepped by persistent programs: program p takes
    work items p, p + programs, ... of the int32 work table [n_items, 2]. Item (t, k) is
    elements k * ITEM .. (k + 1) * ITEM - 1 of tensor t, whose pointers, numel, element
    offset and scalar row are row t of the table (fields of ``rlvr_optim.table.ROW``), read
    once per item. The item's full BLOCK-element chunks run in a loop pipelined over
    ``STAGES`` (``tl.range``), its last partial chunk (only a tensor's last item has one)
    masked after it; counts add up in registers over the item and reach the counters
    through the int64 workspace [tensors, 4] (three sums and a ticket per tensor, zero
    between launches), published by the tensor's last item.
    ``scalars_ptr`` [calls, 8] and ``sr_keys_ptr`` [calls, 2] are the call's whole tensors,
    so the cached tables do not depend on the per-step scalars. ``ALIGNED``: every pointer
    of the group is a multiple of 16 bytes (full chunks then move bitmaps as 8-byte words).
    ``STATE_BF16``: exp_avg, exp_avg_sq and max_exp_avg_sq are bf16 (else fp32).
    ``PARAM_FP16`` / ``GRAD_FP16``: the param / grad is float16; ``IMAGE_FP16``: an fp32
    param's change image is its nearest-even float16 (else bf16).
    ``L2_DECAY``: torch's Adam weight decay (an L2 term in the gradient), else AdamW's.
    ``SR_ROW_CALLS``: every tensor's element offset is a multiple of 8 (one Philox call per
    row, :func:`_random16`). ``HW_BF16``: compiled for a GPU, where computed values round
    to bf16 by the hardware conversion (:func:`_round_computed_bf16`) and set bits are
    counted by ``popc``. Offsets inside an item are int32 over the item's int64 base, so
    ITEM < 2**31."""
    # Annotated: a tuple of constexprs assigned to a plain name loses them (triton 3.6-3.9).
    # Every element stream 4 bytes wide: rows as two halves of 4 (see _chunk_offsets).
    HALVES: tl.constexpr = (PARAM_BF16 + PARAM_FP16 + GRAD_BF16 + GRAD_FP16 + STATE_BF16) == 0
    L: tl.constexpr = _Layout(PARAM_BF16, PARAM_FP16, IMAGE_FP16, GRAD_BF16, GRAD_FP16,
                              STATE_BF16, HAS_MASTER, HAS_REMAINDER,
                              STOCHASTIC, SR_ROW_CALLS, AMSGRAD, MAXIMIZE, L2_DECAY,
                              HAS_FREEZE_MASK,
                              HAS_CHANGE_BITMAP, HAS_CUMULATIVE_BITMAP, HAS_COUNTERS,
                              HAS_GRAD_SCALE, HAS_FOUND_INF, HW_BF16, BLOCK, ALIGNED, HALVES)
    offs = _chunk_offsets(BLOCK, HALVES)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    skip = tl.zeros(offs.shape, tl.int1)
    if HAS_FOUND_INF:
        # Compared as a tensor: the interpreter (triton 3.9) tags a scalar comparison with
        # its operands' dtype, so splatting it would turn it into a float.
        skip = tl.broadcast_to(tl.load(found_inf_ptr), offs.shape) != 0
    state: tl.constexpr = tl.int16 if STATE_BF16 else tl.float32
    grad: tl.constexpr = tl.int16 if GRAD_BF16 else (tl.float16 if GRAD_FP16 else tl.float32)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        t = tl.load(work_ptr + 2 * item).to(tl.int64)
        start = tl.load(work_ptr + 2 * item + 1).to(tl.int64) * ITEM
        entry = table_ptr + t * _ROW_INT64S
        # Each pointer moved to the item's element 0 (bitmaps: its byte; ITEM % 8 == 0).
        p = _Pointers(
            _table_pointer(entry, _PARAM, tl.int16 if PARAM_BF16 or PARAM_FP16 else tl.float32,
                           ALIGNED) + start,
            _table_pointer(entry, _GRAD, grad, ALIGNED) + start,
            _table_pointer(entry, _EXP_AVG, state, ALIGNED) + start,
            _table_pointer(entry, _EXP_AVG_SQ, state, ALIGNED) + start,
            _table_pointer(entry, _MAX_EXP_AVG_SQ, state, ALIGNED) + start,
            _table_pointer(entry, _MASTER, tl.float32, ALIGNED) + start,
            _table_pointer(entry, _MASTER, tl.int16, ALIGNED) + start,
            _table_pointer(entry, _FREEZE_MASK, tl.uint8, ALIGNED) + start // 8,
            _table_pointer(entry, _CHANGE_BITMAP, tl.uint8, ALIGNED) + start // 8,
            _table_pointer(entry, _CUMULATIVE_BITMAP, tl.uint8, ALIGNED) + start // 8,
        )
        counter_ptr = tl.load(entry + _COUNTERS).to(tl.pointer_type(tl.int64))
        length = tl.minimum(tl.load(entry + _NUMEL) - start, ITEM).to(tl.int32)
        index_base = tl.load(entry + _ELEMENT_OFFSET) + start
        row = tl.load(entry + _SCALAR_ROW)
        sr_seed = 0
        if STOCHASTIC:
            # Loaded once per item: in the chunk loop they were two 8-byte loads per chunk
            # that the compiler cannot hoist past the loop's stores.
            key = sr_keys_ptr + 2 * row
            key_lo = tl.load(key).to(tl.uint64, bitcast=True)
            key_hi = tl.load(key + 1).to(tl.uint64, bitcast=True)
            sr_seed = key_lo | (key_hi << 32)  # tl.philox splits it back into (lo, hi)
        r = scalars_ptr + 8 * row
        s = _Scalars(tl.load(r + 0), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3),
                     tl.load(r + 4), tl.load(r + 5), tl.load(r + 6), tl.load(r + 7))

        counts = _item(p, s, length, index_base, skip, sr_seed, grad_scale, STAGES, L)
        if HAS_COUNTERS:
            # Item sums fit in int32 (ITEM < 2**31). The item that finishes its tensor last
            # (by the ticket, the workspace's fourth field) publishes the three sums and
            # leaves them and the ticket zero for the next launch.
            sums = workspace_ptr + _WORKSPACE_INT64S * t
            tl.atomic_add(sums + 0, tl.sum(counts[0], axis=0).to(tl.int64), sem="relaxed")
            tl.atomic_add(sums + 1, tl.sum(counts[1], axis=0).to(tl.int64), sem="relaxed")
            tl.atomic_add(sums + 2, tl.sum(counts[2], axis=0).to(tl.int64), sem="relaxed")
            done = tl.atomic_add(sums + 3, 1, sem="acq_rel")
            if done == tl.cdiv(tl.load(entry + _NUMEL), ITEM) - 1:
                tl.store(counter_ptr + 0, tl.atomic_xchg(sums + 0, 0, sem="relaxed"))
                tl.store(counter_ptr + 1, tl.atomic_xchg(sums + 1, 0, sem="relaxed"))
                tl.store(counter_ptr + 2, tl.atomic_xchg(sums + 2, 0, sem="relaxed"))
                tl.atomic_xchg(sums + 3, 0, sem="relaxed")


# ---------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------


def _interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (fixed when they were decorated;
    the import below cost 0.3 ms per step, so it is done once)."""
    global _INTERPRETING
    if _INTERPRETING is None:
        from triton.runtime.interpreter import InterpretedFunction

        _INTERPRETING = isinstance(_adamw_chunk, InterpretedFunction)
    return _INTERPRETING


_INTERPRETING: bool | None = None


def _check_device(i: int, param: Tensor) -> None:
    if param.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the Triton backend got CPU tensors, but Triton is not in interpreter mode: "
            "set TRITON_INTERPRET=1 before triton is first imported, move the tensors to "
            "a GPU, or use backend='reference'"
        )


_POLICY = Policy("Triton", _check_device, strict=True)


def _one_element(name: str, t: Tensor, device: torch.device, dtype=None) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element tensor, got {got}")
    return t.to(device=device, dtype=dtype).reshape(1).contiguous()


def _found_inf_operand(found_inf: Tensor, device: torch.device) -> Tensor:
    """found_inf in a dtype the kernel can compare with zero as the reference does."""
    t = _one_element("found_inf", found_inf, device)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype in (torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8):
        return t
    return (t != 0).view(torch.uint8)


def _is_bf16(t: Tensor | None) -> bool:
    return t is not None and t.dtype == torch.bfloat16


def _layout(ops: Operands, rounding: str, offset: int, change_dtype: torch.dtype
            ) -> dict[str, bool]:
    """The per-tensor compile-time flags but the grad's: dtypes, which optional tensors
    are present, and whether stochastic rounding can draw one Philox call per row (always
    true without it, so such tensors are not split off)."""
    param16 = ops.param.dtype in (torch.bfloat16, torch.float16)
    stochastic = rounding == "stochastic" and param16
    return dict(
        PARAM_BF16=_is_bf16(ops.param),
        PARAM_FP16=ops.param.dtype == torch.float16,
        IMAGE_FP16=not param16 and change_dtype == torch.float16,
        STATE_BF16=_is_bf16(ops.exp_avg),
        HAS_MASTER=ops.master is not None,
        HAS_REMAINDER=ops.remainder is not None,
        STOCHASTIC=stochastic,
        SR_ROW_CALLS=not stochastic or offset % 8 == 0,
        HAS_FREEZE_MASK=ops.freeze_mask is not None,
        HAS_CHANGE_BITMAP=ops.change_bitmap is not None,
        HAS_CUMULATIVE_BITMAP=ops.cumulative_bitmap is not None,
        HAS_COUNTERS=ops.counter is not None,
    )


def _static_key(ops: Operands, offset: int, options: tuple) -> tuple:
    """A tensor's launch flags but the grad's, and whether its other pointers are 16-byte
    aligned (planner callback)."""
    layout = tuple(sorted(_layout(ops, options[0], offset, options[3]).items()))
    aligned = all(t.data_ptr() % 16 == 0 for t in ops if t is not None)
    return layout, aligned


def _group_key(static: tuple, grad_dtype: torch.dtype, grad_address: int) -> tuple:
    """The launch flags of a tensor with this grad (planner callback)."""
    layout, aligned = static
    return tuple(sorted((*layout, ("ALIGNED", aligned and grad_address % 16 == 0),
                         ("GRAD_BF16", grad_dtype == torch.bfloat16),
                         ("GRAD_FP16", grad_dtype == torch.float16))))


def _work_table(numels: tuple[int, ...], item: int) -> Tensor:
    """int32 [items, 2]: (tensor t, item k) for every run of ``item`` elements of every
    tensor, elements k * item .. (k + 1) * item - 1 (a tensor's last run may be shorter)."""
    counts = torch.tensor([triton.cdiv(n, item) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(tensor.numel()) - first[tensor]
    return torch.stack([tensor, k], dim=1).to(torch.int32)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from the CPU to a GPU without stalling the host: a copy from
    pinned memory is asynchronous (torch waits for the stream after a pageable one), and
    torch's pinned allocator keeps the staging buffer until the copy is done."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Launch(NamedTuple):
    """One launch of ``adamw_table_kernel``: its layout flags and device tables."""

    flags: dict
    table: Tensor  # int64 [tensors, len(ROW_FIELDS)] (rlvr_optim.table)
    workspace: Tensor  # int64 [tensors, counters + 1]: counter sums and a ticket, zero
    work: Tensor  # int32 [items, 2]
    block: int
    item: int


def _shape(device: torch.device, block_size: int | None, item_size: int | None
           ) -> tuple[int, int]:
    """(chunk, item) of a launch on ``device``."""
    gpu = device.type != "cpu"
    block = block_size or (DEFAULT_BLOCK_GPU if gpu else DEFAULT_BLOCK_CPU)
    item = item_size or max(block, DEFAULT_ITEM_GPU if gpu else DEFAULT_ITEM_CPU)
    if item % block:
        raise ValueError(f"item_size must be a multiple of block_size ({block}), got {item}")
    return block, item


def _encode(group, options: tuple) -> _Launch:
    """The device tables of a planner group (planner callback): its columns as table rows,
    a zero counter workspace, and its work items."""
    _, block_size, item_size, _ = options
    block, item = _shape(group.device, block_size, item_size)
    count = len(group.rows)
    rows = np.zeros((count, len(ROW_FIELDS)), dtype=np.int64)
    for name, values in group.columns.items():
        if name in ROW:
            rows[:, ROW[name]] = values
    numels = tuple(group.columns["numel"].tolist())
    workspace = torch.zeros(count, _WORKSPACE_INT64S.value, dtype=torch.int64)
    return _Launch(dict(group.key), _to_device(torch.from_numpy(rows), group.device),
                   _to_device(workspace, group.device),
                   _to_device(_work_table(numels, item), group.device), block, item)


class SmLimits(NamedTuple):
    """What one streaming multiprocessor holds at once (CUDA C++ Programming Guide,
    "Compute Capabilities", technical specifications)."""

    registers: int  # 32-bit registers
    threads: int
    blocks: int
    shared: int  # bytes of shared memory for blocks, the per-block reserve included
    reserved_shared: int = 1024  # bytes the system keeps per block (sm_80 and later)


# By compute capability; a device of another one is read from its properties, with the
# smallest block limit of these.
SM_LIMITS = {
    (8, 0): SmLimits(65536, 2048, 32, 167936),
    (8, 6): SmLimits(65536, 1536, 16, 102400),
    (8, 9): SmLimits(65536, 1536, 24, 102400),
    (9, 0): SmLimits(65536, 2048, 32, 233472),
}


def programs_per_sm(registers: int, warps: int, shared: int, limits: SmLimits) -> int:
    """Programs of ``warps`` warps, ``registers`` registers per thread and ``shared`` bytes
    of shared memory that one SM holds at once, by the rules of the CUDA occupancy
    calculator (cuda_occupancy.h): registers are given per warp in units of 256, in each of
    the SM's four quarters of the register file separately (a warp lives in one quarter);
    shared memory per block, its reserve added, in units of 128 bytes. At least 1 (a
    kernel that does not fit is refused by its launch)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (limits.registers // 4 // per_warp) * 4 // warps if per_warp else limits.blocks
    by_threads = limits.threads // (32 * warps)
    per_block = -(-(shared + limits.reserved_shared) // 128) * 128
    by_shared = limits.shared // per_block
    return max(1, min(by_registers, by_threads, by_shared, limits.blocks))


def sm_limits(device: torch.device) -> tuple[int, SmLimits]:
    """(SMs, per-SM limits) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    known = SM_LIMITS.get((props.major, props.minor))
    limits = known or SmLimits(
        getattr(props, "regs_per_multiprocessor", 65536), props.max_threads_per_multi_processor,
        min(v.blocks for v in SM_LIMITS.values()), props.shared_memory_per_multiprocessor)
    return props.multi_processor_count, limits


_PROGRAMS: dict[tuple, int] = {}


def _programs(device: torch.device, args: tuple, constexprs: dict, warps: int) -> int:
    """Persistent programs of a launch on a GPU: as many per SM as fit at once
    (:func:`programs_per_sm` of the compiled kernel's registers, warps and shared memory),
    or :data:`DEFAULT_PROGRAMS_PER_SM` when set, times the SMs. Cached per launch
    configuration: the device, the constexprs and which pointer arguments are 16-byte
    aligned (what Triton specializes a compile on; ``n_items`` is not specialized)."""
    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, Tensor))
    key = (device, warps, DEFAULT_PROGRAMS_PER_SM, tuple(constexprs.items()), aligned)
    programs = _PROGRAMS.get(key)
    if programs is None:
        sms, limits = sm_limits(device)
        per_sm = DEFAULT_PROGRAMS_PER_SM
        if per_sm is None:
            on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
            with on_device:
                kernel = adamw_table_kernel.warmup(*args, grid=(1,), **constexprs,
                                                   num_warps=warps, enable_fp_fusion=False)
                kernel._init_handles()  # loads the module: registers known from here on
            per_sm = programs_per_sm(kernel.n_regs, kernel.metadata.num_warps,
                                     kernel.metadata.shared, limits)
        programs = _PROGRAMS[key] = per_sm * sms
    return programs


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    scalars: Tensor,
    max_exp_avg_sqs: list[Tensor] | None = None,
    masters: list[Tensor] | None = None,
    remainders: list[Tensor] | None = None,
    freeze_masks: list[Tensor | None] | None = None,
    change_bitmaps: list[Tensor] | None = None,
    cumulative_bitmaps: list[Tensor] | None = None,
    counters: list[Tensor] | None = None,
    rounding: str = "nearest",
    sr_keys: Tensor | None = None,
    element_offsets: list[int] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    change_dtype: torch.dtype = torch.bfloat16,
    block_size: int | None = None,
    item_size: int | None = None,
    num_warps: int | None = None,
    num_programs: int | None = None,
) -> None:
    """One AdamW step over a list of tensors, in place, in fused launches.

    Arguments and results as :func:`rlvr_optim.reference.adamw`; all tensors contiguous and
    on one device per param (CPU tensors need ``TRITON_INTERPRET=1``), params and grads
    float32, bfloat16 or float16, a tensor's states all float32 or all bfloat16.
    ``masters`` need bf16 or float16 params, ``remainders`` bf16 params; ``rounding`` only
    affects 16-bit params.

    Every tensor is checked before any is touched (:func:`rlvr_optim.checks.check_tensors`).
    The tables are planned and kept by :data:`planner` (:class:`rlvr_optim.plan.Planner`):
    a call with the tensors of a recent one, the params and grads at the same addresses,
    reuses its launches; new grad addresses or dtypes check the grads and rebuild the
    tables. Tensors other than params and grads are recognized by identity alone: give a
    state new storage as a new tensor object, never by assigning its ``.data`` between
    calls.

    One launch of ``adamw_table_kernel`` per group of tensors with the same device and
    layout (dtypes, optional tensors, alignment): its table of rows
    (:mod:`rlvr_optim.table`), its work items, and no other host work; the kernel writes
    the counters itself.

    Args:
        block_size: elements per chunk, a power of two >= 8 (default:
            :data:`DEFAULT_BLOCK_GPU` on a GPU, :data:`DEFAULT_BLOCK_CPU` under the
            interpreter).
        item_size: elements per work item, a multiple of the chunk size below 2**31
            (default: :data:`DEFAULT_ITEM_GPU` on a GPU, :data:`DEFAULT_ITEM_CPU` under the
            interpreter, each at least one chunk).
        num_warps: warps per program on a GPU, a power of two from 1 to 32 (default
            :data:`DEFAULT_NUM_WARPS_GPU`).
        num_programs: persistent programs per launch, at least 1 (default on a GPU: as
            many per SM as fit at once, :func:`programs_per_sm` of the compiled kernel, or
            :data:`DEFAULT_PROGRAMS_PER_SM` per SM where set; under the interpreter one per
            work item); a launch never starts more programs than it has work items.
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad,
                    change_dtype=change_dtype)
    if not params:
        return
    shape = _launch_shape(block_size, item_size, num_warps, num_programs)
    offsets = [0] * len(params) if element_offsets is None else element_offsets
    launches = planner.launches(ops, grads, offsets,
                                (rounding, block_size, item_size, change_dtype))
    _run(launches, shape, StepInputs(scalars, sr_keys if rounding == "stochastic" else None,
                                     maximize, decoupled_weight_decay, grad_scale, found_inf),
         amsgrad)


class _LaunchShape(NamedTuple):
    """A call's launch shape (see :func:`adamw`); None: the default."""

    block_size: int | None = None
    item_size: int | None = None
    num_warps: int | None = None
    num_programs: int | None = None


def _launch_shape(block_size, item_size, num_warps, num_programs) -> _LaunchShape:
    """The launch shape of :func:`adamw`'s arguments, checked."""
    if block_size is not None and (block_size < 8 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if num_warps is not None and (not 1 <= num_warps <= 32 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    if item_size is not None and not 0 < item_size < 2**31:
        raise ValueError(f"item_size must be from 1 to 2**31 - 1, got {item_size}")
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"num_programs must be at least 1, got {num_programs}")
    return _LaunchShape(block_size, item_size, num_warps, num_programs)


def prepare(ops: Operands, *, element_offsets=None, rounding: str = "nearest",
            amsgrad: bool = False, change_dtype: torch.dtype = torch.bfloat16) -> PlannedCall:
    """:func:`adamw` over ``ops`` (at the default launch shape) as a call ``(grads,
    StepInputs)`` kept by its caller: checked when it first runs, then a pass over the
    grads per step (:class:`rlvr_optim.plan.PlannedCall`)."""
    offsets = [0] * ops.count if element_offsets is None else element_offsets
    shape = _LaunchShape()

    def run(launches, statics, offsets, grads, x: StepInputs) -> None:
        _run(launches, shape, x, amsgrad)

    return PlannedCall(planner, run, ops, offsets, (rounding, None, None, change_dtype))


def _run(launches: list, shape: _LaunchShape, x: StepInputs, amsgrad: bool) -> None:
    """One launch of ``adamw_table_kernel`` per planned launch."""
    if not launches:
        return
    interpreting = _interpreting()
    call_flags = dict(AMSGRAD=bool(amsgrad), MAXIMIZE=bool(x.maximize),
                      L2_DECAY=not x.decoupled_weight_decay,
                      HAS_GRAD_SCALE=x.grad_scale is not None, HAS_FOUND_INF=x.found_inf is not None)
    warps = shape.num_warps or DEFAULT_NUM_WARPS_GPU
    # Per-call operands, moved once per device (not once per tensor).
    per_device: dict[torch.device, tuple] = {}
    for launch in launches:
        device = launch.table.device
        if device not in per_device:
            per_device[device] = (
                _to_device(x.scalars, device).contiguous(),
                _to_device(x.sr_keys, device).contiguous() if x.sr_keys is not None else None,
                (_one_element("grad_scale", x.grad_scale, device, torch.float32)
                 if x.grad_scale is not None else None),
                _found_inf_operand(x.found_inf, device) if x.found_inf is not None else None,
            )
    for launch in launches:
        device = launch.table.device
        items = launch.work.shape[0]
        args = (launch.table, launch.work, launch.workspace, items, *per_device[device])
        constexprs = dict(BLOCK=launch.block, ITEM=launch.item, STAGES=DEFAULT_STAGES_GPU,
                          HW_BF16=not interpreting, **launch.flags, **call_flags)
        programs = shape.num_programs or (items if interpreting
                                          else _programs(device, args, constexprs, warps))
        try:
            # The interpreter's numpy warns of float -> int conversions out of range, which
            # the float16 stochastic rounding computes on lanes it does not select.
            with np.errstate(invalid="ignore", over="ignore") if interpreting else nullcontext():
                adamw_table_kernel[(min(items, programs),)](
                    *args, **constexprs, num_warps=warps, enable_fp_fusion=False)
        except BaseException:
            # A kernel stopped part way (the interpreter runs it on the host) may leave its
            # counter sums in the workspace; the next launch must start from zero.
            launch.workspace.zero_()
            raise


def _check_call(statics: Operands, grads, offsets, options) -> None:
    """Every per-tensor check (planner callback)."""
    check_tensors(statics, grads, offsets, _POLICY)


planner = Planner(_check_call, _static_key, _group_key, _encode, frozenset(STRICT_GRADS),
                  _capturing)
"""The Triton backend's kept calls and launches (:class:`rlvr_optim.plan.Planner`)."""
