// The table that describes a step to every fused backend: one row of int64 fields per
// tensor, built by the planner (rlvr_optim/plan.py) and read by name by the CUDA kernel
// (adamw_kernel.cuh), the CPU step (cpu_step.cpp) and the Triton kernel
// (triton_kernels/adamw.py). The two lists below are X-macros: rlvr_optim/table.py reads
// them from this file, so Python, C++ and Triton take the field order, the layout bits and
// the counters from this one definition. Addresses are device (or host) pointers, 0 when
// absent. No code here.
#pragma once

#include <cstdint>

// The fields of a row, in order.
#define RLVR_ROW_FIELDS(X)                                                                   \
  X(param)             /* fp32, bf16 or float16 */                                           \
  X(grad)              /* fp32, bf16 or float16 (CPU: float16 beside float16 params) */      \
  X(exp_avg)           /* fp32 or bf16, as exp_avg_sq and max_exp_avg_sq */                  \
  X(exp_avg_sq)                                                                              \
  X(max_exp_avg_sq)    /* amsgrad only */                                                    \
  X(master)            /* fp32 master, or int16 remainder */                                 \
  X(freeze_mask)       /* packed bits, 1 = trained; 0: every element trained */              \
  X(change_bitmap)     /* packed bits */                                                     \
  X(cumulative_bitmap) /* packed bits, OR-ed */                                              \
  X(counters)          /* int64 [kCounters], in the order of RLVR_COUNTERS */                \
  X(numel)                                                                                   \
  X(element_offset)    /* global index of element 0 (stochastic rounding stream) */         \
  X(scalar_row)        /* row of scalars [*, 8] and sr_keys [*, 2] */                        \
  X(first_tile)        /* CUDA: tiles of the tensors before this one */                      \
  X(layout)            /* kLayout* bits below */                                             \
  X(unused)            /* pads the row to 128 bytes */

// The per-tensor counters a step writes, in order.
#define RLVR_COUNTERS(X)                                                                     \
  X(bf16_changed)      /* elements whose stored 16-bit bits (bf16 or float16) changed */     \
  X(fp32_moved)        /* elements whose fp32 value moved */                                 \
  X(nonfinite_grads)   /* non-finite gradient elements (after unscaling), trained ones */

namespace rlvr_optim {

#define RLVR_ROW_ENUM(name) kRow_##name,
enum RowField : int { RLVR_ROW_FIELDS(RLVR_ROW_ENUM) kRowInt64s };
#undef RLVR_ROW_ENUM

#define RLVR_ROW_NAME(name) #name,
constexpr const char* kRowFields[kRowInt64s] = {RLVR_ROW_FIELDS(RLVR_ROW_NAME)};
#undef RLVR_ROW_NAME

#define RLVR_COUNTER_ONE(name) +1
constexpr int kCounters = 0 RLVR_COUNTERS(RLVR_COUNTER_ONE);
#undef RLVR_COUNTER_ONE

#define RLVR_COUNTER_NAME(name) #name,
constexpr const char* kCounterNames[kCounters] = {RLVR_COUNTERS(RLVR_COUNTER_NAME)};
#undef RLVR_COUNTER_NAME

// Bits of the layout field: what a tensor is. The CPU step picks its loop by them; the
// CUDA and Triton kernels are compiled per layout and read the alignment bits only.
// rlvr_optim/table.py reads every `constexpr int64_t kLayout...` line (as LAYOUT_BITS,
// named in snake case: kLayoutParamBf16 is "param_bf16").
constexpr int64_t kLayoutParamBf16 = 1;
constexpr int64_t kLayoutGradBf16 = 2;
constexpr int64_t kLayoutStateBf16 = 4;  // exp_avg, exp_avg_sq and max_exp_avg_sq
constexpr int64_t kLayoutAmsgrad = 8;
constexpr int64_t kLayoutMasterFp32 = 16;
constexpr int64_t kLayoutRemainder = 32;
constexpr int64_t kLayoutStochastic = 64;
constexpr int64_t kLayoutTrack = 128;  // any of the change bitmap, cumulative bitmap, counters
constexpr int64_t kLayoutParamFp16 = 256;  // a float16 param (its change image: itself)
constexpr int64_t kLayoutImageFp16 = 512;  // an fp32 param whose change image is float16
constexpr int64_t kLayoutGradFp16 = 1024;  // a float16 grad (CPU: beside float16 params)
constexpr int kLayoutCodes = 2048;     // the codes of the bits above
// Every element array (param, grad, states, master / remainder) is 16-byte aligned.
constexpr int64_t kLayoutVectorAligned = 2048;
// The freeze mask and the change and cumulative bitmaps are 8-byte aligned.
constexpr int64_t kLayoutBitmapAligned = 4096;

}  // namespace rlvr_optim
