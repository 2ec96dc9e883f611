"""The numerics specification of rlvr_optim: one AdamW step in plain PyTorch.

Every backend must reproduce this module bit for bit on the same inputs. It runs on
CPU and CUDA tensors and is written for clarity, not speed.

Per step t (1-based) the host side computes, in float64, rounded once to fp32
(:func:`step_scalars`)::

    step_size = lr / (1 - beta1**t)      bc2_sqrt = sqrt(1 - beta2**t)
    decay     = 1 - lr * weight_decay    1 - beta1, 1 - beta2

Per element, every operation is one correctly rounded fp32 operation (no fused
multiply-add), in this order, which is the order of torch's fused AdamW (the weight decay
as its for-loop, foreach and CPU fused code apply it, see below)::

    g  = fp32(grad)            (g = g / grad_scale if given; g = -g if maximize)
    w  = master, or fp32(param), or the fp32 rebuilt from bf16 param + int16 remainder
    w  = w * decay             (AdamW; Adam: g = g + weight_decay * w instead)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v)        (amsgrad only; the denominator then uses vmax)
    w  = w - step_size * m / (sqrt(v) / bc2_sqrt + eps)

The square root is taken in float64 and rounded to fp32: CPU ``torch.sqrt`` in fp32 is
not correctly rounded, while a float64 result rounded to fp32 is (53 >= 2 * 24 + 2 bits,
so the double rounding is innocuous for +, -, *, / and sqrt).

Weight decay multiplies w by ``decay = fp32(1 - lr * weight_decay)``, as
``torch.optim.AdamW``'s for-loop and foreach code (``param.mul_(1 - lr * weight_decay)``)
and its CPU fused kernel do. Rounding that factor to fp32 moves the decay by up to 3e-8
of w per step (lr * weight_decay = 1e-5: 0.3% of the decay), and every torch path but the
CUDA fused one, which decays in float64, does it. Decaying exactly instead (``w - lr_wd *
w``, this package's order before) drifted from all three CPU paths by 2.2e-5 after 100
fp32 steps of lr 1e-3, weight decay 1e-2 (2994 of 3119 elements differ), against 4.8e-7
with this order, the same as with weight decay 0 (docs/numerics.md). With weight decay 0
the factor is 1 and w is unchanged, infinities and -0 included, as torch skips the decay.

Storing. States go back in their own dtype (fp32, or bf16 by round-to-nearest-even).
A bf16 (or float16, below) param is stored by round-to-nearest-even (``rounding="nearest"``) or by
stochastic rounding (``rounding="stochastic"``). All bf16 conversions are integer bit
operations on the fp32 pattern, so every backend (the Triton interpreter included, whose
own casts truncate) gets the same bits:

* nearest-even: ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``;
* stochastic: ``(bits + r) >> 16`` with ``r`` a uniform 16-bit integer: the magnitude
  rounds up with probability (discarded low half) / 2**16, so the result is unbiased
  and is always one of the two bf16 neighbours;
* NaN becomes the quiet NaN ``(bits >> 16) | 0x0040`` under both; +-Inf stays +-Inf
  (its low half is zero).

float16 storage. A float16 param (and an fp32 param's image under
``change_dtype=torch.float16``) follows the same two rules, written on a 16-bit *window*:
the first 16 bits the rounding discards, just below the kept float16 LSB (zeros where
fewer are discarded), and *sticky*, whether any discarded bit beyond the window is set.
In the normal float16 range (magnitude >= 2**-14) the kept bits are the fp32 pattern
rebased by 112 exponents and shifted right by 13, so 13 bits are discarded; below it
(float16 subnormals, multiples of 2**-24) the 24-bit significand is shifted right by
``126 - exponent`` bits, 14 or more (all of them from 40 on). Then:

* nearest-even: up iff ``window + 0x7FFF + (lsb | sticky)`` carries out of 16 bits;
* stochastic: up iff ``window + r`` carries, ``r`` the element's same 16 random bits as
  for bf16, so the magnitude rounds up with probability window / 2**16: exactly unbiased
  wherever at most 16 bits are discarded (every normal float16 and the subnormals from
  2**-17 up); below 2**-17 the expectation is low by less than 2**-16 float16 ULP
  (2**-40), for want of more random bits;
* a kept pattern plus its carry of 0x7C00 or more is +-inf (overflow, as torch's cast),
  +-Inf stays +-Inf, and NaN becomes the quiet NaN ``sign | 0x7E00 | ((bits >> 13) &
  0x3FF)`` under both (sign and top payload bits kept, as torch's cast and as bf16).

float16 -> fp32 is exact: an integer shift and rebias (subnormals as m * 2**-24); a NaN
keeps its sign and payload, unquieted, as a bf16 NaN's shift does. The remainder form
does not exist for float16 (fp32 is not a float16 pattern and a 16-bit remainder); an
fp32 master does.

NaN results are canonical: every NaN that the step computes (w, m, v, vmax) is stored as
the quiet NaN 0x7FC00000 (bf16: 0x7FC0, float16: 0x7E00). Which NaN an fp32 operation
returns when both operands are NaN, or what ``-x`` does to a NaN's sign, differs between
CPU vector and scalar paths and between CPU and GPU; without this rule no two backends
could agree bit for bit once a gradient is NaN.

Master weights. ``"fp32"`` keeps an fp32 copy and stores the bf16 (or float16) param from it.
``"remainder"`` keeps only an int16 per element beside the bf16 param such that
``fp32_bits = (param_bits << 16) + remainder`` exactly. That needs the bf16 half rounded
to nearest with ties *away from zero* (``(bits + 0x8000) >> 16``): the remainder is then
in [-0x8000, 0x7FFF]. Round-half-even would need +0x8000 for ties that round down, which
does not fit in an int16. So in the remainder form the bf16 param can differ from the
nearest-even image of the same fp32 value at exact ties (one bf16 ULP, rare).

Random bits for stochastic rounding come from Philox4x32-10 (Salmon et al., SC'11), the
generator behind Triton's ``tl.randint4x``. Per tensor and step the host derives a 64-bit
key (:func:`stochastic_rounding_keys`) from (seed, step, tensor key). One Philox call serves
8 consecutive elements: element ``idx`` (its index in the whole, global tensor) takes the
16-bit half ``idx & 7`` of the 128-bit output for the counter ``idx >> 3``::

    words = philox(key, (c_lo, c_hi, 0, 0))   with c = idx >> 3   (= tl.randint4x(key, c))
    r16   = (words[(idx & 7) >> 1] >> (16 * (idx & 1))) & 0xFFFF   (low half when idx is even)

The draw is a pure function of (key, idx), so it does not depend on launch shape, backend
or sharding; a shard may start at any index, not only at a multiple of 8.

Freeze masks (packed bitmaps, bit 1 = trained): a frozen element keeps its param, states
and master bit for bit, and contributes nothing to bitmaps or counters.

Change tracking. ``change_bitmap`` bit i = the stored 16-bit (bf16 or float16) bits of
element i differ after the step (for fp32 params: their nearest-even images in
``change_dtype``, bf16 by default, differ). Counters, per tensor, int64: ``[16-bit image
changed (named bf16_changed), fp32 moved, non-finite grads]``, where "fp32 moved" compares
the fp32 bit patterns of w before and after (master, param or rebuilt value) and
non-finite grads are counted over trained elements after unscaling.

GradScaler: ``grad_scale`` divides the gradient; a nonzero ``found_inf`` skips the whole
step on the device (nothing is written but the counters), like torch's fused AdamW.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .bitmaps import pack, unpack
from .operands import Operands, StepInputs, call_operands
from .table import COUNTER_NAMES

__all__ = [
    "COUNTER_NAMES",
    "adamw",
    "bf16_bits_to_fp32",
    "bf16_from_bits",
    "bf16_to_bits",
    "adamw_math",
    "check_arguments",
    "check_master_params",
    "load_weight",
    "store_and_flag",
    "fp32_bits",
    "fp32_from_bits",
    "fp32_to_bf16_bits_nearest",
    "fp32_to_bf16_bits_stochastic",
    "fp16_bits_to_fp32",
    "fp16_from_bits",
    "fp16_to_bits",
    "fp32_to_fp16_bits_nearest",
    "fp32_to_fp16_bits_stochastic",
    "HALF_DTYPES",
    "half_bits_to_fp32",
    "half_from_bits",
    "half_to_bits",
    "image_dtype",
    "master_param_error",
    "round_nearest",
    "round_stochastic",
    "philox4x32",
    "split_remainder",
    "join_remainder",
    "step_scalars",
    "stochastic_rounding_keys",
    "SCALAR_COLUMNS",
]

MASK32 = 0xFFFFFFFF
CANONICAL_NAN_BITS = 0x7FC00000
FP16_QUIET_NAN = 0x7E00
SCALAR_COLUMNS = (
    "step_size",
    "bc2_sqrt",
    "decay",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "eps",
)

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
# Third counter word of the key derivation, so that a key never equals a raw element draw.
SR_KEY_TAG = 0x53520001


# ---------------------------------------------------------------------------------------
# Bit patterns. Unsigned 32- and 16-bit patterns are held in int64 tensors.
# ---------------------------------------------------------------------------------------


def fp32_bits(x: Tensor) -> Tensor:
    """Unsigned bit pattern of an fp32 tensor, as int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & MASK32


def fp32_from_bits(bits: Tensor) -> Tensor:
    """fp32 tensor from unsigned 32-bit patterns held in int64."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def bf16_to_bits(x: Tensor) -> Tensor:
    """Unsigned bit pattern of a bf16 tensor, as int64."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def bf16_from_bits(bits: Tensor) -> Tensor:
    """bf16 tensor from unsigned 16-bit patterns held in int64."""
    signed = torch.where(bits >= 2**15, bits - 2**16, bits)
    return signed.to(torch.int16).view(torch.bfloat16)


def bf16_bits_to_fp32(bits: Tensor) -> Tensor:
    """Exact fp32 value of bf16 bit patterns."""
    return fp32_from_bits(bits << 16)


def _is_nan_bits(bits: Tensor) -> Tensor:
    return (bits & 0x7FFFFFFF) > 0x7F800000


def fp32_to_bf16_bits_nearest(bits: Tensor) -> Tensor:
    """Round fp32 patterns to bf16 patterns, nearest with ties to even; NaN stays NaN."""
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return torch.where(_is_nan_bits(bits), (bits >> 16) | 0x0040, rounded)


def fp32_to_bf16_bits_stochastic(bits: Tensor, random16: Tensor) -> Tensor:
    """Round fp32 patterns to bf16 patterns stochastically with 16 random bits each."""
    rounded = (bits + random16) >> 16
    return torch.where(_is_nan_bits(bits), (bits >> 16) | 0x0040, rounded)


def split_remainder(bits: Tensor) -> tuple[Tensor, Tensor]:
    """Split fp32 patterns into (bf16 pattern rounded half away from zero, signed remainder).

    ``(hi << 16) + remainder == bits`` exactly, with the remainder in [-0x8000, 0x7FFF].
    NaN gives a quiet bf16 NaN and remainder 0.
    """
    nan = _is_nan_bits(bits)
    hi = torch.where(nan, (bits >> 16) | 0x0040, (bits + 0x8000) >> 16)
    remainder = torch.where(nan, torch.zeros_like(bits), bits - (hi << 16))
    return hi, remainder


def join_remainder(hi: Tensor, remainder: Tensor) -> Tensor:
    """Exact fp32 patterns from bf16 patterns and signed remainders (inverse of split)."""
    return ((hi << 16) + remainder) & MASK32


# ---------------------------------------------------------------------------------------
# float16 patterns. The same rounding rules as bf16, written on a 16-bit window of
# discarded bits (see "float16 storage" in the module docstring and docs/fp16.md).
# ---------------------------------------------------------------------------------------


def fp16_to_bits(x: Tensor) -> Tensor:
    """Unsigned bit pattern of a float16 tensor, as int64."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def fp16_from_bits(bits: Tensor) -> Tensor:
    """float16 tensor from unsigned 16-bit patterns held in int64."""
    signed = torch.where(bits >= 2**15, bits - 2**16, bits)
    return signed.to(torch.int16).view(torch.float16)


def fp16_bits_to_fp32(bits: Tensor) -> Tensor:
    """Exact fp32 value of float16 patterns; a NaN keeps its sign and payload (shifted
    into the top of the fp32 mantissa, as a bf16 NaN's is), with no quieting."""
    sign = (bits & 0x8000) << 16
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    normal = ((exponent + (127 - 15)) << 23) | (mantissa << 13)
    subnormal = fp32_bits(mantissa.to(torch.float32) * 2.0**-24)  # exact: m < 2**10
    special = 0x7F800000 | (mantissa << 13)
    magnitude = torch.where(exponent == 31, special, torch.where(exponent == 0, subnormal, normal))
    return fp32_from_bits(sign | magnitude)


def _fp16_window(bits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sign, kept, window, sticky) of fp32 patterns on the way to float16.

    ``kept`` is the float16 magnitude pattern with the discarded bits cut off (above 0x7C00
    for magnitudes of 2**16 and up); ``window`` the first 16 discarded bits, just below
    the kept LSB (zeros where fewer than 16 bits are discarded); ``sticky`` whether any
    discarded bit beyond the window is set. Normal float16 range (exponent >= -14): the
    fp32 pattern rebased by 112 exponents, 13 bits discarded. Below 2**-14 (float16
    subnormals, multiples of 2**-24): the 24-bit significand shifted right by
    ``126 - exponent`` bits (14 or more; fp32 subnormals count as exponent 1 without the
    implicit bit), computed here on the significand widened by 16 zero bits.
    """
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    rebased = magnitude - (112 << 23)
    normal = exponent >= 113
    significand = torch.where(exponent > 0, (magnitude & 0x7FFFFF) | 0x800000, magnitude)
    shift = (126 - exponent.clamp(min=1)).clamp(max=40)  # 14 .. 40: all bits gone at 40
    widened = significand << 16
    kept = torch.where(normal, rebased >> 13, widened >> (shift + 16))
    window = torch.where(normal, (rebased << 3) & 0xFFFF, (widened >> shift) & 0xFFFF)
    sticky = ~normal & ((widened & ((1 << shift) - 1)) != 0)
    return sign, kept, window, sticky.to(torch.int64)


def _fp16_nan(bits: Tensor) -> Tensor:
    """The float16 quiet NaN of an fp32 NaN pattern: its sign, the quiet NaN ``0x7E00`` and
    the top 9 bits of its payload, ``sign | 0x7E00 | ((bits >> 13) & 0x3FF)``, as torch's
    own fp32 -> float16 cast makes it (and bf16's ``(bits >> 16) | 0x0040`` does)."""
    return ((bits >> 16) & 0x8000) | FP16_QUIET_NAN | ((bits >> 13) & 0x3FF)


def fp32_to_fp16_bits_nearest(bits: Tensor) -> Tensor:
    """Round fp32 patterns to float16 patterns, nearest with ties to even, as torch's cast:
    up iff ``window + 0x7FFF + (lsb | sticky)`` carries out of 16 bits; magnitudes that
    round to 2**16 or more become +-inf; NaN stays a quiet NaN (:func:`_fp16_nan`)."""
    sign, kept, window, sticky = _fp16_window(bits)
    up = (window + 0x7FFF + ((kept & 1) | sticky)) >> 16
    rounded = sign | (kept + up).clamp(max=0x7C00)
    return torch.where(_is_nan_bits(bits), _fp16_nan(bits), rounded)


def fp32_to_fp16_bits_stochastic(bits: Tensor, random16: Tensor) -> Tensor:
    """Round fp32 patterns to float16 patterns stochastically with 16 random bits each: up
    iff ``window + random16`` carries out of 16 bits (probability window / 2**16)."""
    sign, kept, window, _ = _fp16_window(bits)
    rounded = sign | (kept + ((window + random16) >> 16)).clamp(max=0x7C00)
    return torch.where(_is_nan_bits(bits), _fp16_nan(bits), rounded)


# By storage dtype: the 16-bit formats a param is stored in, or an fp32 param's change
# image is taken in.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_to_bits(x: Tensor) -> Tensor:
    """Unsigned bit pattern of a bf16 or float16 tensor, as int64."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def half_from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """A ``dtype`` (bf16 or float16) tensor from unsigned 16-bit patterns."""
    return bf16_from_bits(bits) if dtype == torch.bfloat16 else fp16_from_bits(bits)


def half_bits_to_fp32(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Exact fp32 value of ``dtype`` (bf16 or float16) patterns."""
    return bf16_bits_to_fp32(bits) if dtype == torch.bfloat16 else fp16_bits_to_fp32(bits)


def round_nearest(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 patterns to ``dtype`` (bf16 or float16) patterns, nearest even."""
    if dtype == torch.bfloat16:
        return fp32_to_bf16_bits_nearest(bits)
    return fp32_to_fp16_bits_nearest(bits)


def round_stochastic(bits: Tensor, random16: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 patterns to ``dtype`` (bf16 or float16) patterns, stochastically."""
    if dtype == torch.bfloat16:
        return fp32_to_bf16_bits_stochastic(bits, random16)
    return fp32_to_fp16_bits_stochastic(bits, random16)


def image_dtype(param_dtype: torch.dtype, change_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit format whose bits a param's change flag compares: a bf16 or float16
    param's own dtype, an fp32 param's ``change_dtype``."""
    return param_dtype if param_dtype in HALF_DTYPES else change_dtype


# ---------------------------------------------------------------------------------------
# Philox4x32-10, in int64 tensor ops (uint32 values).
# ---------------------------------------------------------------------------------------


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and uint32 values b.

    The product is formed from 16-bit halves of b so that no int64 product overflows.
    """
    t = a * (b & 0xFFFF)  # < 2**48
    u = a * (b >> 16)  # < 2**48
    lo = (((u & 0xFFFF) << 16) + t) & MASK32
    hi = (u + (t >> 16)) >> 16
    return hi, lo


def philox4x32(
    key: tuple[int | Tensor, int | Tensor],
    counter: tuple[Tensor, Tensor, Tensor, Tensor],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with key (k0, k1) on counters (c0, c1, c2, c3), all uint32 in int64.

    Same rounds, constants and word order as Triton's ``tl.philox``: with key
    ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter ``(offset_lo, offset_hi, 0, 0)`` the first
    word equals ``tl.randint(seed, offset)``.
    """
    k0, k1 = key
    c0, c1, c2, c3 = counter
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def stochastic_rounding_keys(seed: int, steps: Tensor, tensor_keys: Tensor) -> Tensor:
    """64-bit Philox keys, one per tensor, from (seed, step, tensor key).

    Args:
        seed: the optimizer's seed, 0 <= seed < 2**64.
        steps: int64 tensor [n] of 1-based step counts (any device).
        tensor_keys: int64 tensor [n] of stable per-tensor keys (same device).

    Returns an int64 tensor [n, 2] of (key_lo, key_hi) uint32 words: the key of tensor i
    is ``philox((seed_lo, seed_hi), (step_lo, step_hi, tensor_key, SR_KEY_TAG))[:2]``.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    steps = steps.to(torch.int64)
    tensor_keys = tensor_keys.to(device=steps.device, dtype=torch.int64)
    tag = torch.full_like(steps, SR_KEY_TAG)
    x0, x1, _, _ = philox4x32(
        (seed & MASK32, seed >> 32),
        (steps & MASK32, (steps >> 32) & MASK32, tensor_keys & MASK32, tag),
    )
    return torch.stack([x0, x1], dim=1)


def _random16(key: Tensor, first_index: int, numel: int, device: torch.device) -> Tensor:
    """The 16 random bits of elements first_index .. first_index + numel - 1.

    One Philox call per 8 consecutive global indices; see the module docstring.
    """
    index = torch.arange(first_index, first_index + numel, device=device, dtype=torch.int64)
    first_call = first_index >> 3
    # Each call that any of these elements needs, once, and each element picks its half.
    call = torch.arange(first_call, ((first_index + numel + 7) >> 3), device=device,
                        dtype=torch.int64)
    zero = torch.zeros_like(call)
    words = torch.stack(philox4x32((key[0], key[1]), (call & MASK32, call >> 32, zero, zero)),
                        dim=1)
    word = words[(index >> 3) - first_call, (index & 7) >> 1]
    return (word >> (16 * (index & 1))) & 0xFFFF


# ---------------------------------------------------------------------------------------
# Host-side scalars.
# ---------------------------------------------------------------------------------------


def step_scalars(
    steps: Tensor,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    *,
    decoupled_weight_decay: bool = True,
) -> Tensor:
    """The per-tensor fp32 scalars of one step, computed in float64 and rounded once.

    Args:
        steps: tensor [n] of 1-based step counts; the result lives on its device.
        lr, beta1, beta2, weight_decay, eps: the group's hyperparameters (lr may be a
            one-element tensor).
        decoupled_weight_decay: True (AdamW): the ``decay`` column is ``1 - lr *
            weight_decay``; False (Adam's L2 term): it is ``weight_decay``.

    Returns a float32 tensor [n, 8] whose columns are :data:`SCALAR_COLUMNS`.
    """
    t = steps.to(torch.float64)

    def const(value: float) -> Tensor:
        # Made by a fill on the steps' device: a copy from host memory would sync the host
        # and is refused inside a CUDA graph capture.
        return torch.full((), float(value), dtype=torch.float64, device=t.device)

    if isinstance(lr, Tensor):
        lr64 = lr.to(device=t.device, dtype=torch.float64).reshape(())
    else:
        lr64 = const(lr)
    step_size = lr64 / (1.0 - torch.pow(const(beta1), t))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(const(beta2), t))
    if decoupled_weight_decay:
        decay = (1.0 - lr64 * float(weight_decay)).expand_as(t)
    else:
        decay = const(weight_decay).expand_as(t)
    constants = torch.stack(
        [const(beta1), const(1.0 - float(beta1)), const(beta2), const(1.0 - float(beta2)),
         const(eps)]
    ).expand(t.numel(), 5)
    return torch.cat([torch.stack([step_size, bc2_sqrt, decay], dim=1), constants], dim=1).float()


# ---------------------------------------------------------------------------------------
# The step of one tensor, in three stages: load_weight, the optimizer's math (adamw_math),
# store_and_flag. csrc/adamw_element.cuh and triton_kernels/adamw.py have the same three.
# ---------------------------------------------------------------------------------------


def _sqrt_rn(x: Tensor) -> Tensor:
    return torch.sqrt(x.double()).float()


def _canonical_nan(x: Tensor) -> Tensor:
    nan = torch.full((), CANONICAL_NAN_BITS, dtype=torch.int32, device=x.device).view(torch.float32)
    return torch.where(torch.isnan(x), nan, x)


def _write(dst: Tensor, flat: Tensor) -> None:
    """Copy a flat (row-major) tensor into dst, whatever dst's strides."""
    dst.copy_(flat.reshape(dst.shape))


def _store_state(dst: Tensor, value: Tensor, keep: Tensor) -> None:
    """Write an fp32 value into a state tensor of dtype fp32 or bf16 (nearest-even)."""
    if dst.dtype == torch.bfloat16:
        new_bits = fp32_to_bf16_bits_nearest(fp32_bits(value))
        _write(dst, bf16_from_bits(torch.where(keep, bf16_to_bits(dst).reshape(-1), new_bits)))
    else:
        _write(dst, torch.where(keep, dst.reshape(-1), value))


class Weight(NamedTuple):
    """A param's weight as :func:`load_weight` reads it (flat tensors)."""

    image: Tensor  # the stored 16-bit pattern (fp32 params: their nearest-even image), int64
    value: Tensor  # the fp32 weight w
    remainder: Tensor | None  # the int16 remainder as int64 (remainder form only)


class Moments(NamedTuple):
    """What :func:`adamw_math` returns: the new weight and states, fp32 (flat)."""

    w: Tensor
    m: Tensor
    v: Tensor
    vmax: Tensor | None  # amsgrad only


def load_weight(param: Tensor, master: Tensor | None, remainder: Tensor | None,
                change_dtype: torch.dtype = torch.bfloat16) -> Weight:
    """Stage 1: the fp32 weight before the step (from the master, the param and its
    remainder, or the param) and the stored 16-bit pattern it is compared with after it
    (an fp32 param's: its nearest-even ``change_dtype`` image)."""
    half = image_dtype(param.dtype, change_dtype)
    if param.dtype in HALF_DTYPES:
        image = half_to_bits(param).reshape(-1)
    else:
        image = round_nearest(fp32_bits(param).reshape(-1), half)
    rem = None
    if master is not None:
        w = master.reshape(-1).clone()
    elif remainder is not None:
        rem = remainder.reshape(-1).to(torch.int64)
        w = fp32_from_bits(join_remainder(image, rem))
    elif param.dtype in HALF_DTYPES:
        w = half_bits_to_fp32(image, half)
    else:
        w = param.reshape(-1).clone()
    return Weight(image, w, rem)


def unscaled_grad(grad: Tensor, grad_scale: Tensor | None, maximize: bool) -> Tensor:
    """The fp32 gradient the math sees: divided by ``grad_scale`` if given, negated under
    ``maximize``."""
    g = grad.reshape(-1).float()
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=torch.float32).reshape(())
    return -g if maximize else g


def adamw_math(g: Tensor, w: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None,
               s: Tensor, decoupled: bool = True) -> Moments:
    """Stage 2, the optimizer's math: one Adam step of fp32 values, each operation one
    correctly rounded fp32 operation, in the order of torch's fused Adam; computed NaNs
    canonical. ``s``: the tensor's row of :func:`step_scalars`; ``vmax`` only with amsgrad.
    ``decoupled`` (AdamW): the weight decays by the ``decay`` column; else (Adam's L2 term)
    ``decay`` times the weight is added to the gradient."""
    step_size, bc2_sqrt, decay, beta1, omb1, beta2, omb2, eps = s.unbind()
    if decoupled:
        w = w * decay
    else:
        g = g + decay * w
    m = _canonical_nan(beta1 * m + omb1 * g)
    v = _canonical_nan(beta2 * v + omb2 * g * g)
    if vmax is not None:
        vmax = _canonical_nan(torch.maximum(vmax, v))
        denom = _sqrt_rn(vmax) / bc2_sqrt + eps
    else:
        denom = _sqrt_rn(v) / bc2_sqrt + eps
    w = _canonical_nan(w - step_size * m / denom)
    return Moments(w, m, v, vmax)


def store_weight(param: Tensor, w_bits: Tensor, remainder: bool, random16: Tensor | None,
                 change_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor | None]:
    """The stored pattern of a new weight (fp32 bits ``w_bits``) in ``param``'s storage:
    (its 16-bit image, remainder or None). fp32 params store w exactly (their image is the
    nearest-even ``change_dtype``); bf16 and float16 params round to nearest even or
    stochastically with ``random16``; bf16 params may split off the remainder instead. The
    one place that knows a storage format."""
    half = image_dtype(param.dtype, change_dtype)
    if param.dtype not in HALF_DTYPES:
        return round_nearest(w_bits, half), None
    if remainder:
        return split_remainder(w_bits)
    if random16 is not None:
        return round_stochastic(w_bits, random16, half), None
    return round_nearest(w_bits, half), None


def store_and_flag(t: Operands, before: Weight, after: Moments, g: Tensor, train: Tensor,
                   keep: Tensor, random16: Tensor | None,
                   change_dtype: torch.dtype = torch.bfloat16) -> None:
    """Stage 3: store the step's results into tensor ``t``'s operands (elements in ``keep``
    keep their bits) and write its change bitmaps and counters."""
    w_bits = fp32_bits(after.w)
    image, rem_new = store_weight(t.param, w_bits, t.remainder is not None, random16,
                                  change_dtype)
    changed = (image != before.image) & ~keep
    moved = (w_bits != fp32_bits(before.value)) & ~keep
    nonfinite = ~torch.isfinite(g) & train

    _store_state(t.exp_avg, after.m, keep)
    _store_state(t.exp_avg_sq, after.v, keep)
    if t.max_exp_avg_sq is not None:
        _store_state(t.max_exp_avg_sq, after.vmax, keep)
    if t.master is not None:
        _write(t.master, torch.where(keep, before.value, after.w))
    if t.remainder is not None:
        _write(t.remainder, torch.where(keep, before.remainder, rem_new).to(torch.int16))
    if t.param.dtype in HALF_DTYPES:
        _write(t.param, half_from_bits(torch.where(keep, before.image, image), t.param.dtype))
    else:
        _write(t.param, torch.where(keep, before.value, after.w))

    if t.change_bitmap is not None:
        t.change_bitmap.copy_(pack(changed))
    if t.cumulative_bitmap is not None:
        t.cumulative_bitmap.bitwise_or_(pack(changed))
    if t.counter is not None:
        t.counter.copy_(torch.stack([changed.sum(), moved.sum(), nonfinite.sum()]))


class TensorStep(NamedTuple):
    """What one tensor's step reads besides its operands and gradient."""

    scalars: Tensor  # its row of step_scalars
    sr_key: Tensor | None  # its row of stochastic_rounding_keys (stochastic rounding only)
    element_offset: int
    maximize: bool
    decoupled_weight_decay: bool
    grad_scale: Tensor | None
    found_inf: Tensor | None
    change_dtype: torch.dtype = torch.bfloat16  # an fp32 param's change image


def step_tensor(t: Operands, grad: Tensor, x: TensorStep) -> None:
    """One tensor's step: which elements are updated, then the three stages."""
    numel = t.param.numel()
    device = t.param.device
    train = torch.ones(numel, dtype=torch.bool, device=device)
    if t.freeze_mask is not None:
        train = unpack(t.freeze_mask, numel)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    if x.found_inf is not None:
        skip = x.found_inf.to(device).reshape(()) != 0
    keep = ~train | skip

    g = unscaled_grad(grad, x.grad_scale, x.maximize)
    before = load_weight(t.param, t.master, t.remainder, x.change_dtype)
    vmax = None if t.max_exp_avg_sq is None else t.max_exp_avg_sq.reshape(-1).float()
    after = adamw_math(g, before.value, t.exp_avg.reshape(-1).float(),
                       t.exp_avg_sq.reshape(-1).float(), vmax, x.scalars.to(device),
                       x.decoupled_weight_decay)
    random16 = None
    if x.sr_key is not None and t.param.dtype in HALF_DTYPES and t.remainder is None:
        random16 = _random16(x.sr_key.to(device), x.element_offset, numel, device)
    store_and_flag(t, before, after, g, train, keep, random16, x.change_dtype)


# ---------------------------------------------------------------------------------------
# The call.
# ---------------------------------------------------------------------------------------


def check_arguments(ops: Operands, *, scalars: Tensor, rounding: str, sr_keys: Tensor | None,
                    amsgrad: bool, change_dtype: torch.dtype = torch.bfloat16) -> None:
    """The call-level checks every backend's ``adamw`` makes before touching a tensor (no
    pass over the tensors: the backends check those once per plan)."""
    n = ops.count
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if change_dtype not in HALF_DTYPES:
        raise ValueError("change_dtype must be torch.bfloat16 or torch.float16 (the image an "
                         f"fp32 param's change bitmap compares), got {change_dtype!r}")
    if rounding == "stochastic" and sr_keys is None:
        raise ValueError("stochastic rounding needs sr_keys")
    if ops.master is not None and ops.remainder is not None:
        raise ValueError("pass masters or remainders, not both")
    if ops.remainder is not None and rounding != "nearest":
        raise ValueError("the remainder form stores its bf16 half by nearest rounding only")
    if amsgrad and ops.max_exp_avg_sq is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    if not isinstance(scalars, Tensor) or scalars.dtype != torch.float32 or scalars.dim() != 2 \
            or scalars.shape[0] < n or scalars.shape[1] != len(SCALAR_COLUMNS):
        got = (scalars.dtype, tuple(scalars.shape)) if isinstance(scalars, Tensor) else scalars
        raise ValueError(
            f"scalars must be a float32 [{n}, 8] tensor from rlvr_optim.reference.step_scalars, "
            f"got {got}"
        )
    if rounding == "stochastic" and (
        not isinstance(sr_keys, Tensor) or sr_keys.dtype != torch.int64 or sr_keys.dim() != 2
        or sr_keys.shape[0] < n or sr_keys.shape[1] != 2
    ):
        got = (sr_keys.dtype, tuple(sr_keys.shape)) if isinstance(sr_keys, Tensor) else sr_keys
        raise ValueError(
            f"sr_keys must be an int64 [{n}, 2] tensor from "
            f"rlvr_optim.reference.stochastic_rounding_keys, got {got}"
        )


def master_param_error(kind: str, i: int, dtype: torch.dtype) -> str | None:
    """Why ``masters[i]`` or ``remainders[i]`` (``kind``) cannot go with a ``dtype`` param,
    or None: masters need a bf16 or float16 param, remainders a bf16 one."""
    if kind == "masters" and dtype not in HALF_DTYPES:
        return (f"masters[{i}] is given for a {dtype} param; fp32 master weights need bf16 "
                "or float16 params")
    if kind == "remainders" and dtype != torch.bfloat16:
        if dtype == torch.float16:
            return (f"remainders[{i}] is given for a float16 param; the remainder form "
                    "rebuilds fp32 as (bf16 bits << 16) + remainder, which holds for bf16 "
                    "(the high half of fp32) only: use an fp32 master for float16 params")
        return f"remainders[{i}] is given for a {dtype} param; remainders need bf16 params"
    return None


def check_master_params(ops: Operands) -> None:
    """Masters are given for bf16 or float16 params only, remainders for bf16 params only
    (a per-tensor check)."""
    for kind, extras in (("masters", ops.master), ("remainders", ops.remainder)):
        for i, extra in enumerate(extras or ()):
            if extra is not None:
                error = master_param_error(kind, i, ops.param[i].dtype)
                if error:
                    raise ValueError(error)


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
) -> None:
    """One Adam step over a list of tensors, in place; the specification of every backend.

    Args:
        params: fp32, bf16 or float16 tensors, updated in place.
        grads: their gradients (same shapes).
        exp_avgs, exp_avg_sqs: first and second moments, fp32 or bf16, updated in place.
        scalars: float32 [n, 8] from :func:`step_scalars` (one row per tensor).
        max_exp_avg_sqs: amsgrad maxima (required iff ``amsgrad``).
        masters: fp32 master weights (bf16 and float16 params only; None entries allowed);
            param = rounded master.
        remainders: int16 remainders of the compact master form (bf16 params only; None
            entries allowed).
        freeze_masks: per tensor a packed uint8 bitmap (bit 1 = trained) or None.
        change_bitmaps: per tensor a uint8 [ceil(numel / 8)] output bitmap, or None list.
        cumulative_bitmaps: per tensor a uint8 bitmap OR-ed with this step's changes.
        counters: per tensor an int64 [3] output, see :data:`COUNTER_NAMES`.
        rounding: ``"nearest"`` or ``"stochastic"``: how a bf16 or float16 param is
            stored; fp32 params are stored exactly and ignore it.
        sr_keys: int64 [n, 2] keys from :func:`stochastic_rounding_keys` (stochastic only).
        element_offsets: global index of each tensor's element 0 (default 0).
        amsgrad, maximize: as in torch.optim.AdamW.
        decoupled_weight_decay: True (AdamW): the weight decays by the scalars' ``decay``
            column; False (torch's Adam with a nonzero weight decay): ``decay`` times the
            weight is added to the gradient (see :func:`step_scalars`).
        grad_scale: optional one-element tensor dividing the gradients.
        found_inf: optional one-element tensor; nonzero skips the step.
        change_dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the nearest-even
            image whose bits an fp32 param's change bitmap and counter compare (a 16-bit
            param compares its own stored bits).
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad,
                    change_dtype=change_dtype)
    check_master_params(ops)
    keys = sr_keys if rounding == "stochastic" else None
    run(ops, grads, element_offsets,
        StepInputs(scalars, keys, maximize, decoupled_weight_decay, grad_scale, found_inf),
        change_dtype)


def run(ops: Operands, grads, element_offsets, x: StepInputs,
        change_dtype: torch.dtype = torch.bfloat16) -> None:
    """The step of a checked call, tensor by tensor (``change_dtype``: see :func:`adamw`)."""
    for i in range(ops.count):
        step_tensor(ops.at(i), grads[i], TensorStep(
            x.scalars[i], x.sr_keys[i] if x.sr_keys is not None else None,
            element_offsets[i] if element_offsets is not None else 0,
            x.maximize, x.decoupled_weight_decay, x.grad_scale, x.found_inf, change_dtype))


def prepare(ops: Operands, *, element_offsets=None, rounding: str = "nearest",
            amsgrad: bool = False, change_dtype: torch.dtype = torch.bfloat16) -> Callable:
    """``adamw`` over ``ops`` as a call ``(grads, StepInputs)``, checked once (the
    optimizer's kept plan calls it every step; every backend has ``prepare``)."""
    if amsgrad and ops.max_exp_avg_sq is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    if change_dtype not in HALF_DTYPES:
        raise ValueError("change_dtype must be torch.bfloat16 or torch.float16 (the image an "
                         f"fp32 param's change bitmap compares), got {change_dtype!r}")
    check_master_params(ops)

    def call(grads, x: StepInputs) -> None:
        if rounding != "stochastic":
            x = x._replace(sr_keys=None)
        run(ops, grads, element_offsets, x, change_dtype)

    return call
