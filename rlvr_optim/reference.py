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
A bf16 param is stored by round-to-nearest-even (``rounding="nearest"``) or by
stochastic rounding (``rounding="stochastic"``). All bf16 conversions are integer bit
operations on the fp32 pattern, so every backend (the Triton interpreter included, whose
own casts truncate) gets the same bits:

* nearest-even: ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``;
* stochastic: ``(bits + r) >> 16`` with ``r`` a uniform 16-bit integer: the magnitude
  rounds up with probability (discarded low half) / 2**16, so the result is unbiased
  and is always one of the two bf16 neighbours;
* NaN becomes the quiet NaN ``(bits >> 16) | 0x0040`` under both; +-Inf stays +-Inf
  (its low half is zero).

NaN results are canonical: every NaN that the step computes (w, m, v, vmax) is stored as
the quiet NaN 0x7FC00000 (bf16: 0x7FC0). Which NaN an fp32 operation returns when both
operands are NaN, or what ``-x`` does to a NaN's sign, differs between CPU vector and
scalar paths and between CPU and GPU; without this rule no two backends could agree bit
for bit once a gradient is NaN.

Master weights. ``"fp32"`` keeps an fp32 copy and stores the bf16 param from it.
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

Change tracking. ``change_bitmap`` bit i = the stored bf16 bits of element i differ
after the step (for fp32 params: their nearest-even bf16 images differ). Counters, per
tensor, int64: ``[bf16 changed, fp32 moved, non-finite grads]``, where "fp32 moved" compares
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
    "philox4x32",
    "split_remainder",
    "join_remainder",
    "step_scalars",
    "stochastic_rounding_keys",
    "SCALAR_COLUMNS",
]

MASK32 = 0xFFFFFFFF
CANONICAL_NAN_BITS = 0x7FC00000
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

    image: Tensor  # the stored bf16 pattern (fp32 params: their nearest-even image), int64
    value: Tensor  # the fp32 weight w
    remainder: Tensor | None  # the int16 remainder as int64 (remainder form only)


class Moments(NamedTuple):
    """What :func:`adamw_math` returns: the new weight and states, fp32 (flat)."""

    w: Tensor
    m: Tensor
    v: Tensor
    vmax: Tensor | None  # amsgrad only


def load_weight(param: Tensor, master: Tensor | None, remainder: Tensor | None) -> Weight:
    """Stage 1: the fp32 weight before the step (from the master, the param and its
    remainder, or the param) and the stored bf16 pattern it is compared with after it."""
    if param.dtype == torch.bfloat16:
        image = bf16_to_bits(param).reshape(-1)
    else:
        image = fp32_to_bf16_bits_nearest(fp32_bits(param).reshape(-1))
    rem = None
    if master is not None:
        w = master.reshape(-1).clone()
    elif remainder is not None:
        rem = remainder.reshape(-1).to(torch.int64)
        w = fp32_from_bits(join_remainder(image, rem))
    elif param.dtype == torch.bfloat16:
        w = bf16_bits_to_fp32(image)
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


def store_weight(param: Tensor, w_bits: Tensor, remainder: bool,
                 random16: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The stored pattern of a new weight (fp32 bits ``w_bits``) in ``param``'s storage:
    (bf16 image of it, remainder or None). fp32 params store w exactly (their image is the
    nearest-even bf16); bf16 params round to nearest even, stochastically with
    ``random16``, or split off the remainder. The one place that knows a storage format."""
    if param.dtype != torch.bfloat16:
        return fp32_to_bf16_bits_nearest(w_bits), None
    if remainder:
        return split_remainder(w_bits)
    if random16 is not None:
        return fp32_to_bf16_bits_stochastic(w_bits, random16), None
    return fp32_to_bf16_bits_nearest(w_bits), None


def store_and_flag(t: Operands, before: Weight, after: Moments, g: Tensor, train: Tensor,
                   keep: Tensor, random16: Tensor | None) -> None:
    """Stage 3: store the step's results into tensor ``t``'s operands (elements in ``keep``
    keep their bits) and write its change bitmaps and counters."""
    w_bits = fp32_bits(after.w)
    image, rem_new = store_weight(t.param, w_bits, t.remainder is not None, random16)
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
    if t.param.dtype == torch.bfloat16:
        _write(t.param, bf16_from_bits(torch.where(keep, before.image, image)))
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
    before = load_weight(t.param, t.master, t.remainder)
    vmax = None if t.max_exp_avg_sq is None else t.max_exp_avg_sq.reshape(-1).float()
    after = adamw_math(g, before.value, t.exp_avg.reshape(-1).float(),
                       t.exp_avg_sq.reshape(-1).float(), vmax, x.scalars.to(device),
                       x.decoupled_weight_decay)
    random16 = None
    if x.sr_key is not None and t.param.dtype == torch.bfloat16 and t.remainder is None:
        random16 = _random16(x.sr_key.to(device), x.element_offset, numel, device)
    store_and_flag(t, before, after, g, train, keep, random16)


# ---------------------------------------------------------------------------------------
# The call.
# ---------------------------------------------------------------------------------------


def check_arguments(ops: Operands, *, scalars: Tensor, rounding: str, sr_keys: Tensor | None,
                    amsgrad: bool) -> None:
    """The call-level checks every backend's ``adamw`` makes before touching a tensor (no
    pass over the tensors: the backends check those once per plan)."""
    n = ops.count
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
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


def check_master_params(ops: Operands) -> None:
    """Masters and remainders are given for bf16 params only (a per-tensor check)."""
    for kind, extras in (("masters", ops.master), ("remainders", ops.remainder)):
        for i, extra in enumerate(extras or ()):
            if extra is not None and ops.param[i].dtype != torch.bfloat16:
                raise ValueError(f"{kind}[{i}] is given for a {ops.param[i].dtype} param; "
                                 "master weights and remainders need bf16 params")


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
) -> None:
    """One Adam step over a list of tensors, in place; the specification of every backend.

    Args:
        params: fp32 or bf16 tensors, updated in place.
        grads: their gradients (same shapes).
        exp_avgs, exp_avg_sqs: first and second moments, fp32 or bf16, updated in place.
        scalars: float32 [n, 8] from :func:`step_scalars` (one row per tensor).
        max_exp_avg_sqs: amsgrad maxima (required iff ``amsgrad``).
        masters: fp32 master weights (bf16 params only; None entries allowed); param =
            rounded master.
        remainders: int16 remainders of the compact master form (bf16 params only; None
            entries allowed).
        freeze_masks: per tensor a packed uint8 bitmap (bit 1 = trained) or None.
        change_bitmaps: per tensor a uint8 [ceil(numel / 8)] output bitmap, or None list.
        cumulative_bitmaps: per tensor a uint8 bitmap OR-ed with this step's changes.
        counters: per tensor an int64 [3] output, see :data:`COUNTER_NAMES`.
        rounding: ``"nearest"`` or ``"stochastic"``: how a bf16 param is stored; fp32
            params are stored exactly and ignore it.
        sr_keys: int64 [n, 2] keys from :func:`stochastic_rounding_keys` (stochastic only).
        element_offsets: global index of each tensor's element 0 (default 0).
        amsgrad, maximize: as in torch.optim.AdamW.
        decoupled_weight_decay: True (AdamW): the weight decays by the scalars' ``decay``
            column; False (torch's Adam with a nonzero weight decay): ``decay`` times the
            weight is added to the gradient (see :func:`step_scalars`).
        grad_scale: optional one-element tensor dividing the gradients.
        found_inf: optional one-element tensor; nonzero skips the step.
    """
    ops = call_operands(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                        masters=masters, remainders=remainders, freeze_masks=freeze_masks,
                        change_bitmaps=change_bitmaps, cumulative_bitmaps=cumulative_bitmaps,
                        counters=counters, amsgrad=amsgrad)
    check_arguments(ops, scalars=scalars, rounding=rounding, sr_keys=sr_keys, amsgrad=amsgrad)
    check_master_params(ops)
    keys = sr_keys if rounding == "stochastic" else None
    run(ops, grads, element_offsets,
        StepInputs(scalars, keys, maximize, decoupled_weight_decay, grad_scale, found_inf))


def run(ops: Operands, grads, element_offsets, x: StepInputs) -> None:
    """The step of a checked call, tensor by tensor."""
    for i in range(ops.count):
        step_tensor(ops.at(i), grads[i], TensorStep(
            x.scalars[i], x.sr_keys[i] if x.sr_keys is not None else None,
            element_offsets[i] if element_offsets is not None else 0,
            x.maximize, x.decoupled_weight_decay, x.grad_scale, x.found_inf))


def prepare(ops: Operands, *, element_offsets=None, rounding: str = "nearest",
            amsgrad: bool = False) -> Callable:
    """``adamw`` over ``ops`` as a call ``(grads, StepInputs)``, checked once (the
    optimizer's kept plan calls it every step; every backend has ``prepare``)."""
    if amsgrad and ops.max_exp_avg_sq is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    check_master_params(ops)

    def call(grads, x: StepInputs) -> None:
        if rounding != "stochastic":
            x = x._replace(sr_keys=None)
        run(ops, grads, element_offsets, x)

    return call
