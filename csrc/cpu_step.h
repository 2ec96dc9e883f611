// What rlvr_optim/cpu_backend.py and the CPU step (cpu_step.cpp) agree on: the step's
// arguments. No code here.
//
// The table is a host int64 array of num_tensors rows of step_table.h (the row every fused
// backend reads), built by cpu_backend.py and cached between steps.
#pragma once

#include <cstdint>

#include "step_table.h"

namespace rlvr_optim {
namespace cpu {

struct CpuStep {
  const int64_t* rows;      // num_tensors x kRowInt64s (step_table.h)
  int64_t num_tensors;
  const float* scalars;     // [*, 8], reference.SCALAR_COLUMNS
  const int64_t* sr_keys;   // [*, 2] (key_lo, key_hi); null unless a row is stochastic
  const float* grad_scale;  // one value, or null
  const float* found_inf;   // one value, nonzero skips the step; or null
  bool maximize;
  bool l2_decay;            // torch's Adam weight decay (an L2 term), else AdamW's
  int threads;              // OpenMP threads
};

// One step of every row; false (before touching memory) if a row's layout has no loop.
// One definition per instruction set that cpu_step.cpp is compiled for.
bool step_generic(const CpuStep& step);
bool step_avx2(const CpuStep& step);

// The loop that steps the whole 8-element groups of a layout (its code, step_table.h):
// "step_span" (the spec loop), "vector_span", "fast_span, vector_span" (the default
// layouts' loop, the other where it does not apply) or "none"; for the tests.
const char* loop_of_generic(int64_t layout);
const char* loop_of_avx2(int64_t layout);

// The float16 conversions of the loops of one instruction set, for the tests: the fp32
// patterns first .. first + count - 1 (mod 2**32) rounded to float16 patterns into out,
// to nearest even, or stochastically with random16[k] for pattern k when random16 is not
// null; and the fp32 values of count float16 patterns.
void fp16_round_generic(uint16_t* out, uint64_t first, int64_t count, const uint16_t* random16);
void fp16_round_avx2(uint16_t* out, uint64_t first, int64_t count, const uint16_t* random16);
void fp16_values_generic(const uint16_t* in, float* out, int64_t count);
void fp16_values_avx2(const uint16_t* in, float* out, int64_t count);

}  // namespace cpu
}  // namespace rlvr_optim
