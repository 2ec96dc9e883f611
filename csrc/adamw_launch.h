// What the host and the kernel agree on: the device-side table of tensors, the launch
// arguments, the kernel variants, and the launchers. No device code here.
//
// The table is one int64 device buffer that rlvr_optim/cuda_backend.py builds (and caches
// between steps) for a group of tensors of one dtype layout:
//
//   rows        (num_tensors + 1) x kRowInt64s: one row of step_table.h per tensor, then a
//               sentinel row whose first_tile is the group's tile count
//   workspace   kCounters x num_tensors: counter sums; zero between launches (the last block
//               of a launch copies them to the counters and zeroes them again)
//   ticket      1: blocks that finished; zero between launches
//   tile tensor ceil(total_tiles / 2): int32 per tile, the row of the tensor that tile
//               belongs to (a block reads its first tensor there; no search)
//
// so a launch needs no kernel-argument space per tensor and no host value of step or lr
// (those live in the scalars rows on the device): it can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "step_table.h"

namespace rlvr_optim {

// Elements per tile: a tile belongs to one tensor; 256 threads take 8 consecutive elements
// each (one 16-byte vector of a bf16 tensor, two of an fp32 tensor, one bitmap byte).
constexpr int kThreads = 256;
constexpr int kElementsPerThread = 8;
constexpr int64_t kTileElements = int64_t{kThreads} * kElementsPerThread;

// One tensor: the row of step_table.h as a struct, one int64 member per field, in order.
struct TensorRow {
#define RLVR_ROW_MEMBER(name) int64_t name;
  RLVR_ROW_FIELDS(RLVR_ROW_MEMBER)
#undef RLVR_ROW_MEMBER
};
static_assert(sizeof(TensorRow) == kRowInt64s * sizeof(int64_t), "TensorRow is the table's row");
static_assert(sizeof(TensorRow) == 128, "a row is one 128-byte line");

// Where the sections start, in int64s from the table's base.
constexpr int64_t workspace_offset(int64_t num_tensors) {
  return (num_tensors + 1) * kRowInt64s;
}
constexpr int64_t ticket_offset(int64_t num_tensors) {
  return workspace_offset(num_tensors) + kCounters * num_tensors;
}
constexpr int64_t tile_tensor_offset(int64_t num_tensors) {
  return ticket_offset(num_tensors) + 1;
}

constexpr int64_t table_int64s(int64_t num_tensors, int64_t total_tiles) {
  return tile_tensor_offset(num_tensors) + (total_tiles + 1) / 2;
}

struct LaunchArgs {
  const TensorRow* rows;                  // num_tensors + 1
  const int32_t* tile_tensor;             // total_tiles: the row of each tile's tensor
  int64_t num_tensors;
  int64_t total_tiles;                    // below 2**32
  uint32_t tiles_per_block, extra_tiles;  // set by launch(): the grid's split of the tiles
  unsigned long long* counter_workspace;  // null when no tensor has counters
  unsigned int* ticket;
  const float* scalars;                   // fp32 [*, 8], reference.step_scalars
  const int64_t* sr_keys;                 // int64 [*, 2] (key_lo, key_hi); stochastic only
  const float* grad_scale;                // one fp32, or null
  const float* found_inf;                 // one fp32, nonzero skips the step; or null
  bool maximize;
};

// How the param is stored (the master form and the rounding of the 16-bit param).
enum class StoreMode : int {
  kNearest = 0,           // 16-bit or fp32 param, no master
  kStochastic = 1,        // 16-bit param, no master
  kMasterNearest = 2,     // 16-bit param from an fp32 master
  kMasterStochastic = 3,
  kRemainder = 4,         // bf16 param + int16 remainder
};
constexpr int kStoreModes = 5;

// The variant's 16-bit format (adamw_element.cuh's Half): that of a 16-bit param and grad,
// and of an fp32 param's change image. States are fp32 or bf16 in both.
constexpr int kHalfBf16 = 0, kHalfFp16 = 1, kHalfFormats = 2;

// A kernel variant: 16-bit format x store mode x 7 flag bits. kFlagParam16 / kFlagGrad16:
// the param / grad is in the variant's 16-bit format (else fp32). Every variant with an
// fp32 param and a store mode other than kNearest is absent (the reference has no such
// mode), and so is the remainder form in float16. kFlagL2Decay: torch's Adam weight decay
// (an L2 term in the gradient), else AdamW's.
constexpr int kFlagParam16 = 1, kFlagGrad16 = 2, kFlagStateBf16 = 4, kFlagAmsgrad = 8,
              kFlagTrack = 16, kFlagGradScale = 32, kFlagL2Decay = 64;
constexpr int kFlagCombinations = 128;

constexpr int variant_code(int half, StoreMode store, int flags) {
  return (half * kStoreModes + static_cast<int>(store)) * kFlagCombinations + flags;
}

using LaunchFn = void (*)(const LaunchArgs& args, int device, void* stream);

// One function per compilation unit (adamw_<unit>.cu): the launcher of a flag combination,
// or null.
LaunchFn launcher_fp32_param(int flags);
LaunchFn launcher_bf16_nearest(int flags);
LaunchFn launcher_bf16_stochastic(int flags);
LaunchFn launcher_master_nearest(int flags);
LaunchFn launcher_master_stochastic(int flags);
LaunchFn launcher_remainder(int flags);
LaunchFn launcher_fp32_param_fp16_image(int flags);
LaunchFn launcher_fp16_nearest(int flags);
LaunchFn launcher_fp16_stochastic(int flags);
LaunchFn launcher_fp16_master_nearest(int flags);
LaunchFn launcher_fp16_master_stochastic(int flags);

}  // namespace rlvr_optim
