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

}  // namespace cpu
}  // namespace rlvr_optim
