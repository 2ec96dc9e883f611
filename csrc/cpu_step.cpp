// The CPU step: adamw_element.cuh run over a table of host tensors, OpenMP over spans of
// whole 8-element tiles (one bitmap byte each), so threads never share a bitmap byte. The
// spec loop (step_span) runs the header's functions element by element; the AVX2 build
// runs the same operations written with intrinsics in every layout and leaves the spec
// loop a tensor's last few elements.
//
// Compiled once per instruction set, with RLVR_CPU_ISA naming it (generic: the baseline
// of the target; avx2: -mavx2, chosen at run time by cpu_binding.cpp). Build with
// -ffp-contract=off (no fused multiply-add: every fp32 operation rounds once, as in the
// reference) and -fno-math-errno (so the square root is an instruction the vectorizer
// can use; it changes no value).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_step.h"

#ifndef RLVR_CPU_ISA
#error "compile with -DRLVR_CPU_ISA=generic or -DRLVR_CPU_ISA=avx2"
#endif
#define RLVR_CPU_JOIN2(a, b) a##b
#define RLVR_CPU_JOIN(a, b) RLVR_CPU_JOIN2(a, b)

// The header's inline functions get a namespace per instruction set: the two objects are
// linked into one module, and the linker keeps one copy of an inline function with a
// given name, which could put AVX2 code on the generic path.
namespace RLVR_CPU_JOIN(isa_, RLVR_CPU_ISA) {
#include "adamw_element.cuh"
}  // namespace RLVR_CPU_JOIN(isa_, RLVR_CPU_ISA)

namespace rlvr_optim {
namespace cpu {
namespace {

namespace spec = RLVR_CPU_JOIN(isa_, RLVR_CPU_ISA)::rlvr_optim;
using spec::MasterForm;

// Elements of one pass of the element loop: its flags stay in L1 until they are packed.
constexpr int64_t kBlock = 256;
// Elements per OpenMP work item (a multiple of 8 and of kBlock): large enough that a
// work item costs far more than taking it, small enough to balance 2-64 threads over a
// model of a few big tensors.
constexpr int64_t kSpan = 1 << 15;
// Elements per block of the AVX2 loops: the random bits of one block are drawn before
// its groups (64 Philox calls, eight vectors' worth, plus one for an element offset that
// is not a multiple of 8).
constexpr int64_t kVectorBlock = 512;

struct Counts {
  int64_t changed = 0, moved = 0, nonfinite = 0;
};

template <bool kBf16>
using Storage = std::conditional_t<kBf16, uint16_t, uint32_t>;

template <bool kBf16>
float value_of(uint32_t bits) {
  return kBf16 ? spec::bf16_bits_to_fp32(bits) : spec::fp32_from_bits(bits);
}

// The storage format of a stream the loops read: fp32, bf16 or float16 bits. Params take
// their 16-bit format from kParam16 and spec::Half, states are fp32 or bf16, grads any.
enum class Format : int { kFp32, kBf16, kFp16 };

template <Format kFormat>
using Stored = std::conditional_t<kFormat == Format::kFp32, uint32_t, uint16_t>;

template <Format kFormat>
float format_value(uint32_t bits) {
  if constexpr (kFormat == Format::kBf16) {
    return spec::bf16_bits_to_fp32(bits);
  } else if constexpr (kFormat == Format::kFp16) {
    return spec::fp16_bits_to_fp32(bits);
  } else {
    return spec::fp32_from_bits(bits);
  }
}

// A state's new stored bits; a kept element keeps its bits (a bf16 NaN's payload too,
// which rounding its fp32 value again would quiet).
template <bool kBf16>
uint32_t state_bits(float value, uint32_t old_bits, bool update) {
  const uint32_t bits = spec::fp32_bits(value);
  if (!update) return old_bits;
  return kBf16 ? spec::round_nearest_bf16(bits) : bits;
}

template <typename T>
T* address(int64_t value) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(value));
}

// Packs one block's change flags into the bitmaps and adds its counts; flags past n are 0.
// Not inlined: in step_span it kept gcc 12 from vectorizing the element loop.
[[gnu::noinline]] void publish(const int64_t* row, int64_t b, int64_t n, const uint32_t* changed,
                               const uint32_t* moved, const uint32_t* nonfinite, Counts& counts) {
  uint8_t* change_bitmap = address<uint8_t>(row[kRow_change_bitmap]);
  uint8_t* cumulative_bitmap = address<uint8_t>(row[kRow_cumulative_bitmap]);
  for (int64_t k = 0; k < n; k += 8) {
    uint32_t byte = 0;
    for (int q = 0; q < 8; ++q) byte |= changed[k + q] << q;
    const int64_t at = (b + k) >> 3;
    if (change_bitmap != nullptr) change_bitmap[at] = static_cast<uint8_t>(byte);
    if (cumulative_bitmap != nullptr) cumulative_bitmap[at] |= static_cast<uint8_t>(byte);
  }
  uint32_t c = 0, m = 0, f = 0;  // at most kBlock each
  for (int64_t j = 0; j < n; ++j) {
    c += changed[j];
    m += moved[j];
    f += nonfinite[j];
  }
  counts.changed += c;
  counts.moved += m;
  counts.nonfinite += f;
}

// Elements [begin, end) of one row; begin is a multiple of 8. kParam16: the param is
// stored in 16 bits of format kHalf (else fp32, its change image kHalf).
template <bool kParam16, Format kGrad, bool kStateBf16, MasterForm kForm, bool kStochastic,
          bool kAmsgrad, bool kTrack, bool kPlainGrad, spec::Half kHalf>
void step_span(const int64_t* row, const CpuStep& a, int64_t begin, int64_t end, Counts& counts) {
  using P = Storage<kParam16>;
  using G = Stored<kGrad>;
  using S = Storage<kStateBf16>;
  P* param = address<P>(row[kRow_param]);
  const G* grad = address<const G>(row[kRow_grad]);
  S* exp_avg = address<S>(row[kRow_exp_avg]);
  S* exp_avg_sq = address<S>(row[kRow_exp_avg_sq]);
  S* max_exp_avg_sq = address<S>(row[kRow_max_exp_avg_sq]);
  float* master = address<float>(row[kRow_master]);
  int16_t* remainder = address<int16_t>(row[kRow_master]);
  const uint8_t* freeze_mask = address<const uint8_t>(row[kRow_freeze_mask]);

  const float* r = a.scalars + 8 * row[kRow_scalar_row];
  const spec::StepScalars s{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
  // kPlainGrad (no grad_scale, no maximize, AdamW's decay) as constants: gcc 12 does not
  // vectorize a select on a loop-invariant flag, so the other case is a loop of its own.
  const spec::GradOptions o =
      kPlainGrad ? spec::GradOptions{1.0f, false, false, false}
                 : spec::GradOptions{a.grad_scale != nullptr ? *a.grad_scale : 1.0f,
                                     a.grad_scale != nullptr, a.maximize, a.l2_decay};
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  uint32_t key_lo = 0, key_hi = 0;
  if (kStochastic) {
    key_lo = static_cast<uint32_t>(a.sr_keys[2 * row[kRow_scalar_row]]);
    key_hi = static_cast<uint32_t>(a.sr_keys[2 * row[kRow_scalar_row] + 1]);
  }
  const uint64_t offset = static_cast<uint64_t>(row[kRow_element_offset]);

  // 32-bit flags, the width of the arithmetic: byte flags cost the loop a narrowing and
  // widening shuffle per vector.
  alignas(64) uint32_t train[kBlock];
  alignas(64) uint32_t changed[kBlock];
  alignas(64) uint32_t moved[kBlock];
  alignas(64) uint32_t nonfinite[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    if (freeze_mask != nullptr) {
      for (int64_t j = 0; j < n; ++j) train[j] = (freeze_mask[(b + j) >> 3] >> ((b + j) & 7)) & 1u;
    } else {
      std::fill_n(train, n, 1u);
    }
    // Every output is stored unconditionally (a kept element gets its own bits back), so
    // the loop has no branches and vectorizes. ivdep: element i touches index i of each
    // array only; gcc does not trust on these locals, and versioning the loop
    // for every pair of arrays that might overlap is more than it will do.
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = b + j;
      const bool update = train[j] != 0 && !skip;
      spec::Element e{};
      e.param = param[i];
      if (kForm == MasterForm::kFp32) e.master = master[i];
      if (kForm == MasterForm::kRemainder) e.remainder = remainder[i];
      const uint32_t m_bits = exp_avg[i], v_bits = exp_avg_sq[i];
      e.exp_avg = value_of<kStateBf16>(m_bits);
      e.exp_avg_sq = value_of<kStateBf16>(v_bits);
      uint32_t vmax_bits = 0;
      if (kAmsgrad) {
        vmax_bits = max_exp_avg_sq[i];
        e.max_exp_avg_sq = value_of<kStateBf16>(vmax_bits);
      }
      const float g = format_value<kGrad>(grad[i]);

      // Not const: gcc 12 keeps a const struct in memory (no scalar replacement), which
      // kept the tracking loop from vectorizing (6x the untracked step's time).
      spec::ElementFlags f =
          spec::adamw_element<kParam16, kForm, kStochastic, kAmsgrad, kHalf>(
              e, g, s, o, train[j] != 0, skip, key_lo, key_hi, offset + static_cast<uint64_t>(i));

      param[i] = static_cast<P>(e.param);
      if (kForm == MasterForm::kFp32) master[i] = e.master;
      if (kForm == MasterForm::kRemainder) remainder[i] = static_cast<int16_t>(e.remainder);
      exp_avg[i] = static_cast<S>(state_bits<kStateBf16>(e.exp_avg, m_bits, update));
      exp_avg_sq[i] = static_cast<S>(state_bits<kStateBf16>(e.exp_avg_sq, v_bits, update));
      if (kAmsgrad) {
        max_exp_avg_sq[i] =
            static_cast<S>(state_bits<kStateBf16>(e.max_exp_avg_sq, vmax_bits, update));
      }
      if (kTrack) {
        changed[j] = f.changed;
        moved[j] = f.moved;
        nonfinite[j] = f.nonfinite;
      }
    }
    if (kTrack) {
      const int64_t padded = (n + 7) & ~int64_t{7};  // a tensor's last tile may be partial
      for (int64_t j = n; j < padded; ++j) changed[j] = moved[j] = nonfinite[j] = 0;
      publish(row, b, n, changed, moved, nonfinite, counts);
    }
  }
}

#if defined(__AVX2__)
// ---------------------------------------------------------------------------------------
// The default layouts written with AVX2 intrinsics: every stream bf16 (nearest or
// stochastic rounding), or every stream fp32 (nearest); no amsgrad or master, no
// grad_scale, maximize or L2 decay, no freeze mask, no skipped step. The spec loop above,
// auto-vectorized, spends about 15 instructions per element on these (gcc 12: widening
// shuffles, a NaN test in every rounding, selects for kept elements); this one 3 to 7 (csrc/README.md), so that the step is bound by memory
// rather than by instructions. It computes what adamw_element computes, operation for
// operation: the same fp32 operations in the same order, flags from the same comparisons.
// Every other layout, and the default ones with a freeze mask, grad_scale, maximize, L2
// decay or a skipped step, run the eight-element loop further down (vector_span); a
// tensor's last elements that do not fill a group run the spec loop.
//
// NaNs are rare, and one test per group of 16 finds every group that needs them: a NaN
// anywhere in the element's arithmetic (a stored param, m or v, a gradient) reaches the
// new param, and so does a non-finite gradient (an infinite g makes m infinite or NaN and
// v infinite or NaN, and then step_size * m / denom is inf / inf or NaN, whatever the
// scalars). So a group whose new params hold no NaN has no NaN among its new m and v (no
// canonical NaN to write), no stored NaN param (its bf16 image needs no NaN case) and no
// non-finite gradient (nothing to count). Only the other groups canonicalize and count.
// ---------------------------------------------------------------------------------------

// The loop's constants and helpers; the math is the header's eight-lane adamw_math. Forced
// inline: gcc 12 kept such helpers calls, their vectors passed in memory.
struct Fast {
  spec::StepScalars8 scalars;
  __m256 canonical_nan;
  __m256i round_bias, one, exponent;

  explicit Fast(const spec::StepScalars& s)
      : scalars(s),
        canonical_nan(_mm256_castsi256_ps(_mm256_set1_epi32(int(spec::kCanonicalNanBits)))),
        round_bias(_mm256_set1_epi32(0x7FFF)), one(_mm256_set1_epi32(1)),
        exponent(_mm256_set1_epi32(0x7F800000)) {}

  [[gnu::always_inline]] __m256 canonical(__m256 x) const {
    return _mm256_blendv_ps(x, canonical_nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }

  // adamw_math<false>, eight lanes, NaNs as the arithmetic leaves them (canonical()).
  [[gnu::always_inline]] void math(__m256 g, __m256& w, __m256& m, __m256& v) const {
    __m256 no_vmax = v;
    spec::adamw_math<false>(g, scalars, false, w, m, v, no_vmax);
  }

  // Whether lane k of a or b is a NaN: bit k (a) or bit 8 + k (b); nonzero in rare groups.
  [[gnu::always_inline]] static uint32_t nan_lanes(__m256 a, __m256 b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q))) |
           static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(b, b, _CMP_UNORD_Q))) << 8;
  }

  // round_nearest_bf16 of a computed (canonical-NaN) value, in the low half of each lane.
  [[gnu::always_inline]] __m256i round_computed(__m256 x) const {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, round_bias), lsb), 16);
  }

  // round_nearest_bf16 of any pattern (a stored fp32 param): NaN keeps sign and payload.
  [[gnu::always_inline]] __m256i round_stored(__m256i bits) const {
    const __m256i nan = _mm256_cmpgt_epi32(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)), exponent);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(round_computed(_mm256_castsi256_ps(bits)), quiet, nan);
  }
};

// Lane sums of count vectors (lanes well below 2**31).
[[gnu::always_inline]] inline int64_t lane_sum32(__m256i x) {
  const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  const __m128i d = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(d, _mm_shuffle_epi32(d, 0xB1)));
}

// Non-finite fp32 patterns among 8 lanes.
[[gnu::always_inline]] inline int nonfinite_lanes(__m256 x, __m256i exponent) {
  const __m256i e = _mm256_and_si256(_mm256_castps_si256(x), exponent);
  return __builtin_popcount(
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exponent)))));
}

void draw_random16(uint16_t* out, uint64_t first_call, int64_t calls, uint32_t key_lo,
                   uint32_t key_hi);

// A row's stochastic rounding stream (its element offset and Philox key; all zero when
// the row rounds to nearest), drawn a block of the AVX2 loops at a time.
struct Draw {
  uint64_t offset = 0;
  uint32_t key_lo = 0, key_hi = 0;

  Draw(const int64_t* row, const CpuStep& a, bool stochastic) {
    if (!stochastic) return;
    offset = static_cast<uint64_t>(row[kRow_element_offset]);
    key_lo = static_cast<uint32_t>(a.sr_keys[2 * row[kRow_scalar_row]]);
    key_hi = static_cast<uint32_t>(a.sr_keys[2 * row[kRow_scalar_row] + 1]);
  }

  // The random16 of elements [begin, end) of the row (end - begin <= kVectorBlock) into
  // out, from the whole Philox call holding `begin`'s: element i's bits are at
  // out[offset + i - first]; returns first, the global index of out[0].
  uint64_t fill(uint16_t* out, int64_t begin, int64_t end) const {
    const uint64_t first = (offset + static_cast<uint64_t>(begin)) & ~uint64_t{7};
    const uint64_t last = offset + static_cast<uint64_t>(end);
    draw_random16(out, first >> 3, static_cast<int64_t>((last - first + 7) >> 3), key_lo, key_hi);
    return first;
  }
};

// A span's tracking outputs. `moved` is kept as lanes of a vector that subtracts each
// comparison's all-ones lanes (one instruction per group) and is summed once; a span has
// at most kSpan elements, so no lane reaches 2**31.
struct FastTrack {
  uint8_t* change_bitmap;
  uint8_t* cumulative_bitmap;
  int64_t changed = 0, moved = 0, nonfinite = 0;

  // `changed` bits of elements at + 0 .. at + 15 (bit k = element at + k).
  [[gnu::always_inline]] void publish(int64_t at, uint32_t changed_bits) {
    const uint16_t bits = static_cast<uint16_t>(changed_bits);
    if (change_bitmap != nullptr) std::memcpy(change_bitmap + (at >> 3), &bits, 2);
    if (cumulative_bitmap != nullptr) {
      uint16_t old = 0;
      std::memcpy(&old, cumulative_bitmap + (at >> 3), 2);
      old = static_cast<uint16_t>(old | bits);
      std::memcpy(cumulative_bitmap + (at >> 3), &old, 2);
    }
    changed += __builtin_popcount(changed_bits);
  }
};

// bf16 param, grad and states, 16 elements a group. Unpacking a 16-element vector
// against zeros puts element k's pattern in the high half of lane k's word, in the order
// (0-3, 8-11) and (4-7, 12-15); packing the two halves back (packus) restores memory
// order, so no lane crosses. Stochastic rounding draws the random bits of 512 elements
// at a time (draw_random16) and unpacks them against zeros in the same order; it costs
// the loop fewer instructions than nearest rounding, so the draw is what it adds (2
// threads: 1.16x torch fused, against 1.46x with the 8-element loop;
// bench/results/cpu/2026-12-08/cpu_modes). Returns the first element it did not step.
template <bool kTrack, bool kStochastic>
int64_t fast_span_bf16(uint16_t* param, const uint16_t* grad, uint16_t* exp_avg, uint16_t* exp_avg_sq,
                       const Fast& k, const Draw& draw, int64_t begin, int64_t end,
                       FastTrack& out) {
  FastTrack t = out;  // a local: stores through the uint8_t bitmaps may alias `out`
  const __m256i zero = _mm256_setzero_si256();
  __m256i same_w = zero;  // minus the count, per lane
  alignas(32) uint16_t random[kStochastic ? kVectorBlock + 8 : 1];
  int64_t random_shift = 0;  // element i's random bits at random[i + random_shift]
  int64_t i = begin, block_end = begin;
  for (; i + 16 <= end; i += 16) {
    if (kStochastic && i >= block_end) {  // the next block's bits
      block_end = std::min(i + kVectorBlock, end);
      random_shift = static_cast<int64_t>(draw.offset - draw.fill(random, i, block_end));
    }
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(param + i));
    const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grad + i));
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(exp_avg + i));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(exp_avg_sq + i));
    __m256 out[2][3];
    __m256 w_old[2], g32[2];
    for (int h = 0; h < 2; ++h) {
      const auto widen = [&](__m256i x) {
        return _mm256_castsi256_ps(h == 0 ? _mm256_unpacklo_epi16(zero, x)
                                          : _mm256_unpackhi_epi16(zero, x));
      };
      w_old[h] = widen(p);
      g32[h] = widen(g);
      __m256 w = w_old[h], mh = widen(m), vh = widen(v);
      k.math(g32[h], w, mh, vh);
      out[h][0] = w;
      out[h][1] = mh;
      out[h][2] = vh;
    }
    if (__builtin_expect(Fast::nan_lanes(out[0][0], out[1][0]) != 0, 0)) {
      for (auto& half : out) {
        for (__m256& x : half) x = k.canonical(x);
      }
      if (kTrack) t.nonfinite += nonfinite_lanes(g32[0], k.exponent) + nonfinite_lanes(g32[1], k.exponent);
    }
    __m256i new_p;
    if constexpr (kStochastic) {
      // round_stochastic_bf16: the bits below the kept 16 plus random16, in the lane order
      // of the widened vectors (unpacking the random bits against zeros).
      const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(random + (i + random_shift)));
      new_p = _mm256_packus_epi32(
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(out[0][0]),
                                             _mm256_unpacklo_epi16(r, zero)), 16),
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(out[1][0]),
                                             _mm256_unpackhi_epi16(r, zero)), 16));
    } else {
      new_p = _mm256_packus_epi32(k.round_computed(out[0][0]), k.round_computed(out[1][0]));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(param + i), new_p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(exp_avg + i),
                        _mm256_packus_epi32(k.round_computed(out[0][1]),
                                            k.round_computed(out[1][1])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(exp_avg_sq + i),
                        _mm256_packus_epi32(k.round_computed(out[0][2]),
                                            k.round_computed(out[1][2])));
    if (kTrack) {
      // 16-bit lanes in memory order -> bytes (packs) -> bits: element e at bit e of the
      // low 8 (e < 8) or of bits 16-23 (e >= 8) of the byte mask.
      const __m256i same = _mm256_cmpeq_epi16(new_p, p);
      const uint32_t same_bits =
          static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(same, same)));
      t.publish(i, ~((same_bits & 0xFFu) | ((same_bits >> 8) & 0xFF00u)) & 0xFFFFu);
      for (int h = 0; h < 2; ++h) {
        same_w = _mm256_add_epi32(same_w, _mm256_cmpeq_epi32(_mm256_castps_si256(out[h][0]),
                                                             _mm256_castps_si256(w_old[h])));
      }
    }
  }
  if (kTrack) t.moved += (i - begin) + lane_sum32(same_w);
  out = t;
  return i;
}

// fp32 param, grad and states, 16 elements a group (two vectors), in memory order.
template <bool kTrack>
int64_t fast_span_fp32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                       const Fast& k, int64_t begin, int64_t end, FastTrack& out) {
  FastTrack t = out;  // a local: stores through the uint8_t bitmaps may alias `out`
  __m256i same_w = _mm256_setzero_si256();  // minus the count, per lane
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256 w_old[2], g[2], w[2], m[2], v[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h;
      w_old[h] = w[h] = _mm256_loadu_ps(param + j);
      g[h] = _mm256_loadu_ps(grad + j);
      m[h] = _mm256_loadu_ps(exp_avg + j);
      v[h] = _mm256_loadu_ps(exp_avg_sq + j);
      k.math(g[h], w[h], m[h], v[h]);
    }
    const bool rare = __builtin_expect(Fast::nan_lanes(w[0], w[1]) != 0, 0);
    if (rare) {
      for (int h = 0; h < 2; ++h) {
        w[h] = k.canonical(w[h]);
        m[h] = k.canonical(m[h]);
        v[h] = k.canonical(v[h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h;
      _mm256_storeu_ps(param + j, w[h]);
      _mm256_storeu_ps(exp_avg + j, m[h]);
      _mm256_storeu_ps(exp_avg_sq + j, v[h]);
    }
    if (kTrack) {
      uint32_t same_bits = 0;
      for (int h = 0; h < 2; ++h) {
        // Only a rare group can hold a stored NaN, whose bf16 image keeps sign and payload.
        const __m256i old_bits = _mm256_castps_si256(w_old[h]);
        const __m256i old_bf16 = rare ? k.round_stored(old_bits) : k.round_computed(w_old[h]);
        const __m256i same = _mm256_cmpeq_epi32(old_bf16, k.round_computed(w[h]));
        same_bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(same))) << (8 * h);
        same_w = _mm256_add_epi32(same_w, _mm256_cmpeq_epi32(_mm256_castps_si256(w[h]), old_bits));
      }
      if (rare) t.nonfinite += nonfinite_lanes(g[0], k.exponent) + nonfinite_lanes(g[1], k.exponent);
      t.publish(i, ~same_bits & 0xFFFFu);
    }
  }
  if (kTrack) t.moved += (i - begin) + lane_sum32(same_w);
  out = t;
  return i;
}

// ---------------------------------------------------------------------------------------
// Every layout on AVX2: eight elements a group, lanes in memory order, one group one byte
// of each bitmap. The same operations as adamw_element, with the NaN argument above: only
// a group whose new weight holds a NaN canonicalizes the new values, rounds a stored fp32
// NaN param with its payload and counts non-finite gradients (an amsgrad maximum with a
// NaN operand is a NaN, so it reaches the weight through the denominator). A frozen
// element gets its stored bits back (one blend per output; every element when there is
// no mask). grad_scale, maximize and Adam's L2 decay are uniform (a divide taken or not,
// a sign mask, an add or a multiply), a skipped step (found_inf) only counts and clears.
// Stochastic rounding draws the random bits of a block of groups first (philox8).
// ---------------------------------------------------------------------------------------

template <typename T>
[[gnu::always_inline]] inline __m256i load8x32(const T* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <typename T>
[[gnu::always_inline]] inline void store8x32(T* p, __m256i x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
}

template <typename T>
[[gnu::always_inline]] inline __m128i load8x16(const T* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// float16 conversions on eight lanes. Values and nearest-even rounding by F16C (the avx2
// build has -mf16c; cpu_binding.cpp uses it only where the CPU has both): vcvtps2ph with
// _MM_FROUND_TO_NEAREST_INT gives the header's round_nearest_fp16 bit for bit on all
// 2**32 fp32 patterns, NaN payloads, subnormals and overflow to inf included, whatever
// MXCSR's flush-to-zero bits (tests/test_cpu_backend.py checks all of them, also under
// torch.set_flush_denormal(True)). vcvtph2ps gives fp16_bits_to_fp32's exact value of
// every pattern but signalling NaNs, which it quiets; no output depends on that: a NaN
// param or grad makes the new weight a NaN, so its group stores canonical NaNs, and
// frozen elements and change flags keep and compare stored bits, never converted ones.
// Stochastic rounding has no instruction: integer operations, as the spec's formula.

// The fp32 values of eight float16 patterns in memory.
[[gnu::always_inline]] inline __m256 fp16_value8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// round_nearest_fp16 of eight fp32 values (any patterns), in the low halves of the lanes.
[[gnu::always_inline]] inline __m256i round_nearest_fp16_8(__m256 x) {
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// The float16 quiet NaN of NaN lanes (spec::fp16_nan) over `rounded`, and the sign.
[[gnu::always_inline]] inline __m256i fp16_finish(__m256i bits, __m256i magnitude,
                                                  __m256i rounded) {
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000));
  const __m256i finite = _mm256_min_epu32(rounded, _mm256_set1_epi32(0x7C00));  // overflow: inf
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
  const __m256i quiet = _mm256_or_si256(
      _mm256_set1_epi32(spec::kFp16QuietNan),
      _mm256_and_si256(_mm256_srli_epi32(bits, 13), _mm256_set1_epi32(0x3FF)));
  return _mm256_or_si256(sign, _mm256_blendv_epi8(finite, quiet, nan));
}

// Nearest with ties to even: in the normal range the magnitude rebased by 112 exponents
// drops 13 bits; below it the significand drops 126 - exponent bits, at most 26 (half an
// ULP is then above every significand: zero, as for fp32 subnormals, whose implicit bit
// set here changes nothing). Dropping d bits: add 2**(d-1) - 1 and the kept LSB, shift.
[[gnu::always_inline]] inline __m256i round_nearest_fp16_8(__m256i bits) {
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i exponent = _mm256_srli_epi32(magnitude, 23);
  const __m256i normal = _mm256_cmpgt_epi32(exponent, _mm256_set1_epi32(112));
  const __m256i value = _mm256_blendv_epi8(
      _mm256_or_si256(_mm256_and_si256(magnitude, _mm256_set1_epi32(0x7FFFFF)),
                      _mm256_set1_epi32(0x800000)),
      _mm256_sub_epi32(magnitude, _mm256_set1_epi32(112 << 23)), normal);
  const __m256i drop = _mm256_blendv_epi8(
      _mm256_min_epi32(_mm256_sub_epi32(_mm256_set1_epi32(126), exponent), _mm256_set1_epi32(26)),
      _mm256_set1_epi32(13), normal);
  const __m256i lsb = _mm256_and_si256(_mm256_srlv_epi32(value, drop), _mm256_set1_epi32(1));
  const __m256i half_less_one =  // 2**(drop - 1) - 1
      _mm256_srlv_epi32(_mm256_set1_epi32(-1), _mm256_sub_epi32(_mm256_set1_epi32(33), drop));
  const __m256i rounded =
      _mm256_srlv_epi32(_mm256_add_epi32(_mm256_add_epi32(value, half_less_one), lsb), drop);
  return fp16_finish(bits, magnitude, rounded);
}

// Stochastic rounding with 16 random bits per lane (spec::round_stochastic_fp16): in the
// normal range random16 >> 3 added below the 13 dropped bits; below it the significand
// aligned so that its low 16 bits are the window (variable shifts give zero for counts of
// 32 and more, as the spec's zero for shifts past the significand).
[[gnu::always_inline]] inline __m256i round_stochastic_fp16_8(__m256i bits, __m256i random16) {
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i exponent = _mm256_srli_epi32(magnitude, 23);
  const __m256i normal = _mm256_cmpgt_epi32(exponent, _mm256_set1_epi32(112));
  const __m256i kept_normal = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(magnitude, _mm256_set1_epi32(112 << 23)),
                       _mm256_srli_epi32(random16, 3)), 13);
  const __m256i significand = _mm256_or_si256(
      _mm256_and_si256(magnitude, _mm256_set1_epi32(0x7FFFFF)), _mm256_set1_epi32(0x800000));
  const __m256i shift = _mm256_sub_epi32(  // 14 .. 125 below the normal range
      _mm256_set1_epi32(126), _mm256_max_epi32(exponent, _mm256_set1_epi32(1)));
  const __m256i zero = _mm256_setzero_si256();
  const __m256i left = _mm256_max_epi32(_mm256_sub_epi32(_mm256_set1_epi32(16), shift), zero);
  const __m256i right = _mm256_max_epi32(_mm256_sub_epi32(shift, _mm256_set1_epi32(16)), zero);
  const __m256i aligned = _mm256_srlv_epi32(_mm256_sllv_epi32(significand, left), right);
  const __m256i kept_small = _mm256_srli_epi32(_mm256_add_epi32(aligned, random16), 16);
  return fp16_finish(bits, magnitude, _mm256_blendv_epi8(kept_small, kept_normal, normal));
}

// round_stochastic_fp16_8 of values the step computed (NaNs only where `rare`). Where
// every lane's magnitude is in [2**-14, 2**15) (float16's normal range, less its top
// binade) and none is a NaN, the normal range's formula is: random16 >> 3 added to the
// fp32 pattern (a carry may raise the exponent), then the 13 bits below a float16
// significand dropped, which is vcvtps2ph rounding toward zero (exact on these values,
// whatever MXCSR says: the rounding mode is the instruction's, inputs and outputs are
// normal). The top binade could carry to 2**16, where the formula gives inf and the
// instruction float16's largest finite value, so it takes the general formula with zeros,
// float16 subnormals and NaNs (about 2% of groups for weights of scale 0.02). Half the
// time of an fp16 stochastic step went to the general formula in every group (perf on
// Zen 3: its constants did not fit in registers); the integer form of the normal range's
// formula took 9 instructions and a pack where this takes 4.
[[gnu::always_inline]] inline __m256i round_stochastic_fp16_computed8(__m256i bits,
                                                                      __m256i random16,
                                                                      bool rare) {
  // Magnitudes one bit up, less 2**-14's: below (142 - 113) << 24 unsigned when in range.
  const __m256i above = _mm256_sub_epi32(_mm256_slli_epi32(bits, 1), _mm256_set1_epi32(113 << 24));
  const __m256i top = _mm256_set1_epi32((142 - 113) << 24);
  const bool normal = _mm256_movemask_epi8(_mm256_cmpgt_epi32(
                          _mm256_xor_si256(top, _mm256_set1_epi32(INT32_MIN)),
                          _mm256_xor_si256(above, _mm256_set1_epi32(INT32_MIN)))) == -1;
  if (__builtin_expect(rare || !normal, 0)) return round_stochastic_fp16_8(bits, random16);
  const __m256 biased = _mm256_castsi256_ps(_mm256_add_epi32(bits, _mm256_srli_epi32(random16, 3)));
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(biased, _MM_FROUND_TO_ZERO));
}

// A stream of eight elements stored as fp32, bf16 or float16: its stored bits in 32-bit
// lanes (a 16-bit pattern zero-extended: its low half), their fp32 values, and the store.
template <Format kFormat>
struct Lanes {
  using T = Stored<kFormat>;
  static constexpr bool kHalf16 = kFormat != Format::kFp32;

  [[gnu::always_inline]] static __m256i load(const T* p) {
    if constexpr (kHalf16) {
      return _mm256_cvtepu16_epi32(load8x16(p));
    } else {
      return load8x32(p);
    }
  }

  // The fp32 values of stored bits (fp32 and bf16: a shift at most).
  [[gnu::always_inline]] static __m256 value(__m256i bits) {
    static_assert(kFormat != Format::kFp16, "float16 values: value_at");
    return _mm256_castsi256_ps(kFormat == Format::kBf16 ? _mm256_slli_epi32(bits, 16) : bits);
  }

  // The fp32 values of the eight elements at p, whose stored bits are `bits` (float16:
  // converted from memory, one instruction).
  [[gnu::always_inline]] static __m256 value_at(const T* p, __m256i bits) {
    if constexpr (kFormat == Format::kFp16) {
      return fp16_value8(p);
    } else {
      return value(bits);
    }
  }

  [[gnu::always_inline]] static __m256 load_value(const T* p) {
    if constexpr (kFormat == Format::kFp16) {
      return fp16_value8(p);
    } else {
      return value(load(p));
    }
  }

  // Bits whose lanes hold a 16-bit pattern (< 2**16) when kHalf16.
  [[gnu::always_inline]] static void store(T* p, __m256i bits) {
    if constexpr (kHalf16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                        _mm256_extracti128_si256(bits, 1)));
    } else {
      store8x32(p, bits);
    }
  }

  // The stored bits (nearest even) of a computed (canonical-NaN) value.
  [[gnu::always_inline]] static __m256i stored(__m256 x, const Fast& k) {
    if constexpr (kFormat == Format::kFp16) {
      return round_nearest_fp16_8(x);
    } else {
      return kFormat == Format::kBf16 ? k.round_computed(x) : _mm256_castps_si256(x);
    }
  }
};

// The round keys of one Philox key, broadcast: round r xors k0[r] into word x0 and k1[r]
// into x2 (the header's k0 and k1 after r additions of kPhiloxKeyA and kPhiloxKeyB).
struct PhiloxKeys {
  __m256i k0[spec::kPhiloxRounds], k1[spec::kPhiloxRounds];

  PhiloxKeys(uint32_t key_lo, uint32_t key_hi) {
    for (int r = 0; r < spec::kPhiloxRounds; ++r) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(key_lo));
      k1[r] = _mm256_set1_epi32(static_cast<int>(key_hi));
      key_lo += spec::kPhiloxKeyA;
      key_hi += spec::kPhiloxKeyB;
    }
  }
};

// Four Philox calls, one per 64-bit lane: each word in the low half of its lane. The
// high halves carry whatever the products and xors leave there; vpmuludq reads only the
// low halves, so no instruction clears them (the stores pick the low halves).
struct Philox4Lanes {
  __m256i x0, x1, x2, x3;

  // Calls first_call + 0 .. 3: counter low and high words, x2 = x3 = 0.
  explicit Philox4Lanes(uint64_t first_call) {
    const __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first_call)),
                                             _mm256_setr_epi64x(0, 1, 2, 3));
    x0 = counter;
    x1 = _mm256_srli_epi64(counter, 32);
    x2 = x3 = _mm256_setzero_si256();
  }

  // philox4x32_10's round r: the 64-bit product's high word shifted down, its low word
  // left in place.
  [[gnu::always_inline]] void round(const PhiloxKeys& keys, int r) {
    const __m256i product_b = _mm256_mul_epu32(x2, _mm256_set1_epi32(static_cast<int>(spec::kPhiloxRoundB)));
    const __m256i product_a = _mm256_mul_epu32(x0, _mm256_set1_epi32(static_cast<int>(spec::kPhiloxRoundA)));
    x0 = _mm256_xor_si256(_mm256_srli_epi64(product_b, 32), _mm256_xor_si256(x1, keys.k0[r]));
    x1 = product_b;
    x2 = _mm256_xor_si256(_mm256_srli_epi64(product_a, 32), _mm256_xor_si256(x3, keys.k1[r]));
    x3 = product_a;
  }

  // The 128 bits of each call (x0 .. x3, low word first) to out + 8 * lane: calls 0 and
  // 1 in one 32-byte store, 2 and 3 in the next.
  [[gnu::always_inline]] void store(uint16_t* out) const {
    const __m256i x01 = _mm256_blend_epi32(x0, _mm256_slli_epi64(x1, 32), 0xAA);
    const __m256i x23 = _mm256_blend_epi32(x2, _mm256_slli_epi64(x3, 32), 0xAA);
    const __m256i calls02 = _mm256_unpacklo_epi64(x01, x23), calls13 = _mm256_unpackhi_epi64(x01, x23);
    store8x32(out, _mm256_permute2x128_si256(calls02, calls13, 0x20));
    store8x32(out + 16, _mm256_permute2x128_si256(calls02, calls13, 0x31));
  }
};

// Philox calls first_call .. first_call + 7, the header's philox_for_8 in the 64-bit lanes
// of two independent sets of vectors (two chains of rounds in flight); their outputs, 16
// random bits per index, into out[0 .. 63] (call c at out + 8c, word x0 first, low half
// first: random16_of's order). 16 vector instructions a round for the eight calls,
// against 20 with the calls in 32-bit lanes (the even and odd lanes' products blended
// back together every round).
[[gnu::always_inline]] inline void philox8(uint16_t* out, uint64_t first_call, const PhiloxKeys& keys) {
  Philox4Lanes a(first_call), b(first_call + 4);
  for (int r = 0; r < spec::kPhiloxRounds; ++r) {
    a.round(keys, r);
    b.round(keys, r);
  }
  a.store(out);
  b.store(out + 32);
}

// The 16 random bits of global indices 8 * first_call .. 8 * (first_call + calls) - 1 into
// out[0 ..], one Philox call per 8 indices: eight calls at a time in vectors (philox8),
// the last few one by one (the header's philox_for_8 and random16_of).
void draw_random16(uint16_t* out, uint64_t first_call, int64_t calls, uint32_t key_lo,
                   uint32_t key_hi) {
  const PhiloxKeys keys(key_lo, key_hi);
  int64_t c = 0;
  for (; c + 8 <= calls; c += 8) philox8(out + 8 * c, first_call + static_cast<uint64_t>(c), keys);
  for (; c < calls; ++c) {
    const spec::Philox4 r = spec::philox_for_8(key_lo, key_hi, first_call + static_cast<uint64_t>(c));
    for (unsigned half = 0; half < 8; ++half) {
      out[8 * c + half] = static_cast<uint16_t>(spec::random16_of(r, half));
    }
  }
}


// The param's storage format: kParam16 and kHalf as in step_span.
template <bool kParam16, spec::Half kHalf>
constexpr Format kParamFormat =
    !kParam16 ? Format::kFp32 : (kHalf == spec::Half::kFp16 ? Format::kFp16 : Format::kBf16);

// The nearest-even kHalf pattern of fp32 patterns: `computed` ones (canonical NaNs only,
// unless `any_nan`) or any stored pattern (a NaN keeps its sign and payload).
template <spec::Half kHalf>
[[gnu::always_inline]] inline __m256i round_nearest_half8(__m256i bits, const Fast& k,
                                                          bool any_nan) {
  if constexpr (kHalf == spec::Half::kFp16) {
    return round_nearest_fp16_8(_mm256_castsi256_ps(bits));  // every NaN case alike
  } else {
    return any_nan ? k.round_stored(bits) : k.round_computed(_mm256_castsi256_ps(bits));
  }
}

// The whole 8-element groups of [begin, end) of one row (begin a multiple of 8), in any
// layout; returns where the groups end (the spec loop steps a tensor's last elements).
template <bool kParam16, Format kGrad, bool kStateBf16, MasterForm kForm, bool kStochastic,
          bool kAmsgrad, bool kTrack, spec::Half kHalf>
int64_t vector_span(const int64_t* row, const CpuStep& a, int64_t begin, int64_t end,
                    Counts& counts) {
  using P = Lanes<kParamFormat<kParam16, kHalf>>;
  using G = Lanes<kGrad>;
  using S = Lanes<kStateBf16 ? Format::kBf16 : Format::kFp32>;
  typename P::T* param = address<typename P::T>(row[kRow_param]);
  const typename G::T* grad = address<const typename G::T>(row[kRow_grad]);
  typename S::T* exp_avg = address<typename S::T>(row[kRow_exp_avg]);
  typename S::T* exp_avg_sq = address<typename S::T>(row[kRow_exp_avg_sq]);
  typename S::T* max_exp_avg_sq = address<typename S::T>(row[kRow_max_exp_avg_sq]);
  float* master = address<float>(row[kRow_master]);
  int16_t* remainder = address<int16_t>(row[kRow_master]);
  const uint8_t* freeze_mask = address<const uint8_t>(row[kRow_freeze_mask]);
  uint8_t* change_bitmap = address<uint8_t>(row[kRow_change_bitmap]);
  uint8_t* cumulative_bitmap = address<uint8_t>(row[kRow_cumulative_bitmap]);

  const float* r = a.scalars + 8 * row[kRow_scalar_row];
  const Fast k(spec::StepScalars{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]});
  const bool scaled = a.grad_scale != nullptr, l2_decay = a.l2_decay;
  const __m256 grad_scale = _mm256_set1_ps(scaled ? *a.grad_scale : 1.0f);
  // maximize negates g after the division (reference.unscaled_grad): a sign flip.
  const __m256 grad_sign = _mm256_castsi256_ps(_mm256_set1_epi32(a.maximize ? INT32_MIN : 0));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i all = _mm256_set1_epi32(-1);
  const int64_t stop = begin + ((end - begin) & ~int64_t{7});

  const auto unscaled_grad = [&](int64_t i) {
    __m256 g = G::load_value(grad + i);
    if (scaled) g = _mm256_div_ps(g, grad_scale);
    return _mm256_xor_ps(g, grad_sign);
  };
  // Lane k: all ones when element i + k is trained (i a multiple of 8).
  const auto trained = [&](int64_t i) {
    if (freeze_mask == nullptr) return all;
    const __m256i byte = _mm256_set1_epi32(freeze_mask[i >> 3]);
    return _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
  };
  const auto nonfinite_lanes = [&](__m256 g, __m256i train) {
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(g), k.exponent);
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpeq_epi32(e, k.exponent), train)))));
  };

  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {
    // A skipped step writes nothing but zero change bits and the non-finite count.
    if (!kTrack) return end;
    for (int64_t i = begin; i < stop; i += 8) {
      counts.nonfinite += nonfinite_lanes(unscaled_grad(i), trained(i));
      if (change_bitmap != nullptr) change_bitmap[i >> 3] = 0;
    }
    return stop;
  }

  const Draw draw(row, a, kStochastic);
  // Counts in vector lanes, subtracting each all-ones lane (at most kSpan / 8 per lane).
  __m256i changed_lanes = _mm256_setzero_si256(), moved_lanes = _mm256_setzero_si256();
  int64_t nonfinite = 0;

  // Two passes over each block of groups. compute: loads, adamw_math, the new fp32
  // states stored (bf16 ones, and the new weights, as fp32 bits into block buffers); a
  // short loop whose time is the divider's (sqrt, two divides per group). store: the
  // weights' stored forms (rounding with the block's random bits), the bf16 states'
  // rounding, frozen lanes' old bits, change flags: integer work. (Rounding bf16 states
  // here rather than in compute: 0.90-0.97x the time of the bf16-state modes.) One loop
  // doing both was slower (perf on Zen 3: fewer groups' divides in flight); running a
  // block's stores inside the next block's compute loop was slower still
  // (bench/results/cpu/2026-12-08/cpu_modes/README.md).
  struct Block {
    int64_t begin = 0, end = 0;
    uint64_t first = 0;  // the global index of random[0]
    alignas(32) uint32_t w[kVectorBlock];
    alignas(32) uint32_t m[kStateBf16 ? kVectorBlock : 1], v[kStateBf16 ? kVectorBlock : 1];
    alignas(32) uint16_t random[kStochastic ? kVectorBlock + 8 : 1];
  };
  Block x;

  const auto compute = [&](int64_t i, Block& x) {
    const int64_t j = i - x.begin;
    // Stage 1: load_weight.
    const __m256 g = unscaled_grad(i);
    __m256 w_old;
    if constexpr (kForm == MasterForm::kFp32) {
      w_old = _mm256_loadu_ps(master + i);
    } else if constexpr (kForm == MasterForm::kRemainder) {
      const __m256i remainder_old = _mm256_cvtepi16_epi32(load8x16(remainder + i));
      w_old = _mm256_castsi256_ps(
          _mm256_add_epi32(_mm256_slli_epi32(P::load(param + i), 16), remainder_old));
    } else {
      w_old = P::load_value(param + i);
    }
    const __m256i m_old = S::load(exp_avg + i), v_old = S::load(exp_avg_sq + i);
    __m256i vmax_old = _mm256_setzero_si256();  // kAmsgrad only
    __m256 w = w_old, m = S::value(m_old), v = S::value(v_old), vmax = _mm256_setzero_ps();

    // Stage 2: adamw_math.
    if constexpr (kAmsgrad) {
      vmax_old = S::load(max_exp_avg_sq + i);
      vmax = S::value(vmax_old);
    }
    spec::adamw_math<kAmsgrad>(g, k.scalars, l2_decay, w, m, v, vmax);
    const __m256i train = trained(i);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(w, w, _CMP_UNORD_Q)) != 0, 0)) {
      w = k.canonical(w);
      m = k.canonical(m);
      v = k.canonical(v);
      if (kAmsgrad) vmax = k.canonical(vmax);
      if (kTrack) nonfinite += nonfinite_lanes(g, train);
    }
    // Stage 3, the states (frozen lanes keep their bits); the weight waits in w_out.
    const auto keep = [&](__m256i old_bits, __m256i new_bits) {
      return _mm256_blendv_epi8(old_bits, new_bits, train);
    };
    if constexpr (kStateBf16) {  // rounded in the store pass
      store8x32(x.m + j, _mm256_castps_si256(m));
      store8x32(x.v + j, _mm256_castps_si256(v));
    } else {
      S::store(exp_avg + i, keep(m_old, S::stored(m, k)));
      S::store(exp_avg_sq + i, keep(v_old, S::stored(v, k)));
    }
    if constexpr (kAmsgrad) S::store(max_exp_avg_sq + i, keep(vmax_old, S::stored(vmax, k)));
    store8x32(x.w + j, _mm256_castps_si256(w));
  };

  // Stage 3, the weight (store_weight's formats) and the change flags of group i of
  // block x; frozen lanes keep their bits.
  const auto store = [&](int64_t i, const Block& x) {
    const __m256i w_bits = load8x32(x.w + (i - x.begin));
    // A NaN among the new weights: the group's other inputs may hold NaNs too.
    const bool rare = __builtin_expect(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_castsi256_ps(w_bits),
                                         _mm256_castsi256_ps(w_bits), _CMP_UNORD_Q)) != 0, 0);
    const __m256i p = P::load(param + i);
    const __m256i train = trained(i);
    const auto keep = [&](__m256i old_bits, __m256i new_bits) {
      return _mm256_blendv_epi8(old_bits, new_bits, train);
    };
    if constexpr (kStateBf16) {
      const int64_t j = i - x.begin;
      S::store(exp_avg + i, keep(S::load(exp_avg + i),
                                 S::stored(_mm256_castsi256_ps(load8x32(x.m + j)), k)));
      S::store(exp_avg_sq + i, keep(S::load(exp_avg_sq + i),
                                    S::stored(_mm256_castsi256_ps(load8x32(x.v + j)), k)));
    }
    __m256i image;
    if constexpr (kForm == MasterForm::kRemainder) {
      image = _mm256_srli_epi32(_mm256_add_epi32(w_bits, _mm256_set1_epi32(0x8000)), 16);
    } else if constexpr (kParam16 && kStochastic) {
      const __m256i bits =
          _mm256_cvtepu16_epi32(load8x16(x.random + (draw.offset + static_cast<uint64_t>(i) - x.first)));
      if constexpr (kHalf == spec::Half::kFp16) {
        image = round_stochastic_fp16_computed8(w_bits, bits, rare);
      } else {
        image = _mm256_srli_epi32(_mm256_add_epi32(w_bits, bits), 16);
      }
    } else {
      image = round_nearest_half8<kHalf>(w_bits, k, false);
    }
    // The old weight (tracked only, but for the master) is read before the param is
    // stored: a float16 param's value is converted from memory.
    __m256i w_old_bits = _mm256_setzero_si256();
    __m256i remainder_old = _mm256_setzero_si256();  // kRemainder only
    if constexpr (kForm == MasterForm::kFp32) {
      w_old_bits = load8x32(master + i);
    } else if constexpr (kForm == MasterForm::kRemainder) {
      remainder_old = _mm256_cvtepi16_epi32(load8x16(remainder + i));
      w_old_bits = _mm256_add_epi32(_mm256_slli_epi32(p, 16), remainder_old);
    } else if constexpr (kTrack) {
      w_old_bits = _mm256_castps_si256(P::value_at(param + i, p));
    }
    P::store(param + i, keep(p, kParam16 ? image : w_bits));
    if constexpr (kForm == MasterForm::kFp32) {
      store8x32(master + i, keep(w_old_bits, w_bits));
    } else if constexpr (kForm == MasterForm::kRemainder) {
      const __m256i rem =
          keep(remainder_old, _mm256_sub_epi32(w_bits, _mm256_slli_epi32(image, 16)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(remainder + i),
                       _mm_packs_epi32(_mm256_castsi256_si128(rem), _mm256_extracti128_si256(rem, 1)));
    }

    if constexpr (kTrack) {
      // An fp32 param's image: only a rare group can hold a stored NaN (payload kept).
      const __m256i image_old = kParam16 ? p : round_nearest_half8<kHalf>(p, k, rare);
      const __m256i changed = _mm256_andnot_si256(_mm256_cmpeq_epi32(image, image_old), train);
      const __m256i moved = _mm256_andnot_si256(_mm256_cmpeq_epi32(w_bits, w_old_bits), train);
      changed_lanes = _mm256_sub_epi32(changed_lanes, changed);
      moved_lanes = _mm256_sub_epi32(moved_lanes, moved);
      const auto byte = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(changed)));
      if (change_bitmap != nullptr) change_bitmap[i >> 3] = byte;
      if (cumulative_bitmap != nullptr) cumulative_bitmap[i >> 3] |= byte;
    }
  };

  for (int64_t b = begin; b < stop; b += kVectorBlock) {
    x.begin = b;
    x.end = std::min(b + kVectorBlock, stop);
    if (kStochastic) x.first = draw.fill(x.random, x.begin, x.end);
    for (int64_t i = x.begin; i < x.end; i += 8) compute(i, x);
    for (int64_t i = x.begin; i < x.end; i += 8) store(i, x);
  }
  if (kTrack) {
    counts.changed += lane_sum32(changed_lanes);
    counts.moved += lane_sum32(moved_lanes);
    counts.nonfinite += nonfinite;
  }
  return stop;
}

// The two default layouts (every stream bf16, nearest or stochastic rounding; or every
// stream fp32, nearest; no amsgrad or master), which have loops of their own
// (fast_span_*) on AVX2.
template <bool kParam16, Format kGrad, bool kStateBf16, MasterForm kForm, bool kStochastic,
          bool kAmsgrad, spec::Half kHalf>
constexpr bool kDefaultLayout =
    kForm == MasterForm::kNone && !kAmsgrad && kHalf == spec::Half::kBf16 &&
    (kParam16 ? kGrad == Format::kBf16 && kStateBf16
              : kGrad == Format::kFp32 && !kStateBf16 && !kStochastic);

// A row's span on AVX2: the default layouts' 16-element loop where it applies (no freeze
// mask, step not skipped, no grad_scale, maximize or L2 decay: kPlain), the 8-element loop
// otherwise, then the spec loop over the few elements that do not fill a group.
template <bool kParam16, Format kGrad, bool kStateBf16, MasterForm kForm, bool kStochastic,
          bool kAmsgrad, bool kTrack, bool kPlain, spec::Half kHalf>
void avx2_span(const int64_t* row, const CpuStep& a, int64_t begin, int64_t end, Counts& counts) {
  constexpr bool kDefault =
      kDefaultLayout<kParam16, kGrad, kStateBf16, kForm, kStochastic, kAmsgrad, kHalf>;
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  int64_t done = begin;
  if (kDefault && kPlain && row[kRow_freeze_mask] == 0 && !skip) {
    const float* r = a.scalars + 8 * row[kRow_scalar_row];
    const Fast k(spec::StepScalars{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]});
    FastTrack t{address<uint8_t>(row[kRow_change_bitmap]), address<uint8_t>(row[kRow_cumulative_bitmap])};
    using T = std::conditional_t<kParam16, uint16_t, float>;
    T* param = address<T>(row[kRow_param]);
    const T* grad = address<const T>(row[kRow_grad]);
    T* exp_avg = address<T>(row[kRow_exp_avg]);
    T* exp_avg_sq = address<T>(row[kRow_exp_avg_sq]);
    if constexpr (kParam16) {
      done = fast_span_bf16<kTrack, kStochastic>(param, grad, exp_avg, exp_avg_sq, k,
                                                 Draw(row, a, kStochastic), begin, end, t);
    } else {
      done = fast_span_fp32<kTrack>(param, grad, exp_avg, exp_avg_sq, k, begin, end, t);
    }
    counts.changed += t.changed;
    counts.moved += t.moved;
    counts.nonfinite += t.nonfinite;
  } else {
    done = vector_span<kParam16, kGrad, kStateBf16, kForm, kStochastic, kAmsgrad, kTrack, kHalf>(
        row, a, begin, end, counts);
  }
  if (done < end) {
    step_span<kParam16, kGrad, kStateBf16, kForm, kStochastic, kAmsgrad, kTrack, false, kHalf>(
        row, a, done, end, counts);
  }
}
#endif  // __AVX2__

using SpanFn = void (*)(const int64_t*, const CpuStep&, int64_t, int64_t, Counts&);

// The loops of one layout: without and with grad_scale, maximize or L2 decay, and the
// name of the loop that steps its whole 8-element groups (loop_of, for tests).
struct SpanFns {
  SpanFn plain, general;
  const char* loop;
};

template <int kCode>
constexpr SpanFns span_fn() {
  constexpr bool param_bf16 = kCode & kLayoutParamBf16;
  constexpr bool param_fp16 = kCode & kLayoutParamFp16;
  constexpr bool image_fp16 = kCode & kLayoutImageFp16;
  constexpr bool param16 = param_bf16 || param_fp16;
  constexpr bool fp32_master = kCode & kLayoutMasterFp32;
  constexpr bool remainder = kCode & kLayoutRemainder;
  constexpr bool stochastic = kCode & kLayoutStochastic;
  constexpr bool grad_bf16 = kCode & kLayoutGradBf16;
  constexpr bool grad_fp16 = kCode & kLayoutGradFp16;
  if constexpr ((fp32_master && remainder) || (!param16 && (fp32_master || remainder || stochastic)) ||
                (stochastic && remainder) || (param_bf16 && param_fp16) ||
                (param16 && image_fp16) || (param_fp16 && remainder) ||
                (grad_fp16 && (grad_bf16 || !param_fp16))) {
    return {nullptr, nullptr, "none"};
  } else {
    // float16 grads beside float16 params only (cpu_backend.py makes other ones fp32).
    constexpr Format grad = grad_fp16 ? Format::kFp16 : (grad_bf16 ? Format::kBf16 : Format::kFp32);
    constexpr spec::Half half = param_fp16 || image_fp16 ? spec::Half::kFp16 : spec::Half::kBf16;
    constexpr MasterForm form =
        fp32_master ? MasterForm::kFp32 : (remainder ? MasterForm::kRemainder : MasterForm::kNone);
    constexpr bool state_bf16 = kCode & kLayoutStateBf16;
    constexpr bool amsgrad = kCode & kLayoutAmsgrad;
    constexpr bool track = kCode & kLayoutTrack;
#if defined(__AVX2__)
    constexpr SpanFn general =
        &avx2_span<param16, grad, state_bf16, form, stochastic, amsgrad, track, false, half>;
    if constexpr (kDefaultLayout<param16, grad, state_bf16, form, stochastic, amsgrad, half>) {
      return {&avx2_span<param16, grad, state_bf16, form, stochastic, amsgrad, track, true, half>,
              general, "fast_span, vector_span"};
    }
    return {general, general, "vector_span"};
#else
    return {&step_span<param16, grad, state_bf16, form, stochastic, amsgrad, track, true, half>,
            &step_span<param16, grad, state_bf16, form, stochastic, amsgrad, track, false, half>,
            "step_span"};
#endif
  }
}

template <int... kCodes>
constexpr std::array<SpanFns, sizeof...(kCodes)> span_table(std::integer_sequence<int, kCodes...>) {
  return {span_fn<kCodes>()...};
}

// The loops of every layout code (nullptr: none), 208 of the 2048 codes.
constexpr std::array<SpanFns, kLayoutCodes> kSpanFns =
    span_table(std::make_integer_sequence<int, kLayoutCodes>{});

struct WorkItem {
  int64_t tensor, begin, end;
};

}  // namespace

const char* RLVR_CPU_JOIN(loop_of_, RLVR_CPU_ISA)(int64_t layout) {
  return kSpanFns[static_cast<size_t>(layout & (kLayoutCodes - 1))].loop;
}

void RLVR_CPU_JOIN(fp16_round_, RLVR_CPU_ISA)(uint16_t* out, uint64_t first, int64_t count,
                                               const uint16_t* random16) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; k + 8 <= count; k += 8) {
    const __m256i bits =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + static_cast<uint64_t>(k))), lane);
    const __m256i image =
        random16 == nullptr
            ? round_nearest_fp16_8(_mm256_castsi256_ps(bits))
            : round_stochastic_fp16_computed8(  // a NaN takes the general formula, as in the loop
                  bits, _mm256_cvtepu16_epi32(load8x16(random16 + k)),
                  _mm256_movemask_ps(_mm256_cmp_ps(_mm256_castsi256_ps(bits),
                                                   _mm256_castsi256_ps(bits), _CMP_UNORD_Q)) != 0);
    Lanes<Format::kFp16>::store(out + k, image);
  }
#endif
  for (; k < count; ++k) {
    const auto bits = static_cast<uint32_t>(first + static_cast<uint64_t>(k));
    out[k] = static_cast<uint16_t>(random16 == nullptr ? spec::round_nearest_fp16(bits)
                                                       : spec::round_stochastic_fp16(bits, random16[k]));
  }
}

void RLVR_CPU_JOIN(fp16_values_, RLVR_CPU_ISA)(const uint16_t* in, float* out, int64_t count) {
  int64_t k = 0;
#if defined(__AVX2__)
  for (; k + 8 <= count; k += 8) _mm256_storeu_ps(out + k, fp16_value8(in + k));
#endif
  for (; k < count; ++k) out[k] = spec::fp16_bits_to_fp32(in[k]);
}

bool RLVR_CPU_JOIN(step_, RLVR_CPU_ISA)(const CpuStep& a) {
  const bool plain = a.grad_scale == nullptr && !a.maximize && !a.l2_decay;
  std::vector<SpanFn> fns(static_cast<size_t>(a.num_tensors));
  std::vector<WorkItem> items;
  int64_t elements = 0;
  for (int64_t t = 0; t < a.num_tensors; ++t) {
    const int64_t* row = a.rows + t * kRowInt64s;
    const int64_t layout = row[kRow_layout] & (kLayoutCodes - 1);  // without alignment bits
    if (layout < 0 || kSpanFns[layout].plain == nullptr) return false;
    fns[t] = plain ? kSpanFns[layout].plain : kSpanFns[layout].general;
    for (int64_t begin = 0; begin < row[kRow_numel]; begin += kSpan) {
      items.push_back({t, begin, std::min(begin + kSpan, row[kRow_numel])});
    }
    elements += row[kRow_numel];
  }
  std::vector<int64_t> totals(static_cast<size_t>(3 * a.num_tensors), 0);
  const int64_t count = static_cast<int64_t>(items.size());
  // One thread when the step is a single work item: waking a team costs more than it saves.
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.threads) if (elements > kSpan)
  for (int64_t k = 0; k < count; ++k) {
    const WorkItem& item = items[k];
    Counts c;
    fns[item.tensor](a.rows + item.tensor * kRowInt64s, a, item.begin, item.end, c);
    int64_t* total = totals.data() + 3 * item.tensor;
#pragma omp atomic
    total[0] += c.changed;
#pragma omp atomic
    total[1] += c.moved;
#pragma omp atomic
    total[2] += c.nonfinite;
  }
  for (int64_t t = 0; t < a.num_tensors; ++t) {
    int64_t* counters = address<int64_t>(a.rows[t * kRowInt64s + kRow_counters]);
    if (counters != nullptr) std::copy_n(totals.data() + 3 * t, 3, counters);
  }
  return true;
}

}  // namespace cpu
}  // namespace rlvr_optim
