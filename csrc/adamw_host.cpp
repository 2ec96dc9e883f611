// Host build of adamw_element.cuh, for tests/test_csrc.py: the kernel's per-element code
// run on flat CPU arrays of one tensor, so that a CPU machine can prove it equal to
// rlvr_optim.reference.adamw bit for bit. Not part of the extension (setup.py builds
// csrc/*.cu only). Compile with -ffp-contract=off: no fused multiply-add.
#include <cstdint>

#include "adamw_element.cuh"

namespace {

using rlvr_optim::Element;
using rlvr_optim::ElementFlags;
using rlvr_optim::GradOptions;
using rlvr_optim::MasterForm;
using rlvr_optim::StepScalars;

uint32_t load_bits(const void* p, bool bf16, int64_t i) {
  if (bf16) return static_cast<const uint16_t*>(p)[i];
  return static_cast<const uint32_t*>(p)[i];
}

float load_value(const void* p, bool bf16, int64_t i) {
  if (bf16) return rlvr_optim::bf16_bits_to_fp32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

void store_value(void* p, bool bf16, int64_t i, float x) {
  if (bf16) {
    const uint32_t bits = rlvr_optim::round_nearest_bf16(rlvr_optim::fp32_bits(x));
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bits);
  } else {
    static_cast<float*>(p)[i] = x;
  }
}

struct Tensor1 {
  int64_t numel;
  bool param_bf16, grad_bf16, state_bf16;
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* master;
  int16_t* remainder;
  const uint8_t* freeze_mask;
  uint8_t* change_bitmap;
  uint8_t* cumulative_bitmap;
  int64_t* counters;
  StepScalars scalars;
  uint32_t key_lo, key_hi;
  int64_t element_offset;
  GradOptions options;
  bool skip;
};

template <bool kParamBf16, MasterForm kMaster, bool kStochastic, bool kAmsgrad>
void step_tensor(const Tensor1& t) {
  int64_t changed_count = 0, moved_count = 0, nonfinite_count = 0;
  uint32_t changed_byte = 0;
  for (int64_t i = 0; i < t.numel; ++i) {
    const bool train = t.freeze_mask == nullptr || ((t.freeze_mask[i >> 3] >> (i & 7)) & 1u);
    Element e{};
    e.param = load_bits(t.param, kParamBf16, i);
    if (kMaster == MasterForm::kFp32) e.master = t.master[i];
    if (kMaster == MasterForm::kRemainder) e.remainder = t.remainder[i];
    e.exp_avg = load_value(t.exp_avg, t.state_bf16, i);
    e.exp_avg_sq = load_value(t.exp_avg_sq, t.state_bf16, i);
    if (kAmsgrad) e.max_exp_avg_sq = load_value(t.max_exp_avg_sq, t.state_bf16, i);
    const float grad = load_value(t.grad, t.grad_bf16, i);

    const ElementFlags f = rlvr_optim::adamw_element<kParamBf16, kMaster, kStochastic, kAmsgrad>(
        e, grad, t.scalars, t.options, train, t.skip, t.key_lo, t.key_hi,
        static_cast<uint64_t>(t.element_offset + i));

    if (train && !t.skip) {
      if (kParamBf16) {
        static_cast<uint16_t*>(t.param)[i] = static_cast<uint16_t>(e.param);
      } else {
        static_cast<uint32_t*>(t.param)[i] = e.param;
      }
      if (kMaster == MasterForm::kFp32) t.master[i] = e.master;
      if (kMaster == MasterForm::kRemainder) t.remainder[i] = static_cast<int16_t>(e.remainder);
      store_value(t.exp_avg, t.state_bf16, i, e.exp_avg);
      store_value(t.exp_avg_sq, t.state_bf16, i, e.exp_avg_sq);
      if (kAmsgrad) store_value(t.max_exp_avg_sq, t.state_bf16, i, e.max_exp_avg_sq);
    }
    changed_count += f.changed;
    moved_count += f.moved;
    nonfinite_count += f.nonfinite;
    changed_byte |= static_cast<uint32_t>(f.changed) << (i & 7);
    if ((i & 7) == 7 || i == t.numel - 1) {
      if (t.change_bitmap != nullptr) t.change_bitmap[i >> 3] = static_cast<uint8_t>(changed_byte);
      if (t.cumulative_bitmap != nullptr) t.cumulative_bitmap[i >> 3] |= static_cast<uint8_t>(changed_byte);
      changed_byte = 0;
    }
  }
  if (t.counters != nullptr) {
    t.counters[0] = changed_count;
    t.counters[1] = moved_count;
    t.counters[2] = nonfinite_count;
  }
}

template <bool kParamBf16, MasterForm kMaster, bool kStochastic>
void dispatch_amsgrad(const Tensor1& t, bool amsgrad) {
  if (amsgrad) {
    step_tensor<kParamBf16, kMaster, kStochastic, true>(t);
  } else {
    step_tensor<kParamBf16, kMaster, kStochastic, false>(t);
  }
}

}  // namespace

extern "C" {

// One tensor of rlvr_optim.reference.adamw on flat CPU arrays. bf16 arrays are uint16
// patterns. master_form: 0 none, 1 fp32 master, 2 int16 remainder. Optional pointers may
// be null (max_exp_avg_sq unless amsgrad, master, remainder, freeze_mask, the bitmaps,
// counters, sr_key unless stochastic, grad_scale, found_inf). Returns 0, or -1 for a mode
// the reference does not allow.
int rlvr_optim_host_adamw(int64_t numel, int param_bf16, int grad_bf16, int state_bf16,
                          int master_form, int stochastic, int amsgrad, int maximize,
                          void* param, const void* grad, void* exp_avg, void* exp_avg_sq,
                          void* max_exp_avg_sq, float* master, int16_t* remainder,
                          const uint8_t* freeze_mask, uint8_t* change_bitmap,
                          uint8_t* cumulative_bitmap, int64_t* counters, const float* scalars,
                          const int64_t* sr_key, int64_t element_offset,
                          const float* grad_scale, const float* found_inf) {
  Tensor1 t{};
  t.numel = numel;
  t.param_bf16 = param_bf16 != 0;
  t.grad_bf16 = grad_bf16 != 0;
  t.state_bf16 = state_bf16 != 0;
  t.param = param;
  t.grad = grad;
  t.exp_avg = exp_avg;
  t.exp_avg_sq = exp_avg_sq;
  t.max_exp_avg_sq = max_exp_avg_sq;
  t.master = master;
  t.remainder = remainder;
  t.freeze_mask = freeze_mask;
  t.change_bitmap = change_bitmap;
  t.cumulative_bitmap = cumulative_bitmap;
  t.counters = counters;
  t.scalars = StepScalars{scalars[0], scalars[1], scalars[2], scalars[3],
                          scalars[4], scalars[5], scalars[6], scalars[7]};
  if (sr_key != nullptr) {
    t.key_lo = static_cast<uint32_t>(sr_key[0]);
    t.key_hi = static_cast<uint32_t>(sr_key[1]);
  }
  t.element_offset = element_offset;
  t.options = GradOptions{grad_scale != nullptr ? *grad_scale : 1.0f, grad_scale != nullptr,
                          maximize != 0};
  t.skip = found_inf != nullptr && *found_inf != 0.0f;

  const bool sr = stochastic != 0;
  if (!t.param_bf16) {
    if (master_form != 0) return -1;  // rounding is ignored for fp32 params, as in the reference
    dispatch_amsgrad<false, MasterForm::kNone, false>(t, amsgrad != 0);
  } else if (master_form == 0) {
    if (sr) dispatch_amsgrad<true, MasterForm::kNone, true>(t, amsgrad != 0);
    else dispatch_amsgrad<true, MasterForm::kNone, false>(t, amsgrad != 0);
  } else if (master_form == 1) {
    if (sr) dispatch_amsgrad<true, MasterForm::kFp32, true>(t, amsgrad != 0);
    else dispatch_amsgrad<true, MasterForm::kFp32, false>(t, amsgrad != 0);
  } else if (master_form == 2 && !sr) {
    dispatch_amsgrad<true, MasterForm::kRemainder, false>(t, amsgrad != 0);
  } else {
    return -1;
  }
  return 0;
}

// Philox4x32-10 on n counters (4 words each) under n keys (2 words each).
void rlvr_optim_host_philox(const uint32_t* counters, const uint32_t* keys, uint32_t* out,
                            int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const rlvr_optim::Philox4 c{counters[4 * i], counters[4 * i + 1], counters[4 * i + 2],
                                counters[4 * i + 3]};
    const rlvr_optim::Philox4 r = rlvr_optim::philox4x32_10(c, keys[2 * i], keys[2 * i + 1]);
    out[4 * i] = r.x0;
    out[4 * i + 1] = r.x1;
    out[4 * i + 2] = r.x2;
    out[4 * i + 3] = r.x3;
  }
}

// The stochastic-rounding bits of global elements first .. first + n - 1 under one key.
void rlvr_optim_host_random16(uint32_t key_lo, uint32_t key_hi, uint64_t first, uint32_t* out,
                              int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = rlvr_optim::random16(key_lo, key_hi, first + i);
}

}  // extern "C"
