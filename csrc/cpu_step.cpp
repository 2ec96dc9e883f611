// The CPU step: adamw_element.cuh run over a table of host tensors, OpenMP over spans of
// whole 8-element tiles (one bitmap byte each), so threads never share a bitmap byte.
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
#include <utility>
#include <vector>

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

struct Counts {
  int64_t changed = 0, moved = 0, nonfinite = 0;
};

template <bool kBf16>
using Storage = std::conditional_t<kBf16, uint16_t, uint32_t>;

template <bool kBf16>
float value_of(uint32_t bits) {
  return kBf16 ? spec::bf16_bits_to_fp32(bits) : spec::fp32_from_bits(bits);
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
  uint8_t* change_bitmap = address<uint8_t>(row[kChangeBitmap]);
  uint8_t* cumulative_bitmap = address<uint8_t>(row[kCumulativeBitmap]);
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

// Elements [begin, end) of one row; begin is a multiple of 8.
template <bool kParamBf16, bool kGradBf16, bool kStateBf16, MasterForm kForm, bool kStochastic,
          bool kAmsgrad, bool kTrack, bool kPlainGrad>
void step_span(const int64_t* row, const CpuStep& a, int64_t begin, int64_t end, Counts& counts) {
  using P = Storage<kParamBf16>;
  using G = Storage<kGradBf16>;
  using S = Storage<kStateBf16>;
  P* param = address<P>(row[kParam]);
  const G* grad = address<const G>(row[kGrad]);
  S* exp_avg = address<S>(row[kExpAvg]);
  S* exp_avg_sq = address<S>(row[kExpAvgSq]);
  S* max_exp_avg_sq = address<S>(row[kMaxExpAvgSq]);
  float* master = address<float>(row[kMaster]);
  int16_t* remainder = address<int16_t>(row[kMaster]);
  const uint8_t* freeze_mask = address<const uint8_t>(row[kFreezeMask]);

  const float* r = a.scalars + 8 * row[kScalarRow];
  const spec::StepScalars s{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
  // kPlainGrad (no grad_scale, no maximize) as constants: gcc 12 does not vectorize a
  // select on a loop-invariant flag, so the other case is a loop of its own.
  const spec::GradOptions o =
      kPlainGrad ? spec::GradOptions{1.0f, false, false}
                 : spec::GradOptions{a.grad_scale != nullptr ? *a.grad_scale : 1.0f,
                                     a.grad_scale != nullptr, a.maximize};
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  uint32_t key_lo = 0, key_hi = 0;
  if (kStochastic) {
    key_lo = static_cast<uint32_t>(a.sr_keys[2 * row[kScalarRow]]);
    key_hi = static_cast<uint32_t>(a.sr_keys[2 * row[kScalarRow] + 1]);
  }
  const uint64_t offset = static_cast<uint64_t>(row[kElementOffset]);

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
      const float g = value_of<kGradBf16>(grad[i]);

      // Not const: gcc 12 keeps a const struct in memory (no scalar replacement), which
      // kept the tracking loop from vectorizing (6x the untracked step's time).
      spec::ElementFlags f =
          spec::adamw_element<kParamBf16, kForm, kStochastic, kAmsgrad>(
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

using SpanFn = void (*)(const int64_t*, const CpuStep&, int64_t, int64_t, Counts&);

// The loops of one layout: without and with grad_scale or maximize.
struct SpanFns {
  SpanFn plain, general;
};

template <int kCode>
constexpr SpanFns span_fn() {
  constexpr bool param_bf16 = kCode & kLayoutParamBf16;
  constexpr bool fp32_master = kCode & kLayoutMasterFp32;
  constexpr bool remainder = kCode & kLayoutRemainder;
  constexpr bool stochastic = kCode & kLayoutStochastic;
  if constexpr ((fp32_master && remainder) || (!param_bf16 && (fp32_master || remainder || stochastic)) ||
                (stochastic && remainder)) {
    return {nullptr, nullptr};
  } else {
    constexpr MasterForm form =
        fp32_master ? MasterForm::kFp32 : (remainder ? MasterForm::kRemainder : MasterForm::kNone);
    constexpr bool grad_bf16 = kCode & kLayoutGradBf16;
    constexpr bool state_bf16 = kCode & kLayoutStateBf16;
    constexpr bool amsgrad = kCode & kLayoutAmsgrad;
    constexpr bool track = kCode & kLayoutTrack;
    return {&step_span<param_bf16, grad_bf16, state_bf16, form, stochastic, amsgrad, track, true>,
            &step_span<param_bf16, grad_bf16, state_bf16, form, stochastic, amsgrad, track, false>};
  }
}

template <int... kCodes>
constexpr std::array<SpanFns, sizeof...(kCodes)> span_table(std::integer_sequence<int, kCodes...>) {
  return {span_fn<kCodes>()...};
}

// The loops of every layout code (nullptr: none), 96 of the 256 codes.
constexpr std::array<SpanFns, kLayoutCount> kSpanFns =
    span_table(std::make_integer_sequence<int, kLayoutCount>{});

struct WorkItem {
  int64_t tensor, begin, end;
};

}  // namespace

bool RLVR_CPU_JOIN(step_, RLVR_CPU_ISA)(const CpuStep& a) {
  const bool plain = a.grad_scale == nullptr && !a.maximize;
  std::vector<SpanFn> fns(static_cast<size_t>(a.num_tensors));
  std::vector<WorkItem> items;
  int64_t elements = 0;
  for (int64_t t = 0; t < a.num_tensors; ++t) {
    const int64_t* row = a.rows + t * kCpuRowInt64s;
    const int64_t layout = row[kLayout];
    if (layout < 0 || layout >= kLayoutCount || kSpanFns[layout].plain == nullptr) return false;
    fns[t] = plain ? kSpanFns[layout].plain : kSpanFns[layout].general;
    for (int64_t begin = 0; begin < row[kNumel]; begin += kSpan) {
      items.push_back({t, begin, std::min(begin + kSpan, row[kNumel])});
    }
    elements += row[kNumel];
  }
  std::vector<int64_t> totals(static_cast<size_t>(3 * a.num_tensors), 0);
  const int64_t count = static_cast<int64_t>(items.size());
  // One thread when the step is a single work item: waking a team costs more than it saves.
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.threads) if (elements > kSpan)
  for (int64_t k = 0; k < count; ++k) {
    const WorkItem& item = items[k];
    Counts c;
    fns[item.tensor](a.rows + item.tensor * kCpuRowInt64s, a, item.begin, item.end, c);
    int64_t* total = totals.data() + 3 * item.tensor;
#pragma omp atomic
    total[0] += c.changed;
#pragma omp atomic
    total[1] += c.moved;
#pragma omp atomic
    total[2] += c.nonfinite;
  }
  for (int64_t t = 0; t < a.num_tensors; ++t) {
    int64_t* counters = address<int64_t>(a.rows[t * kCpuRowInt64s + kCounters]);
    if (counters != nullptr) std::copy_n(totals.data() + 3 * t, 3, counters);
  }
  return true;
}

}  // namespace cpu
}  // namespace rlvr_optim
