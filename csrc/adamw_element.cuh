// One AdamW step of one element: rlvr_optim/reference.py written in C++.
//
// Everything here is `__host__ __device__` and touches registers only: the CUDA kernel
// (adamw_kernel.cuh) loads, calls adamw_element and stores; the CPU step (cpu_step.cpp)
// runs the same code on the host, which is how the tests prove it equal to the reference
// bit for bit on a machine without a GPU. The algorithm is written out once, in the
// reference; this file follows it line by line, in the same order and the same three
// stages: load_weight, the optimizer's math (adamw_math) and store_and_flag.
//
// Floating point: every operation is one correctly rounded fp32 operation, never fused.
// On the device that is __fadd_rn & co. (which nvcc never contracts into an FMA); on the
// host plain IEEE fp32 arithmetic, compiled with -ffp-contract=off, and the square root
// taken in double and rounded once, like the reference (53 >= 2 * 24 + 2 bits, so the
// double rounding is innocuous). bf16 conversions are integer operations on the fp32
// bit pattern, exactly the reference's formulas, except that on the GPU a computed value
// is rounded to nearest by the hardware conversion, which gives the same bits on every
// value the step computes (round_nearest_bf16_computed). float16 params, and fp32 params
// whose change image is float16, take the same path with the float16 formulas (Half).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Forced inline on the host too: the CPU step's loops vectorize only when every stage is
// inlined into them (gcc 12 left store_and_flag a call in two layouts otherwise).
#if defined(__CUDACC__)
#define RLVR_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RLVR_HD inline __attribute__((always_inline))
#else
#define RLVR_HD inline
#endif

namespace rlvr_optim {

// ---------------------------------------------------------------------------------------
// fp32 operations, one rounding each.
// ---------------------------------------------------------------------------------------

RLVR_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

RLVR_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

RLVR_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RLVR_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

RLVR_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#elif defined(RLVR_CPU_ISA)
  // The CPU backend (csrc/cpu_step.cpp): the IEEE fp32 square root instruction, which is
  // correctly rounded, so it equals the double root rounded once (same bits) at half the
  // vector width's cost.
  return std::sqrt(a);
#else
  return static_cast<float>(std::sqrt(static_cast<double>(a)));
#endif
}

// ---------------------------------------------------------------------------------------
// Bit patterns. A bf16 pattern sits in the low 16 bits of a uint32_t.
// ---------------------------------------------------------------------------------------

RLVR_HD uint32_t fp32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

RLVR_HD float fp32_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

RLVR_HD float bf16_bits_to_fp32(uint32_t bits) { return fp32_from_bits(bits << 16); }

RLVR_HD bool is_nan_bits(uint32_t bits) { return (bits & 0x7FFFFFFFu) > 0x7F800000u; }

RLVR_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x) < INFINITY;  // one compare (false for NaN)
#else
  return (fp32_bits(x) & 0x7F800000u) != 0x7F800000u;
#endif
}

// Nearest with ties to even; NaN becomes a quiet NaN. No uint32 wrap-around: the largest
// non-NaN pattern, 0xFF800000 (-inf), plus 0x8000 fits.
RLVR_HD uint32_t round_nearest_bf16(uint32_t bits) {
  if (is_nan_bits(bits)) return (bits >> 16) | 0x0040u;
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// The bf16 pattern of a value the step computed, in which every NaN is the canonical
// 0x7FC00000 (canonical_nan): on the GPU one hardware conversion (cvt.rn.bf16.f32) with NaN
// lanes set to 0x7FC0, elsewhere the integer formula; the two agree on every non-NaN
// pattern and on the canonical NaN (tests/test_csrc.py checks all 2**32 patterns on a GPU),
// but not on other NaNs, whose spec image keeps their sign and payload: a stored pattern
// (an fp32 param before the step) goes through round_nearest_bf16.
RLVR_HD uint32_t round_nearest_bf16_computed(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
  return x != x ? 0x7FC0u : bits;
#else
  return round_nearest_bf16(fp32_bits(x));
#endif
}

// Two computed values at once, `lo` in the low half: the kernel's bf16 state stores. On the
// GPU one cvt.rn.bf16x2.f32; the same bits as two round_nearest_bf16_computed calls.
RLVR_HD uint32_t round_nearest_bf16x2_computed(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  uint32_t bits = static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) |
                  (static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16);
  if (lo != lo) bits = (bits & 0xFFFF0000u) | 0x7FC0u;
  if (hi != hi) bits = (bits & 0x0000FFFFu) | 0x7FC00000u;
  return bits;
#else
  return round_nearest_bf16_computed(lo) | (round_nearest_bf16_computed(hi) << 16);
#endif
}

// Rounds the magnitude up with probability (discarded low half) / 2**16.
RLVR_HD uint32_t round_stochastic_bf16(uint32_t bits, uint32_t random16) {
  if (is_nan_bits(bits)) return (bits >> 16) | 0x0040u;
  return (bits + random16) >> 16;
}

// fp32 pattern -> bf16 pattern rounded half away from zero, and the signed remainder in
// [-0x8000, 0x7FFF] with (hi << 16) + remainder == bits (mod 2**32). NaN: remainder 0.
RLVR_HD void split_remainder(uint32_t bits, uint32_t& hi, int32_t& remainder) {
  if (is_nan_bits(bits)) {
    hi = (bits >> 16) | 0x0040u;
    remainder = 0;
  } else {
    hi = (bits + 0x8000u) >> 16;
    remainder = static_cast<int32_t>(bits - (hi << 16));
  }
}

RLVR_HD uint32_t join_remainder(uint32_t hi, int32_t remainder) {
  return (hi << 16) + static_cast<uint32_t>(remainder);
}

// ---------------------------------------------------------------------------------------
// float16 patterns (reference.py, "float16 storage"), in the low 16 bits of a uint32_t.
// ---------------------------------------------------------------------------------------

constexpr uint32_t kFp16QuietNan = 0x7E00u;

// Exact fp32 value; a NaN keeps its sign and payload (no quieting), as the reference's. On
// the GPU the hardware conversion (exact) but for NaN patterns, which it would quiet.
RLVR_HD float fp16_bits_to_fp32(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  const float x = __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  const uint32_t nan = ((bits & 0x8000u) << 16) | 0x7F800000u | ((bits & 0x3FFu) << 13);
  return (bits & 0x7FFFu) > 0x7C00u ? fp32_from_bits(nan) : x;
#endif
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  uint32_t magnitude;
  if (exponent == 31u) {
    magnitude = 0x7F800000u | (mantissa << 13);
  } else if (exponent == 0u) {
    magnitude = fp32_bits(mul_rn(static_cast<float>(mantissa), 0x1p-24f));  // exact
  } else {
    magnitude = ((exponent + 112u) << 23) | (mantissa << 13);
  }
  return fp32_from_bits(sign | magnitude);
}

// The fp32 value of a float16 pattern for the step's arithmetic: exact, but a NaN pattern
// gives some NaN, not its own bits. On the GPU the hardware conversion alone (one
// instruction, where keeping a NaN's bits took several more per element); on the host
// the canonical NaN, so that the host tests hold store_and_flag to the contract that no
// flag depends on which NaN it is (see kNanByImage there).
RLVR_HD float fp16_value(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
#else
  return (bits & 0x7FFFu) > 0x7C00u ? fp32_from_bits(0x7FC00000u) : fp16_bits_to_fp32(bits);
#endif
}

// An fp32 pattern on its way to float16 (reference._fp16_window): the float16 magnitude
// with the discarded bits cut off (0x7C00 and up for magnitudes of 2**16 and more), the
// 16 discarded bits just below its LSB, and whether any discarded bit beyond them is set.
struct Fp16Window {
  uint32_t sign, kept, window, sticky;
};

RLVR_HD Fp16Window fp16_window(uint32_t bits) {
  Fp16Window f;
  f.sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const uint32_t exponent = magnitude >> 23;
  if (exponent >= 113u) {  // normal float16 range: rebased by 112 exponents, 13 bits go
    const uint32_t rebased = magnitude - (112u << 23);
    f.kept = rebased >> 13;
    f.window = (rebased << 3) & 0xFFFFu;
    f.sticky = 0u;
  } else {  // float16 subnormals: the significand shifted right by 14 .. 40 bits
    const uint32_t significand = exponent > 0u ? (magnitude & 0x7FFFFFu) | 0x800000u : magnitude;
    const uint32_t e = exponent > 0u ? exponent : 1u;
    const uint32_t shift = 126u - e < 40u ? 126u - e : 40u;
    f.kept = significand >> (shift < 24u ? shift : 24u);  // significand < 2**24
    if (shift <= 16u) {
      f.window = (significand << (16u - shift)) & 0xFFFFu;
      f.sticky = 0u;
    } else {  // the low shift - 16 bits (1 .. 24) are beyond the window
      f.window = (significand >> (shift - 16u)) & 0xFFFFu;
      f.sticky = (significand << (48u - shift)) != 0u ? 1u : 0u;
    }
  }
  return f;
}

// A NaN's float16 quiet NaN: its sign and top 9 payload bits, as torch's cast.
RLVR_HD uint32_t fp16_nan(uint32_t bits) {
  return ((bits >> 16) & 0x8000u) | kFp16QuietNan | ((bits >> 13) & 0x3FFu);
}

// Nearest with ties to even, as torch's cast: +-inf past the largest float16, NaN -> a
// quiet NaN (fp16_nan).
RLVR_HD uint32_t round_nearest_fp16(uint32_t bits) {
  if (is_nan_bits(bits)) return fp16_nan(bits);
  const Fp16Window f = fp16_window(bits);
  const uint32_t kept = f.kept + ((f.window + 0x7FFFu + ((f.kept & 1u) | f.sticky)) >> 16);
  return f.sign | (kept < 0x7C00u ? kept : 0x7C00u);
}

// Rounds the magnitude up with probability window / 2**16 (the same random bits as bf16's):
// up iff window + random16 carries, written as bf16's rule is, add below the kept LSB and
// truncate, which needs no sticky bit. Normal range: the window's low 3 bits are zero, so
// adding random16 >> 3 to the 13 discarded bits carries exactly when window + random16
// does. Below it: the significand aligned so that its low 16 bits are the window.
RLVR_HD uint32_t round_stochastic_fp16(uint32_t bits, uint32_t random16) {
  if (is_nan_bits(bits)) return fp16_nan(bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const uint32_t exponent = magnitude >> 23;
  uint32_t kept;
  if (exponent >= 113u) {
    kept = (magnitude - (112u << 23) + (random16 >> 3)) >> 13;
  } else {
    const uint32_t significand = exponent > 0u ? (magnitude & 0x7FFFFFu) | 0x800000u : magnitude;
    const uint32_t shift = 126u - (exponent > 0u ? exponent : 1u);  // 14 .. 125
    const uint32_t aligned =  // kept << 16 | window
        shift <= 16u ? significand << (16u - shift)
                     : (shift - 16u < 24u ? significand >> (shift - 16u) : 0u);
    kept = (aligned + random16) >> 16;
  }
  return sign | (kept < 0x7C00u ? kept : 0x7C00u);
}

// The float16 pattern of a value the step computed (every NaN canonical): on the GPU the
// hardware conversion (cvt.rn.f16.f32) with NaN lanes set to 0x7E00 (the canonical NaN's
// image), elsewhere the integer formula; they agree on every non-NaN pattern (a GPU test
// checks all 2**32).
RLVR_HD uint32_t round_nearest_fp16_computed(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = static_cast<uint32_t>(__half_as_ushort(__float2half_rn(x)));
  return x != x ? kFp16QuietNan : bits;
#else
  return round_nearest_fp16(fp32_bits(x));
#endif
}

// round_stochastic_fp16 of a value the step computed (every NaN canonical), without
// branches: below the normal range the aligned significand (its low 16 bits the window)
// is floor(|x| * 2**40), which the exact product by a power of two and a truncating
// conversion give (|x| < 2**-14: the product is below 2**26); the canonical NaN's image
// is kFp16QuietNan. The same formula on the host and the GPU.
RLVR_HD uint32_t round_stochastic_fp16_computed(float x, uint32_t random16) {
  const uint32_t bits = fp32_bits(x);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const uint32_t normal = (magnitude - (112u << 23) + (random16 >> 3)) >> 13;
  const uint32_t aligned = static_cast<uint32_t>(mul_rn(fabsf(x), 0x1p40f));
  const uint32_t subnormal = (aligned + random16) >> 16;
  uint32_t kept = magnitude >= (113u << 23) ? normal : subnormal;
  kept = kept < 0x7C00u ? kept : 0x7C00u;
  return x != x ? kFp16QuietNan : ((bits >> 16) & 0x8000u) | kept;
}

// The 16-bit format of a tensor: the one its 16-bit param is stored in, or, for an fp32
// param, the one whose nearest-even image its change flag compares (change_dtype).
enum class Half : int { kBf16 = 0, kFp16 = 1 };

template <Half kHalf>
RLVR_HD float half_bits_to_fp32(uint32_t bits) {
  return kHalf == Half::kBf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
}

template <Half kHalf>
RLVR_HD uint32_t round_nearest_half(uint32_t bits) {
  return kHalf == Half::kBf16 ? round_nearest_bf16(bits) : round_nearest_fp16(bits);
}

template <Half kHalf>
RLVR_HD uint32_t round_nearest_half_computed(float x) {
  return kHalf == Half::kBf16 ? round_nearest_bf16_computed(x) : round_nearest_fp16_computed(x);
}

template <Half kHalf>
RLVR_HD uint32_t round_stochastic_half(uint32_t bits, uint32_t random16) {
  return kHalf == Half::kBf16 ? round_stochastic_bf16(bits, random16)
                              : round_stochastic_fp16(bits, random16);
}

// IEEE negation, a sign-bit flip, NaN included (as torch's `-x`; PTX leaves neg.f32 of a
// NaN unspecified).
RLVR_HD float negate(float x) { return fp32_from_bits(fp32_bits(x) ^ 0x80000000u); }

// torch.maximum: NaN if either is NaN (which NaN does not matter: see canonical_nan).
RLVR_HD float maximum(float a, float b) { return (a > b || a != a) ? a : b; }

// Every NaN the step computes is stored as the quiet NaN 0x7FC00000: which NaN an fp32
// operation returns when both operands are NaN differs between CPU and GPU (and between
// CPU vector and scalar code), so the spec erases it.
constexpr uint32_t kCanonicalNanBits = 0x7FC00000u;

RLVR_HD float canonical_nan(float x) {
#if defined(__CUDA_ARCH__)
  return x != x ? fp32_from_bits(kCanonicalNanBits) : x;  // one compare, one select
#else
  return is_nan_bits(fp32_bits(x)) ? fp32_from_bits(kCanonicalNanBits) : x;
#endif
}

// ---------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11): the rounds, constants and word order of the
// reference's philox4x32 and of Triton's tl.philox.
// ---------------------------------------------------------------------------------------

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

RLVR_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

RLVR_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi_b, lo_b, hi_a, lo_a;
    mulhilo32(kPhiloxRoundB, c.x2, hi_b, lo_b);
    mulhilo32(kPhiloxRoundA, c.x0, hi_a, lo_a);
    c = Philox4{hi_b ^ c.x1 ^ k0, lo_b, hi_a ^ c.x3 ^ k1, lo_a};
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c;
}

// Stochastic rounding draws one Philox call per 8 consecutive global indices: the call
// with counter c = index >> 3 serves indices 8c .. 8c + 7, and index i takes the 16-bit
// half (i & 7) of its 128 bits (word (i & 7) >> 1, low half when i is even).
RLVR_HD Philox4 philox_for_8(uint32_t key_lo, uint32_t key_hi, uint64_t counter) {
  return philox4x32_10(Philox4{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                               0u, 0u},
                       key_lo, key_hi);
}

// Half `half` (0..7) of a call's output.
RLVR_HD uint32_t random16_of(const Philox4& r, unsigned half) {
  const unsigned word_index = (half >> 1) & 3u;
  const uint32_t word = word_index == 0 ? r.x0 : word_index == 1 ? r.x1 : word_index == 2 ? r.x2 : r.x3;
  return (half & 1u) ? word >> 16 : word & 0xFFFFu;
}

// The 16 random bits of the element with global index `index` under key (key_lo, key_hi).
RLVR_HD uint32_t random16(uint32_t key_lo, uint32_t key_hi, uint64_t index) {
  return random16_of(philox_for_8(key_lo, key_hi, index >> 3), static_cast<unsigned>(index & 7));
}

// ---------------------------------------------------------------------------------------
// The step of one element, in the reference's three stages: load_weight, the optimizer's
// math (adamw_math), store_and_flag (its storage format in store_weight).
// ---------------------------------------------------------------------------------------

// One row of reference.step_scalars, in the order of reference.SCALAR_COLUMNS.
struct StepScalars {
  float step_size, bc2_sqrt, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Options that hold for a whole launch.
struct GradOptions {
  float grad_scale;  // divides the gradient when has_grad_scale
  bool has_grad_scale;
  bool maximize;
  bool l2_decay;  // torch's Adam: the weight decay is an L2 term in the gradient
};

enum class MasterForm : int { kNone = 0, kFp32 = 1, kRemainder = 2 };

// What one element holds, in registers. The param is its stored bit pattern (bf16 or
// float16 pattern for 16-bit params, fp32 pattern for fp32 params); moments are fp32
// values (the exact value of a bf16 state, which the caller rounds back to nearest-even
// when it stores an update).
struct Element {
  uint32_t param;
  float master;        // MasterForm::kFp32 only
  int32_t remainder;   // MasterForm::kRemainder only, in [-0x8000, 0x7FFF]
  float exp_avg;
  float exp_avg_sq;
  float max_exp_avg_sq;  // amsgrad only
};

// What the step did to one element (reference: changed, moved, nonfinite).
struct ElementFlags {
  bool changed;    // stored 16-bit bits differ (fp32 params: their nearest-even images)
  bool moved;      // fp32 bits of w differ
  bool nonfinite;  // the unscaled gradient is not finite (trained elements, skipped steps too)
};

// A param's weight before the step (reference.Weight).
struct Weight {
  uint32_t image;  // the stored 16-bit pattern (fp32 params: their nearest-even image)
  float w;         // the fp32 weight
};

// The math's results: the new weight and states, fp32 (reference.Moments).
struct Moments {
  float w, m, v, vmax;  // vmax: amsgrad only
};

// Stage 1: the fp32 weight before the step (from the master, the param and its
// remainder, or the param) and the stored 16-bit pattern it is compared with after it.
// kParam16: the param is stored in kHalf (bf16 or float16), else it is fp32 and its image
// is its nearest-even kHalf pattern.
template <bool kParam16, MasterForm kMaster, Half kHalf = Half::kBf16>
RLVR_HD Weight load_weight(const Element& e) {
  Weight before;
  before.image = kParam16 ? e.param : round_nearest_half<kHalf>(e.param);
  if (kMaster == MasterForm::kFp32) {
    before.w = e.master;
  } else if (kMaster == MasterForm::kRemainder) {
    before.w = fp32_from_bits(join_remainder(e.param, e.remainder));
  } else if (kParam16 && kHalf == Half::kFp16) {
    before.w = fp16_value(e.param);  // a NaN is not the pattern's own (store_and_flag)
  } else if (kParam16) {
    before.w = half_bits_to_fp32<kHalf>(e.param);
  } else {
    before.w = fp32_from_bits(e.param);
  }
  return before;
}

// The fp32 gradient the math sees (reference.unscaled_grad).
RLVR_HD float unscaled_grad(float grad, const GradOptions& o) {
  float g = grad;
  if (o.has_grad_scale) g = div_rn(g, o.grad_scale);
  if (o.maximize) g = negate(g);
  return g;
}

// Stage 2, the optimizer's math: the arithmetic of torch's fused Adam, in its order; fp32
// registers only. Computed NaNs become canonical where the reference makes them so.
// `l2_decay` (torch's Adam; a constant in every instantiation but the CPU step's general
// loop): s.decay times the weight is added to the gradient, else (AdamW) the weight decays
// by the factor s.decay.
template <bool kAmsgrad>
RLVR_HD void adamw_math(float g, const StepScalars& s, bool l2_decay, float& w, float& m,
                        float& v, float& vmax) {
  if (l2_decay) {
    g = add_rn(g, mul_rn(s.decay, w));
  } else {
    w = mul_rn(w, s.decay);
  }
  m = canonical_nan(add_rn(mul_rn(s.beta1, m), mul_rn(s.one_minus_beta1, g)));
  v = canonical_nan(add_rn(mul_rn(s.beta2, v), mul_rn(mul_rn(s.one_minus_beta2, g), g)));
  float denom;
  if (kAmsgrad) {
    vmax = canonical_nan(maximum(vmax, v));
    denom = add_rn(div_rn(sqrt_rn(vmax), s.bc2_sqrt), s.eps);
  } else {
    denom = add_rn(div_rn(sqrt_rn(v), s.bc2_sqrt), s.eps);
  }
  w = canonical_nan(sub_rn(w, div_rn(mul_rn(s.step_size, m), denom)));
}

#if defined(RLVR_CPU_ISA) && defined(__AVX2__) && !defined(__CUDACC__)
// adamw_math on eight lanes, for the CPU backend's AVX2 loops (csrc/cpu_step.cpp,
// which includes <immintrin.h> before this header): the same fp32 operations in the same
// order, NaNs as the arithmetic leaves them (the caller makes them canonical where it
// stores them).
struct StepScalars8 {
  __m256 step_size, bc2_sqrt, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;

  explicit StepScalars8(const StepScalars& s)
      : step_size(_mm256_set1_ps(s.step_size)), bc2_sqrt(_mm256_set1_ps(s.bc2_sqrt)),
        decay(_mm256_set1_ps(s.decay)), beta1(_mm256_set1_ps(s.beta1)),
        one_minus_beta1(_mm256_set1_ps(s.one_minus_beta1)), beta2(_mm256_set1_ps(s.beta2)),
        one_minus_beta2(_mm256_set1_ps(s.one_minus_beta2)), eps(_mm256_set1_ps(s.eps)) {}
};

// maximum() on eight lanes: a NaN where either is a NaN (all ones, which the caller makes
// canonical), else max_ps, which returns `b` on equal values as maximum() does (+-0).
[[gnu::always_inline]] inline __m256 maximum(__m256 a, __m256 b) {
  return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}

// adamw_math on eight lanes (vmax: amsgrad only; l2_decay: torch's Adam, uniform over a
// launch). Forced inline: gcc 12 kept it a call, its vectors passed in memory.
template <bool kAmsgrad>
[[gnu::always_inline]] inline void adamw_math(__m256 g, const StepScalars8& s, bool l2_decay,
                                              __m256& w, __m256& m, __m256& v, __m256& vmax) {
  if (l2_decay) {
    g = _mm256_add_ps(g, _mm256_mul_ps(s.decay, w));
  } else {
    w = _mm256_mul_ps(w, s.decay);
  }
  m = _mm256_add_ps(_mm256_mul_ps(s.beta1, m), _mm256_mul_ps(s.one_minus_beta1, g));
  v = _mm256_add_ps(_mm256_mul_ps(s.beta2, v),
                    _mm256_mul_ps(_mm256_mul_ps(s.one_minus_beta2, g), g));
  __m256 v_root = v;  // the moment under the root
  if (kAmsgrad) v_root = vmax = maximum(vmax, v);
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v_root), s.bc2_sqrt), s.eps);
  w = _mm256_sub_ps(w, _mm256_div_ps(_mm256_mul_ps(s.step_size, m), denom));
}
#endif

// The stored form of a new weight (reference.store_weight): its 16-bit image and, in the
// remainder form (bf16 only), the remainder. fp32 params store w itself; their image is
// the nearest-even kHalf pattern. The one place that knows a storage format.
struct StoredWeight {
  uint32_t image;
  int32_t remainder;  // MasterForm::kRemainder only
};

template <bool kParam16, MasterForm kMaster, bool kStochastic, Half kHalf = Half::kBf16>
RLVR_HD StoredWeight store_weight(float w, uint32_t random_bits) {
  const uint32_t w_bits = fp32_bits(w);
  StoredWeight out{0u, 0};
  if (!kParam16) {
    out.image = round_nearest_half_computed<kHalf>(w);
  } else if (kMaster == MasterForm::kRemainder) {
    split_remainder(w_bits, out.image, out.remainder);
  } else if (kStochastic && kHalf == Half::kFp16) {
    out.image = round_stochastic_fp16_computed(w, random_bits);
  } else if (kStochastic) {
    out.image = round_stochastic_half<kHalf>(w_bits, random_bits);
  } else {
    out.image = round_nearest_half_computed<kHalf>(w);
  }
  return out;
}

// Stage 3: the element's new fields (an element that is not updated keeps every field bit
// for bit) and its flags.
template <bool kParam16, MasterForm kMaster, bool kStochastic, bool kAmsgrad,
          Half kHalf = Half::kBf16>
RLVR_HD ElementFlags store_and_flag(Element& e, Weight before, Moments after, float g,
                                    bool train, bool skip, uint32_t random_bits) {
  const uint32_t w_bits = fp32_bits(after.w);
  StoredWeight stored = store_weight<kParam16, kMaster, kStochastic, kHalf>(after.w, random_bits);
  const bool update = train && !skip;
  ElementFlags flags;
  flags.changed = update && stored.image != before.image;
  // A float16 param without a master has its weight from fp16_value, a NaN of unknown
  // bits where the param is a NaN pattern. A NaN weight steps to the canonical NaN
  // (adamw_math), the exact value of the pattern kFp16QuietNan and of no other, so it
  // moved unless it was that pattern.
  constexpr bool kNanByImage = kParam16 && kMaster == MasterForm::kNone && kHalf == Half::kFp16;
  const bool differs =
      kNanByImage ? (before.image != kFp16QuietNan) &
                        ((w_bits != fp32_bits(before.w)) | (before.w != before.w))
                  : w_bits != fp32_bits(before.w);
  flags.moved = update && differs;
  flags.nonfinite = train && !is_finite(g);
  if (update) {
    e.param = kParam16 ? stored.image : w_bits;
    if (kMaster == MasterForm::kFp32) e.master = after.w;
    if (kMaster == MasterForm::kRemainder) e.remainder = stored.remainder;
    e.exp_avg = after.m;
    e.exp_avg_sq = after.v;
    if (kAmsgrad) e.max_exp_avg_sq = after.vmax;
  }
  return flags;
}

// One element's step, in place, given its 16 random bits of stochastic rounding (ignored
// unless kStochastic; see random16). `train` is its freeze-mask bit, `skip` the launch's
// found_inf. kParam16 and kHalf: see load_weight.
template <bool kParam16, MasterForm kMaster, bool kStochastic, bool kAmsgrad,
          Half kHalf = Half::kBf16>
RLVR_HD ElementFlags adamw_element_drawn(Element& e, float grad, const StepScalars& s,
                                         const GradOptions& o, bool train, bool skip,
                                         uint32_t random_bits) {
  static_assert(kParam16 || (kMaster == MasterForm::kNone && !kStochastic),
                "fp32 params have no master, no remainder and no stochastic store");
  static_assert(!(kStochastic && kMaster == MasterForm::kRemainder),
                "the remainder form stores its bf16 half by nearest rounding only");
  static_assert(kMaster != MasterForm::kRemainder || kHalf == Half::kBf16,
                "the remainder form exists for bf16 params only");
  const float g = unscaled_grad(grad, o);
  Weight before = load_weight<kParam16, kMaster, kHalf>(e);
  Moments after{before.w, e.exp_avg, e.exp_avg_sq, e.max_exp_avg_sq};
  adamw_math<kAmsgrad>(g, s, o.l2_decay, after.w, after.m, after.v, after.vmax);
  return store_and_flag<kParam16, kMaster, kStochastic, kAmsgrad, kHalf>(e, before, after, g,
                                                                        train, skip, random_bits);
}

// The same, drawing the random bits for global element `index` under (key_lo, key_hi).
template <bool kParam16, MasterForm kMaster, bool kStochastic, bool kAmsgrad,
          Half kHalf = Half::kBf16>
RLVR_HD ElementFlags adamw_element(Element& e, float grad, const StepScalars& s,
                                   const GradOptions& o, bool train, bool skip,
                                   uint32_t key_lo, uint32_t key_hi, uint64_t index) {
  return adamw_element_drawn<kParam16, kMaster, kStochastic, kAmsgrad, kHalf>(
      e, grad, s, o, train, skip, kStochastic ? random16(key_lo, key_hi, index) : 0u);
}

}  // namespace rlvr_optim
