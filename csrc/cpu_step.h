// What rlvr_optim/cpu_backend.py and the CPU step (cpu_step.cpp) agree on: the int64 table
// of tensors, the layout bits of a row, and the step's arguments. No code here.
//
// The table is a host int64 array of num_tensors rows of kCpuRowInt64s fields, built by
// cpu_backend.py and cached between steps (only the grad column changes).
#pragma once

#include <cstdint>

namespace rlvr_optim {
namespace cpu {

// Field order of a row = kCpuRowFields. Addresses are host pointers, 0 when absent.
enum CpuRowField : int {
  kParam,             // fp32 or bf16
  kGrad,              // fp32 or bf16
  kExpAvg,            // fp32 or bf16, as exp_avg_sq and max_exp_avg_sq
  kExpAvgSq,
  kMaxExpAvgSq,       // amsgrad only
  kMaster,            // fp32 master, or int16 remainder
  kFreezeMask,        // packed bits, 1 = trained; 0: every element trained
  kChangeBitmap,      // packed bits
  kCumulativeBitmap,  // packed bits, OR-ed
  kCounters,          // int64 [3]: bf16 changed, fp32 moved, non-finite grads
  kNumel,
  kElementOffset,     // global index of element 0 (stochastic rounding stream)
  kScalarRow,         // row of scalars [*, 8] and sr_keys [*, 2]
  kLayout,            // kLayout* bits below
  kCpuRowInt64s,
};
constexpr const char* kCpuRowFields[kCpuRowInt64s] = {
    "param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "freeze_mask",
    "change_bitmap", "cumulative_bitmap", "counters", "numel", "element_offset",
    "scalar_row", "layout"};

// What a row's loop is compiled for. A layout with both master bits, a master or a
// stochastic store on an fp32 param, or a stochastic remainder has no loop.
constexpr int64_t kLayoutParamBf16 = 1;
constexpr int64_t kLayoutGradBf16 = 2;
constexpr int64_t kLayoutStateBf16 = 4;  // exp_avg, exp_avg_sq and max_exp_avg_sq
constexpr int64_t kLayoutAmsgrad = 8;
constexpr int64_t kLayoutMasterFp32 = 16;
constexpr int64_t kLayoutRemainder = 32;
constexpr int64_t kLayoutStochastic = 64;
constexpr int64_t kLayoutTrack = 128;  // any of the change bitmap, cumulative bitmap, counters
constexpr int kLayoutCount = 256;

struct CpuStep {
  const int64_t* rows;      // num_tensors x kCpuRowInt64s
  int64_t num_tensors;
  const float* scalars;     // [*, 8], reference.SCALAR_COLUMNS
  const int64_t* sr_keys;   // [*, 2] (key_lo, key_hi); null unless a row is stochastic
  const float* grad_scale;  // one value, or null
  const float* found_inf;   // one value, nonzero skips the step; or null
  bool maximize;
  int threads;              // OpenMP threads
};

// One step of every row; false (before touching memory) if a row's layout has no loop.
// One definition per instruction set that cpu_step.cpp is compiled for.
bool step_generic(const CpuStep& step);
bool step_avx2(const CpuStep& step);

}  // namespace cpu
}  // namespace rlvr_optim
