// The multi-tensor AdamW kernel: loads, calls adamw_element (adamw_element.cuh) for each
// element, stores, packs change bits and counts. One launch covers a group of tensors of
// one dtype layout, described by a table in device memory (adamw_launch.h).
//
// Work split. The group's tensors are cut into tiles of kTileElements (a tile never spans
// two tensors); block b of the grid takes a contiguous run of tiles, finds its first
// tensor by binary search over the rows' first_tile, then walks forward. The grid is as
// many blocks as fit on the device at once, so each block runs to the end of its run.
//
// Per tile, thread (warp w, lane l) owns 8 consecutive elements starting at
// w * 256 + 8 * l: one 16-byte load or store per bf16 array, two per fp32 array, and
// exactly one byte of the change bitmap. Four lanes' bytes are OR-ed into one 32-bit word
// by two xor-shuffles (the layout of a little-endian 32-bit ballot) and stored by the
// first lane of the four. Counts accumulate per thread and go to a per-tensor workspace
// with one warp reduction and one atomic per warp and tensor; the last block of the
// launch copies them to the counters (the reference overwrites them) and zeroes the
// workspace, so the launch needs no separate zeroing of the counters.
//
// Indices are int64 throughout: tensors may have more than 2**31 elements.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "adamw_element.cuh"
#include "adamw_launch.h"

namespace rlvr_optim {

constexpr int kMaxDevices = 64;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

template <StoreMode kStore, int kFlags>
struct Variant {
  static constexpr bool kParamBf16 = (kFlags & kFlagParamBf16) != 0;
  static constexpr bool kGradBf16 = (kFlags & kFlagGradBf16) != 0;
  static constexpr bool kStateBf16 = (kFlags & kFlagStateBf16) != 0;
  static constexpr bool kAmsgrad = (kFlags & kFlagAmsgrad) != 0;
  static constexpr bool kTrack = (kFlags & kFlagTrack) != 0;  // bitmaps or counters
  static constexpr MasterForm kMaster =
      (kStore == StoreMode::kMasterNearest || kStore == StoreMode::kMasterStochastic)
          ? MasterForm::kFp32
          : (kStore == StoreMode::kRemainder ? MasterForm::kRemainder : MasterForm::kNone);
  static constexpr bool kStochastic =
      kStore == StoreMode::kStochastic || kStore == StoreMode::kMasterStochastic;
  static constexpr bool kValid = kParamBf16 || kStore == StoreMode::kNearest;
};

// ---------------------------------------------------------------------------------------
// 8 consecutive elements as bit patterns: one 16-byte vector (2-byte types) or two (4-byte
// types) when `vector`, else element by element, the first n only.
// ---------------------------------------------------------------------------------------

template <bool kTwoBytes, bool kReadOnly = false>
__device__ __forceinline__ void load8(const void* base, int64_t first, bool vector, int n,
                                      uint32_t (&out)[8]) {
  if (kTwoBytes) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + first;
    if (vector) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
      const uint4 a = kReadOnly ? __ldg(q) : *q;
      const uint32_t words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = words[k] & 0xFFFFu;
        out[2 * k + 1] = words[k] >> 16;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = k < n ? (kReadOnly ? __ldg(p + k) : p[k]) : 0u;
    }
  } else {
    const uint32_t* p = static_cast<const uint32_t*>(base) + first;
    if (vector) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
      const uint4 a = kReadOnly ? __ldg(q) : q[0];
      const uint4 b = kReadOnly ? __ldg(q + 1) : q[1];
      out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
      out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = k < n ? (kReadOnly ? __ldg(p + k) : p[k]) : 0u;
    }
  }
}

// Stores all 8 when `vector` (elements not in `update` hold their loaded bits), else the
// elements in `update` only.
template <bool kTwoBytes>
__device__ __forceinline__ void store8(void* base, int64_t first, bool vector, uint32_t update,
                                       const uint32_t (&in)[8]) {
  if (kTwoBytes) {
    uint16_t* p = static_cast<uint16_t*>(base) + first;
    if (vector) {
      *reinterpret_cast<uint4*>(p) =
          make_uint4(in[0] | (in[1] << 16), in[2] | (in[3] << 16), in[4] | (in[5] << 16),
                     in[6] | (in[7] << 16));
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if ((update >> k) & 1u) p[k] = static_cast<uint16_t>(in[k]);
      }
    }
  } else {
    uint32_t* p = static_cast<uint32_t*>(base) + first;
    if (vector) {
      uint4* q = reinterpret_cast<uint4*>(p);
      q[0] = make_uint4(in[0], in[1], in[2], in[3]);
      q[1] = make_uint4(in[4], in[5], in[6], in[7]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if ((update >> k) & 1u) p[k] = in[k];
      }
    }
  }
}

// fp32 value of a stored fp32 or bf16 pattern, and the pattern that stores a value.
template <bool kBf16>
__device__ __forceinline__ float stored_value(uint32_t bits) {
  return kBf16 ? bf16_bits_to_fp32(bits) : fp32_from_bits(bits);
}

template <bool kBf16>
__device__ __forceinline__ uint32_t stored_bits(float x) {
  return kBf16 ? round_nearest_bf16(fp32_bits(x)) : fp32_bits(x);
}

// ---------------------------------------------------------------------------------------
// The tensor a block is working on, read from its table row.
// ---------------------------------------------------------------------------------------

struct TensorContext {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;
  const uint8_t* freeze_mask;
  uint8_t* change_bitmap;
  uint8_t* cumulative_bitmap;
  int64_t numel;
  int64_t element_offset;
  int64_t first_tile;
  int64_t end_tile;
  bool vector_aligned;
  bool bitmap_word_aligned;
  StepScalars scalars;
  uint32_t key_lo, key_hi;
};

__device__ __forceinline__ int64_t first_tile_of(const TensorRow* rows, int64_t t) {
  return __ldg(&rows[t].first_tile);
}

// Thread 0 reads row t into the block's shared TensorContext: shared memory rather than
// registers, which the 8 elements per thread need (48 words of data in the widest mode).
template <class V>
__device__ __forceinline__ void load_tensor(const LaunchArgs& a, int64_t t, TensorContext& c) {
  __syncthreads();  // no thread reads the previous tensor any more
  if (threadIdx.x == 0) {
    const TensorRow* row = a.rows + t;
    c.param = reinterpret_cast<void*>(__ldg(&row->param));
    c.grad = reinterpret_cast<const void*>(__ldg(&row->grad));
    c.exp_avg = reinterpret_cast<void*>(__ldg(&row->exp_avg));
    c.exp_avg_sq = reinterpret_cast<void*>(__ldg(&row->exp_avg_sq));
    c.max_exp_avg_sq = reinterpret_cast<void*>(__ldg(&row->max_exp_avg_sq));
    c.master = reinterpret_cast<void*>(__ldg(&row->master));
    c.freeze_mask = reinterpret_cast<const uint8_t*>(__ldg(&row->freeze_mask));
    c.change_bitmap = reinterpret_cast<uint8_t*>(__ldg(&row->change_bitmap));
    c.cumulative_bitmap = reinterpret_cast<uint8_t*>(__ldg(&row->cumulative_bitmap));
    c.numel = __ldg(&row->numel);
    c.element_offset = __ldg(&row->element_offset);
    c.first_tile = __ldg(&row->first_tile);
    c.end_tile = first_tile_of(a.rows, t + 1);
    const int64_t flags = __ldg(&row->flags);
    c.vector_aligned = (flags & kRowVectorAligned) != 0;
    c.bitmap_word_aligned = (flags & kRowBitmapWordAligned) != 0;
    const int64_t scalar_row = __ldg(&row->scalar_row);
    const float* s = a.scalars + 8 * scalar_row;
    c.scalars = StepScalars{__ldg(s), __ldg(s + 1), __ldg(s + 2), __ldg(s + 3),
                            __ldg(s + 4), __ldg(s + 5), __ldg(s + 6), __ldg(s + 7)};
    c.key_lo = V::kStochastic ? static_cast<uint32_t>(__ldg(a.sr_keys + 2 * scalar_row)) : 0u;
    c.key_hi = V::kStochastic ? static_cast<uint32_t>(__ldg(a.sr_keys + 2 * scalar_row + 1)) : 0u;
  }
  __syncthreads();
}

// The tensor of tile `tile`: the last row whose first_tile <= tile (which skips empty
// tensors, whose first_tile equals the next one's).
__device__ __forceinline__ int64_t find_tensor(const TensorRow* rows, int64_t num_tensors,
                                               int64_t tile) {
  int64_t lo = 0, hi = num_tensors;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first_tile_of(rows, mid) <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------

struct Counts {
  uint32_t changed, moved, nonfinite;  // this thread's, for the current tensor
};

// One warp reduction and one atomic per warp and count. All 32 lanes call it.
__device__ __forceinline__ void flush_counts(Counts& counts, unsigned long long* workspace) {
  const uint32_t sums[3] = {__reduce_add_sync(kFullWarp, counts.changed),
                            __reduce_add_sync(kFullWarp, counts.moved),
                            __reduce_add_sync(kFullWarp, counts.nonfinite)};
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      if (sums[i] != 0) atomicAdd(workspace + i, static_cast<unsigned long long>(sums[i]));
    }
  }
  counts = Counts{0, 0, 0};
}

// The last block to finish copies the workspace to the counters and zeroes it, and the
// ticket, for the next launch. Every block calls it.
__device__ __forceinline__ void publish_counters(const LaunchArgs& a) {
  __shared__ bool last_block;
  __threadfence();  // this thread's workspace atomics before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    last_block = atomicAdd(a.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int64_t i = threadIdx.x; i < 3 * a.num_tensors; i += blockDim.x) {
    const unsigned long long total = atomicExch(a.counter_workspace + i, 0ull);
    int64_t* counters = reinterpret_cast<int64_t*>(a.rows[i / 3].counters);
    if (counters != nullptr) counters[i % 3] = static_cast<int64_t>(total);
  }
  if (threadIdx.x == 0) atomicExch(a.ticket, 0u);
}

// ---------------------------------------------------------------------------------------
// One tile of one tensor. All threads of the block call it (the bitmap words need every
// lane of a warp).
// ---------------------------------------------------------------------------------------

template <class V>
__device__ __forceinline__ void process_tile(const TensorContext& c, int64_t local_tile,
                                             const GradOptions& options, bool skip,
                                             Counts& counts) {
  const int lane = threadIdx.x & 31;
  const int64_t first = local_tile * kTileElements + (threadIdx.x >> 5) * (32 * kElementsPerThread)
                        + lane * kElementsPerThread;
  const int64_t left = c.numel - first;
  const int n = left >= kElementsPerThread ? kElementsPerThread : (left > 0 ? static_cast<int>(left) : 0);
  const bool vector = n == kElementsPerThread && c.vector_aligned;

  // Every load first, so that they are all in flight together.
  uint32_t param[8], grad[8], exp_avg[8], exp_avg_sq[8], max_exp_avg_sq[8] = {}, master[8] = {};
  load8<V::kParamBf16>(c.param, first, vector, n, param);
  load8<V::kGradBf16, true>(c.grad, first, vector, n, grad);
  load8<V::kStateBf16>(c.exp_avg, first, vector, n, exp_avg);
  load8<V::kStateBf16>(c.exp_avg_sq, first, vector, n, exp_avg_sq);
  if (V::kAmsgrad) load8<V::kStateBf16>(c.max_exp_avg_sq, first, vector, n, max_exp_avg_sq);
  if (V::kMaster != MasterForm::kNone) {
    load8<V::kMaster == MasterForm::kRemainder>(c.master, first, vector, n, master);
  }
  uint32_t train = n == kElementsPerThread ? 0xFFu : (1u << n) - 1u;
  if (c.freeze_mask != nullptr && n > 0) train &= c.freeze_mask[first >> 3];

  uint32_t changed = 0, moved = 0, nonfinite = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    Element e;
    e.param = param[k];
    e.master = fp32_from_bits(master[k]);
    e.remainder = static_cast<int32_t>(static_cast<int16_t>(master[k]));
    e.exp_avg = stored_value<V::kStateBf16>(exp_avg[k]);
    e.exp_avg_sq = stored_value<V::kStateBf16>(exp_avg_sq[k]);
    e.max_exp_avg_sq = V::kAmsgrad ? stored_value<V::kStateBf16>(max_exp_avg_sq[k]) : 0.0f;
    const bool train_k = (train >> k) & 1u;
    const ElementFlags f =
        adamw_element<V::kParamBf16, V::kMaster, V::kStochastic, V::kAmsgrad>(
            e, stored_value<V::kGradBf16>(grad[k]), c.scalars, options, train_k, skip,
            c.key_lo, c.key_hi, static_cast<uint64_t>(c.element_offset + first + k));
    if (train_k && !skip) {
      param[k] = e.param;
      if (V::kMaster == MasterForm::kFp32) master[k] = fp32_bits(e.master);
      if (V::kMaster == MasterForm::kRemainder) master[k] = static_cast<uint32_t>(e.remainder) & 0xFFFFu;
      exp_avg[k] = stored_bits<V::kStateBf16>(e.exp_avg);
      exp_avg_sq[k] = stored_bits<V::kStateBf16>(e.exp_avg_sq);
      if (V::kAmsgrad) max_exp_avg_sq[k] = stored_bits<V::kStateBf16>(e.max_exp_avg_sq);
    }
    changed |= static_cast<uint32_t>(f.changed) << k;
    moved |= static_cast<uint32_t>(f.moved) << k;
    nonfinite |= static_cast<uint32_t>(f.nonfinite) << k;
  }

  const uint32_t update = skip ? 0u : train;
  if (update != 0) {
    store8<V::kParamBf16>(c.param, first, vector, update, param);
    store8<V::kStateBf16>(c.exp_avg, first, vector, update, exp_avg);
    store8<V::kStateBf16>(c.exp_avg_sq, first, vector, update, exp_avg_sq);
    if (V::kAmsgrad) store8<V::kStateBf16>(c.max_exp_avg_sq, first, vector, update, max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) {
      store8<V::kMaster == MasterForm::kRemainder>(c.master, first, vector, update, master);
    }
  }

  if (V::kTrack) {
    counts.changed += __popc(changed);
    counts.moved += __popc(moved);
    counts.nonfinite += __popc(nonfinite);
    if (c.change_bitmap != nullptr || c.cumulative_bitmap != nullptr) {
      // This lane's byte at its place in the word of lanes 4q .. 4q + 3.
      uint32_t word = changed << (8 * (lane & 3));
      word |= __shfl_xor_sync(kFullWarp, word, 1);
      word |= __shfl_xor_sync(kFullWarp, word, 2);
      const int64_t byte = first >> 3;
      const int64_t word_byte = byte & ~int64_t{3};
      const int64_t bitmap_bytes = (c.numel + 7) >> 3;
      if (c.bitmap_word_aligned && word_byte + 4 <= bitmap_bytes) {
        if ((lane & 3) == 0) {
          if (c.change_bitmap != nullptr) {
            *reinterpret_cast<uint32_t*>(c.change_bitmap + word_byte) = word;
          }
          if (c.cumulative_bitmap != nullptr && word != 0) {
            uint32_t* cumulative = reinterpret_cast<uint32_t*>(c.cumulative_bitmap + word_byte);
            *cumulative |= word;
          }
        }
      } else if (n > 0) {
        if (c.change_bitmap != nullptr) c.change_bitmap[byte] = static_cast<uint8_t>(changed);
        if (c.cumulative_bitmap != nullptr && changed != 0) {
          c.cumulative_bitmap[byte] |= static_cast<uint8_t>(changed);
        }
      }
    }
  }
}

template <class V>
__global__ void __launch_bounds__(kThreads, 2) adamw_kernel(const LaunchArgs a) {
  // This block's run of tiles.
  const int64_t blocks = gridDim.x, b = blockIdx.x;
  const int64_t per_block = a.total_tiles / blocks, extra = a.total_tiles % blocks;
  int64_t tile = b * per_block + (b < extra ? b : extra);
  const int64_t end = tile + per_block + (b < extra ? 1 : 0);

  GradOptions options{1.0f, a.grad_scale != nullptr, a.maximize};
  if (a.grad_scale != nullptr) options.grad_scale = *a.grad_scale;
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  const bool count = V::kTrack && a.counter_workspace != nullptr;

  __shared__ TensorContext c;
  Counts counts{0, 0, 0};
  if (tile < end) {  // the same for the whole block
    int64_t t = find_tensor(a.rows, a.num_tensors, tile);
    load_tensor<V>(a, t, c);
    for (; tile < end; ++tile) {
      if (tile >= c.end_tile) {  // the same for the whole block
        if (count) flush_counts(counts, a.counter_workspace + 3 * t);
        do {
          ++t;
        } while (tile >= first_tile_of(a.rows, t + 1));
        load_tensor<V>(a, t, c);
      }
      process_tile<V>(c, tile - c.first_tile, options, skip, counts);
    }
    if (count) flush_counts(counts, a.counter_workspace + 3 * t);
  }
  if (count) publish_counters(a);
}

// ---------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("rlvr_optim._C: ") + what + ": " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

// As many blocks as are resident on the device at once (cached per device), at least one
// (the last block publishes the counters), at most one per tile.
template <class V>
void launch(const LaunchArgs& a, int device, void* stream) {
  static std::atomic<int> resident_blocks[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) throw std::runtime_error("rlvr_optim._C: bad device index");
  int blocks = resident_blocks[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int sms = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "reading the multiprocessor count");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_kernel<V>, kThreads, 0),
               "reading the kernel's occupancy");
    blocks = sms * (per_sm > 0 ? per_sm : 1);
    resident_blocks[device].store(blocks, std::memory_order_relaxed);
  }
  int64_t grid = a.total_tiles < 1 ? 1 : a.total_tiles;
  if (grid > blocks) grid = blocks;
  adamw_kernel<V><<<static_cast<unsigned>(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_cuda(cudaGetLastError(), "launching the AdamW kernel");
}

// The launchers of one store mode, indexed by flag combination (null where invalid).
template <StoreMode kStore, int kFlags>
constexpr LaunchFn launcher_entry() {
  if constexpr (Variant<kStore, kFlags>::kValid) {
    return &launch<Variant<kStore, kFlags>>;
  } else {
    return nullptr;
  }
}

template <StoreMode kStore, int kParamBf16Flag, int... kRest>
LaunchFn pick_launcher(int flags, std::integer_sequence<int, kRest...>) {
  // Entries for the 16 combinations of the other four flags, this param dtype only.
  static constexpr LaunchFn table[] = {launcher_entry<kStore, (kRest << 1) | kParamBf16Flag>()...};
  if (flags < 0 || flags >= kFlagCombinations || (flags & kFlagParamBf16) != kParamBf16Flag) {
    return nullptr;
  }
  return table[flags >> 1];
}

#define RLVR_OPTIM_DEFINE_LAUNCHER(name, store, param_bf16_flag)                           \
  LaunchFn name(int flags) {                                                               \
    return pick_launcher<store, param_bf16_flag>(                                          \
        flags, std::make_integer_sequence<int, kFlagCombinations / 2>{});                  \
  }

}  // namespace rlvr_optim
