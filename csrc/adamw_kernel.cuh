// The multi-tensor AdamW kernel: loads, calls adamw_element_drawn (adamw_element.cuh) for
// each element, stores, packs change bits and counts. One launch covers a group of tensors
// of one dtype layout, described by a table in device memory (adamw_launch.h).
//
// Work split. The group's tensors are cut into tiles of kTileElements (a tile never spans
// two tensors); block b of the grid takes a contiguous run of tiles, reads its first
// tensor from the table's tile -> tensor section (one load, where a binary search over the
// rows' first_tile took a dependent load per halving), then walks forward over the rows'
// first_tile (past empty tensors), holding the current tensor's row in registers. (The
// next tensor read from the section instead spilled at the 128-register cap.) The grid is
// as many blocks as fit on the device at once, so each block runs to the end of its run.
//
// Per tile, thread i owns the 8 consecutive elements starting at 8 * i: one 16-byte load
// or store per bf16 array, two per fp32 array, and exactly one byte of the change bitmap.
// A tensor's full tiles take the vector path when its arrays are 16-byte aligned, its
// bitmaps 8-byte aligned and (stochastic rounding) its element offset a multiple of 8, so
// that a thread's 8 elements share one Philox call; its last, partial tile and every tile
// of a tensor that is not so aligned take the element-wise path. The vector path is
// software pipelined in registers: a thread issues the next tile's loads before this
// tile's math, so that its loads are in flight while it computes (every variant; with the
// second set of buffers none spills: bench/static_report.py --all-variants). On the
// vector path the bytes of 8 lanes are
// gathered by three xor-shuffles into the 64-bit word a little-endian ballot would give,
// stored by the first lane of the eight. Counts accumulate per thread over a tensor and go
// to a per-tensor workspace with one warp reduction and one atomic per warp and tensor;
// the last block of the launch copies them to the counters (the reference overwrites
// them) and zeroes the workspace, so the launch needs no separate zeroing of the counters.
//
// Mode flags are template parameters (Variant); found_inf selects, once per launch, an
// instantiation in which every store is dead; maximize flips the gradient's sign bits
// (exact: IEEE division and the later operations are symmetric in the sign, and computed
// NaNs are canonical).
//
// Element indices are int64: tensors may have more than 2**31 elements. Tile indices within
// a launch are 32-bit (Tile), which keeps the loop bounds in single registers.
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

template <int kHalfFormat, StoreMode kStore, int kFlags>
struct Variant {
  static constexpr Half kHalf = kHalfFormat == kHalfFp16 ? Half::kFp16 : Half::kBf16;
  static constexpr bool kParam16 = (kFlags & kFlagParam16) != 0;  // in kHalf, else fp32
  static constexpr bool kGrad16 = (kFlags & kFlagGrad16) != 0;    // in kHalf, else fp32
  static constexpr bool kStateBf16 = (kFlags & kFlagStateBf16) != 0;
  static constexpr bool kAmsgrad = (kFlags & kFlagAmsgrad) != 0;
  static constexpr bool kTrack = (kFlags & kFlagTrack) != 0;  // bitmaps or counters
  static constexpr bool kGradScale = (kFlags & kFlagGradScale) != 0;
  static constexpr bool kL2Decay = (kFlags & kFlagL2Decay) != 0;
  static constexpr MasterForm kMaster =
      (kStore == StoreMode::kMasterNearest || kStore == StoreMode::kMasterStochastic)
          ? MasterForm::kFp32
          : (kStore == StoreMode::kRemainder ? MasterForm::kRemainder : MasterForm::kNone);
  static constexpr bool kStochastic =
      kStore == StoreMode::kStochastic || kStore == StoreMode::kMasterStochastic;
  static constexpr bool kValid = (kParam16 || kStore == StoreMode::kNearest) &&
                                 (kHalf == Half::kBf16 || kStore != StoreMode::kRemainder);
  // Resident blocks per SM that __launch_bounds__ asks for: 2 (at most 128 registers) where
  // the element loop fits them; amsgrad and master forms carry 8 more words per element
  // and spilled at 128 (ptxas, sm_90), so they get one 256-thread block and up to 255.
  static constexpr int kMinBlocks = (kAmsgrad || kMaster != MasterForm::kNone) ? 1 : 2;
};

// ---------------------------------------------------------------------------------------
// 8 consecutive elements as bit patterns (bf16 patterns in the low half of each word).
// The vector forms are ld/st.global.cs.v4 (streaming: each byte is touched once per step).
// ---------------------------------------------------------------------------------------

// One thread's 8 elements as 16-byte vectors: one of a 2-byte array, two of a 4-byte one.
template <int kVectors>
__device__ __forceinline__ void load_vectors(const void* base, int64_t first,
                                             uint4 (&out)[kVectors]) {
  const uint4* q = reinterpret_cast<const uint4*>(static_cast<const char*>(base) +
                                                  first * (kVectors == 1 ? 2 : 4));
#pragma unroll
  for (int k = 0; k < kVectors; ++k) out[k] = __ldcs(q + k);
}

// 8 bit patterns from loaded vectors (bf16 patterns in the low half of each word), `flip`
// XOR-ed into every word (the gradient's sign bits under maximize).
template <int kVectors>
__device__ __forceinline__ void unpack8(const uint4 (&in)[kVectors], uint32_t (&out)[8],
                                        uint32_t flip = 0) {
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {
    const uint32_t words[4] = {in[v].x ^ flip, in[v].y ^ flip, in[v].z ^ flip, in[v].w ^ flip};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (kVectors == 1) {
        out[2 * k] = words[k] & 0xFFFFu;
        out[2 * k + 1] = words[k] >> 16;
      } else {
        out[4 * v + k] = words[k];
      }
    }
  }
}

template <bool kTwoBytes>
__device__ __forceinline__ void store8_vector(void* base, int64_t first, const uint32_t (&in)[8]) {
  if (kTwoBytes) {
    __stcs(reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + first),
           make_uint4(in[0] | (in[1] << 16), in[2] | (in[3] << 16), in[4] | (in[5] << 16),
                      in[6] | (in[7] << 16)));
  } else {
    uint4* q = reinterpret_cast<uint4*>(static_cast<uint32_t*>(base) + first);
    __stcs(q, make_uint4(in[0], in[1], in[2], in[3]));
    __stcs(q + 1, make_uint4(in[4], in[5], in[6], in[7]));
  }
}

// The first n of 8 elements (the others read as 0), and the elements in `update` only.
template <bool kTwoBytes>
__device__ __forceinline__ void load8_elements(const void* base, int64_t first, int n,
                                               uint32_t (&out)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (kTwoBytes) {
      out[k] = k < n ? static_cast<const uint16_t*>(base)[first + k] : 0u;
    } else {
      out[k] = k < n ? static_cast<const uint32_t*>(base)[first + k] : 0u;
    }
  }
}

template <bool kTwoBytes>
__device__ __forceinline__ void store8_elements(void* base, int64_t first, uint32_t update,
                                                const uint32_t (&in)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if ((update >> k) & 1u) {
      if (kTwoBytes) {
        static_cast<uint16_t*>(base)[first + k] = static_cast<uint16_t>(in[k]);
      } else {
        static_cast<uint32_t*>(base)[first + k] = in[k];
      }
    }
  }
}

// fp32 value of a stored fp32 or bf16 pattern, and the pattern that stores a computed value.
template <bool kBf16>
__device__ __forceinline__ float stored_value(uint32_t bits) {
  return kBf16 ? bf16_bits_to_fp32(bits) : fp32_from_bits(bits);
}

// fp32 value of a gradient pattern: fp32, or 16-bit in the variant's format. A float16
// gradient goes through the hardware conversion (exact; which NaN it gives does not
// matter: a NaN gradient reaches only outputs the spec makes canonical, and its count).
template <class V>
__device__ __forceinline__ float grad_value(uint32_t bits) {
  if (!V::kGrad16) return fp32_from_bits(bits);
  if (V::kHalf == Half::kBf16) return bf16_bits_to_fp32(bits);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

template <bool kBf16>
__device__ __forceinline__ uint32_t stored_bits(float x) {
  return kBf16 ? round_nearest_bf16_computed(x) : fp32_bits(x);
}

// ---------------------------------------------------------------------------------------
// The tensor a block is working on, read from its table row into registers.
// ---------------------------------------------------------------------------------------

// A tile index within a launch (the host refuses a launch of 2**32 tiles, 2**43 elements).
using Tile = uint32_t;

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
  Tile first_tile;
  Tile end_tile;
  Tile full_tiles;  // tiles that take the vector path
  StepScalars scalars;
  uint32_t key_lo, key_hi;
};

__device__ __forceinline__ Tile first_tile_of(const TensorRow* rows, int64_t t) {
  return static_cast<Tile>(__ldg(&rows[t].first_tile));
}

// Every thread reads the row (one address per warp: a broadcast); only the fields the
// variant uses stay live.
template <class V>
__device__ __forceinline__ TensorContext load_tensor(const LaunchArgs& a, int64_t t) {
  const TensorRow* row = a.rows + t;
  TensorContext c;
  c.param = reinterpret_cast<void*>(__ldg(&row->param));
  c.grad = reinterpret_cast<const void*>(__ldg(&row->grad));
  c.exp_avg = reinterpret_cast<void*>(__ldg(&row->exp_avg));
  c.exp_avg_sq = reinterpret_cast<void*>(__ldg(&row->exp_avg_sq));
  c.max_exp_avg_sq = V::kAmsgrad ? reinterpret_cast<void*>(__ldg(&row->max_exp_avg_sq)) : nullptr;
  c.master = V::kMaster != MasterForm::kNone ? reinterpret_cast<void*>(__ldg(&row->master)) : nullptr;
  c.freeze_mask = reinterpret_cast<const uint8_t*>(__ldg(&row->freeze_mask));
  c.change_bitmap = V::kTrack ? reinterpret_cast<uint8_t*>(__ldg(&row->change_bitmap)) : nullptr;
  c.cumulative_bitmap =
      V::kTrack ? reinterpret_cast<uint8_t*>(__ldg(&row->cumulative_bitmap)) : nullptr;
  c.numel = __ldg(&row->numel);
  c.element_offset = __ldg(&row->element_offset);
  c.first_tile = first_tile_of(a.rows, t);
  c.end_tile = first_tile_of(a.rows, t + 1);
  const int64_t layout = __ldg(&row->layout);
  const bool vector = (layout & kLayoutVectorAligned) != 0 && (layout & kLayoutBitmapAligned) != 0 &&
                      (!V::kStochastic || (c.element_offset & 7) == 0);
  c.full_tiles = vector ? static_cast<Tile>(c.numel / kTileElements) : 0u;
  const int64_t scalar_row = __ldg(&row->scalar_row);
  const float* s = a.scalars + 8 * scalar_row;
  c.scalars = StepScalars{__ldg(s), __ldg(s + 1), __ldg(s + 2), __ldg(s + 3),
                          __ldg(s + 4), __ldg(s + 5), __ldg(s + 6), __ldg(s + 7)};
  c.key_lo = V::kStochastic ? static_cast<uint32_t>(__ldg(a.sr_keys + 2 * scalar_row)) : 0u;
  c.key_hi = V::kStochastic ? static_cast<uint32_t>(__ldg(a.sr_keys + 2 * scalar_row + 1)) : 0u;
  return c;
}

// ---------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------

struct Counts {
  uint32_t changed, moved, nonfinite;  // this thread's, for the current tensor
};
static_assert(kCounters == 3, "Counts holds the counters of step_table.h, in their order");

// One warp reduction and one atomic per warp and count. All 32 lanes call it.
__device__ __forceinline__ void flush_counts(Counts& counts, unsigned long long* workspace) {
  const uint32_t sums[kCounters] = {__reduce_add_sync(kFullWarp, counts.changed),
                            __reduce_add_sync(kFullWarp, counts.moved),
                            __reduce_add_sync(kFullWarp, counts.nonfinite)};
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int i = 0; i < kCounters; ++i) {
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
  // kPublishBatch entries a thread at a time, their atomics and row loads all issued
  // before the first store: one entry at a time, each waited out two global round trips,
  // which with thousands of tensors (3 entries each) was tens of microseconds in this one
  // block at the end of the launch.
  constexpr int kPublishBatch = 8;
  const int64_t entries = kCounters * a.num_tensors;
  for (int64_t base = 0; base < entries; base += int64_t{kPublishBatch} * blockDim.x) {
    unsigned long long total[kPublishBatch];
    int64_t* counters[kPublishBatch];
#pragma unroll
    for (int k = 0; k < kPublishBatch; ++k) {
      const int64_t i = base + int64_t{k} * blockDim.x + threadIdx.x;
      total[k] = i < entries ? atomicExch(a.counter_workspace + i, 0ull) : 0ull;
      counters[k] = i < entries ? reinterpret_cast<int64_t*>(a.rows[i / kCounters].counters) : nullptr;
    }
#pragma unroll
    for (int k = 0; k < kPublishBatch; ++k) {
      const int64_t i = base + int64_t{k} * blockDim.x + threadIdx.x;
      if (counters[k] != nullptr) counters[k][i % kCounters] = static_cast<int64_t>(total[k]);
    }
  }
  if (threadIdx.x == 0) atomicExch(a.ticket, 0u);
}

// ---------------------------------------------------------------------------------------
// One thread's 8 elements.
// ---------------------------------------------------------------------------------------

// What the thread's 8 elements hold, as loaded (bit patterns).
struct Elements8 {
  uint32_t param[8], grad[8], exp_avg[8], exp_avg_sq[8], max_exp_avg_sq[8], master[8];
};

// Steps element k of the 8: its param and master patterns in place, its states into m, v
// and vmax (the stored values kept where it is not in `train`, or under kSkip); returns
// its flags. random16(k) gives its stochastic-rounding bits.
template <class V, bool kSkip, class Random>
__device__ __forceinline__ ElementFlags step1(const TensorContext& c, Elements8& x, int k,
                                              uint32_t train, const GradOptions& options,
                                              const Random& random16, float& m, float& v,
                                              float& vmax) {
  Element e;
  e.param = x.param[k];
  e.master = fp32_from_bits(x.master[k]);
  e.remainder = static_cast<int32_t>(static_cast<int16_t>(x.master[k]));
  e.exp_avg = stored_value<V::kStateBf16>(x.exp_avg[k]);
  e.exp_avg_sq = stored_value<V::kStateBf16>(x.exp_avg_sq[k]);
  e.max_exp_avg_sq = V::kAmsgrad ? stored_value<V::kStateBf16>(x.max_exp_avg_sq[k]) : 0.0f;
  const ElementFlags f =
      adamw_element_drawn<V::kParam16, V::kMaster, V::kStochastic, V::kAmsgrad, V::kHalf>(
          e, grad_value<V>(x.grad[k]), c.scalars, options, (train >> k) & 1u,
          kSkip, V::kStochastic ? random16(k) : 0u);
  // e holds its old fields where it was not updated.
  x.param[k] = e.param;
  if (V::kMaster == MasterForm::kFp32) x.master[k] = fp32_bits(e.master);
  if (V::kMaster == MasterForm::kRemainder) x.master[k] = static_cast<uint32_t>(e.remainder) & 0xFFFFu;
  m = e.exp_avg;
  v = e.exp_avg_sq;
  vmax = e.max_exp_avg_sq;
  return f;
}

// Element k's flags: its change bit into `changed` (the bitmap's byte), its move and
// non-finite flags straight into the thread's counts (a predicated add each, where a bit
// of a mask cost a select and a bit insert per element and a popcount per 8).
__device__ __forceinline__ void add_flags(const ElementFlags& f, int k, uint32_t& changed,
                                          Counts& counts) {
  changed |= static_cast<uint32_t>(f.changed) << k;
  counts.moved += f.moved ? 1u : 0u;
  counts.nonfinite += f.nonfinite ? 1u : 0u;
}

// Patterns of elements 2j and 2j + 1 of one state array after the step, for its vector
// store: bf16 by a hardware pair (cvt.rn.bf16x2), where an element that was not updated
// gets its loaded bits back (a kept bf16 NaN keeps its payload, which the conversion would
// not).
template <bool kBf16>
__device__ __forceinline__ void state_pair(float lo, float hi, int j, uint32_t update,
                                           uint32_t (&bits)[8]) {
  if (kBf16) {
    const uint32_t pair = round_nearest_bf16x2_computed(lo, hi);
    bits[2 * j] = (update >> (2 * j)) & 1u ? pair & 0xFFFFu : bits[2 * j];
    bits[2 * j + 1] = (update >> (2 * j + 1)) & 1u ? pair >> 16 : bits[2 * j + 1];
  } else {
    bits[2 * j] = fp32_bits(lo);
    bits[2 * j + 1] = fp32_bits(hi);
  }
}

// The sign bits of the gradient words that maximize flips (16-bit grads: two per word).
template <class V>
__device__ __forceinline__ uint32_t grad_sign_flip(bool maximize) {
  return maximize ? (V::kGrad16 ? 0x80008000u : 0x80000000u) : 0u;
}

// The 8 elements of the vector path, two at a time: each pair's states go to their stored
// patterns (state_pair) as soon as they are computed, so that at most two elements' fp32
// states are live. (Patterns made after all 8 elements held 16 or 24 fp32 states at once;
// at the 128-register cap ptxas recomputed m and v from their inputs instead and parked
// NaN predicates in registers for the later conversion: bench/static_report.py counted
// 3 to 5 instructions per element more, sm_90.) Returns the change bits; the move and
// non-finite flags go to `counts`.
template <class V, bool kSkip, class Random>
__device__ __forceinline__ uint32_t vector_math(const TensorContext& c, Elements8& x,
                                                uint32_t train, const GradOptions& options,
                                                Counts& counts, const Random& random16) {
  uint32_t changed = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float m[2], v[2], vmax[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const ElementFlags f =
          step1<V, kSkip>(c, x, 2 * j + h, train, options, random16, m[h], v[h], vmax[h]);
      if (V::kTrack) add_flags(f, 2 * j + h, changed, counts);
    }
    if (!kSkip) {
      state_pair<V::kStateBf16>(m[0], m[1], j, train, x.exp_avg);
      state_pair<V::kStateBf16>(v[0], v[1], j, train, x.exp_avg_sq);
      if (V::kAmsgrad) state_pair<V::kStateBf16>(vmax[0], vmax[1], j, train, x.max_exp_avg_sq);
    }
  }
  return changed;
}

// A full tile's loads on the vector path, as they arrive: 16-byte vectors of one thread's
// 8 elements (one per bf16 array, two per fp32 array) and the freeze-mask word of its group
// of 8 lanes. walk issues the next tile's loads before this tile's math.
template <class V>
struct Loaded8 {
  static constexpr int kGrad = V::kGrad16 ? 1 : 2, kParam = V::kParam16 ? 1 : 2,
                       kState = V::kStateBf16 ? 1 : 2,
                       kMaster = V::kMaster == MasterForm::kRemainder ? 1 : 2;
  uint4 grad[kGrad], param[kParam], exp_avg[kState], exp_avg_sq[kState],
      max_exp_avg_sq[V::kAmsgrad ? kState : 1],
      master[V::kMaster != MasterForm::kNone ? kMaster : 1];
  uint2 mask;
};

// The Philox output of a thread's 8 elements on the vector path (stochastic rounding; {}
// otherwise): one call, as their global indices share index >> 3.
template <class V, bool kSkip>
__device__ __forceinline__ Philox4 draw_for(const TensorContext& c, int64_t first) {
  Philox4 draw{};
  if (V::kStochastic && !kSkip) {
    draw = philox_for_8(c.key_lo, c.key_hi, static_cast<uint64_t>(c.element_offset + first) >> 3);
  }
  return draw;
}

template <class V, bool kSkip>
__device__ __forceinline__ void vector_loads(const TensorContext& c, int64_t first, Loaded8<V>& l) {
  load_vectors(c.grad, first, l.grad);
  if (!kSkip) {
    load_vectors(c.param, first, l.param);
    load_vectors(c.exp_avg, first, l.exp_avg);
    load_vectors(c.exp_avg_sq, first, l.exp_avg_sq);
    if (V::kAmsgrad) load_vectors(c.max_exp_avg_sq, first, l.max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) load_vectors(c.master, first, l.master);
  }
  l.mask = c.freeze_mask != nullptr
               ? __ldcs(reinterpret_cast<const uint2*>(c.freeze_mask + ((first >> 3) & ~int64_t{7})))
               : make_uint2(~0u, ~0u);
}

// A full tile of a vector-aligned tensor from its loads: every element present, 16-byte
// stores, the bitmap written 8 bytes at a time. All threads of the block call it.
template <class V, bool kSkip>
__device__ __forceinline__ void vector_tile(const TensorContext& c, int64_t first,
                                            const Loaded8<V>& l, const Philox4& draw,
                                            const GradOptions& options, uint32_t grad_flip,
                                            Counts& counts) {
  const int lane = threadIdx.x & 31;
  Elements8 x = {};  // what a variant does not load (or kSkip) reads as 0
  unpack8(l.grad, x.grad, grad_flip);
  if (!kSkip) {
    unpack8(l.param, x.param);
    unpack8(l.exp_avg, x.exp_avg);
    unpack8(l.exp_avg_sq, x.exp_avg_sq);
    if (V::kAmsgrad) unpack8(l.max_exp_avg_sq, x.max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) unpack8(l.master, x.master);
  }
  // The freeze-mask byte of this thread, from the 8 bytes of its group of 8 lanes.
  const uint32_t train = ((lane & 4) ? l.mask.y : l.mask.x) >> (8 * (lane & 3)) & 0xFFu;

  const auto draw16 = [&](int k) { return random16_of(draw, k); };
  // Every element trained (no freeze mask, or a byte of ones) is the common case: an
  // instantiation with the constant mask has no per-element selects.
  const uint32_t changed =
      train == 0xFFu ? vector_math<V, kSkip>(c, x, 0xFFu, options, counts, draw16)
                     : vector_math<V, kSkip>(c, x, train, options, counts, draw16);
  if (!kSkip) {
    store8_vector<V::kParam16>(c.param, first, x.param);
    store8_vector<V::kStateBf16>(c.exp_avg, first, x.exp_avg);
    store8_vector<V::kStateBf16>(c.exp_avg_sq, first, x.exp_avg_sq);
    if (V::kAmsgrad) store8_vector<V::kStateBf16>(c.max_exp_avg_sq, first, x.max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) {
      store8_vector<V::kMaster == MasterForm::kRemainder>(c.master, first, x.master);
    }
  }
  if (V::kTrack) {
    counts.changed += __popc(changed);
    if (c.change_bitmap != nullptr || c.cumulative_bitmap != nullptr) {
      // Lanes 8q .. 8q + 7 hold bytes 8q .. 8q + 7 of the tile's bitmap.
      uint32_t word = changed << (8 * (lane & 3));
      word |= __shfl_xor_sync(kFullWarp, word, 1);
      word |= __shfl_xor_sync(kFullWarp, word, 2);
      const uint32_t next = __shfl_xor_sync(kFullWarp, word, 4);
      if ((lane & 7) == 0) {
        const int64_t byte = first >> 3;
        if (c.change_bitmap != nullptr) {
          __stcs(reinterpret_cast<uint2*>(c.change_bitmap + byte), make_uint2(word, next));
        }
        if (c.cumulative_bitmap != nullptr && (word | next) != 0) {
          uint2* cumulative = reinterpret_cast<uint2*>(c.cumulative_bitmap + byte);
          const uint2 old = __ldcs(cumulative);
          __stcs(cumulative, make_uint2(old.x | word, old.y | next));
        }
      }
    }
  }
}

// Any tile, element by element: partial tiles and tensors that are not vector-aligned.
template <class V, bool kSkip>
__device__ __forceinline__ void element_tile(const TensorContext& c, int64_t first,
                                             const GradOptions& options, uint32_t grad_flip,
                                             Counts& counts) {
  const int64_t left = c.numel - first;
  const int n = left >= 8 ? 8 : (left > 0 ? static_cast<int>(left) : 0);
  if (n == 0) return;
  Elements8 x = {};
  load8_elements<V::kGrad16>(c.grad, first, n, x.grad);
  if (!kSkip) {
    load8_elements<V::kParam16>(c.param, first, n, x.param);
    load8_elements<V::kStateBf16>(c.exp_avg, first, n, x.exp_avg);
    load8_elements<V::kStateBf16>(c.exp_avg_sq, first, n, x.exp_avg_sq);
    if (V::kAmsgrad) load8_elements<V::kStateBf16>(c.max_exp_avg_sq, first, n, x.max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) {
      load8_elements<V::kMaster == MasterForm::kRemainder>(c.master, first, n, x.master);
    }
  }
  uint32_t train = (1u << n) - 1u;
  if (c.freeze_mask != nullptr) train &= c.freeze_mask[first >> 3];
#pragma unroll
  for (int k = 0; k < 8; ++k) x.grad[k] ^= V::kGrad16 ? (grad_flip & 0xFFFFu) : grad_flip;

  // The 8 elements' Philox counters are index >> 3 and the next one (index is a multiple
  // of 8 only on the vector path): two calls, element k taking half (index & 7) + k of
  // the pair.
  const uint64_t index = static_cast<uint64_t>(c.element_offset + first);
  Philox4 low{}, high{};
  if (V::kStochastic && !kSkip) {
    low = philox_for_8(c.key_lo, c.key_hi, index >> 3);
    high = philox_for_8(c.key_lo, c.key_hi, (index >> 3) + 1);
  }
  const auto draw16 = [&](int k) {
    const unsigned half = static_cast<unsigned>(index & 7) + k;
    const bool next = half >= 8;  // word by word: a choice of struct went to the stack
    const Philox4 r{next ? high.x0 : low.x0, next ? high.x1 : low.x1, next ? high.x2 : low.x2,
                    next ? high.x3 : low.x3};
    return random16_of(r, half & 7);
  };
  // Each element's states to their stored patterns as soon as they are computed (see
  // vector_math).
  uint32_t changed = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float m, v, vmax;
    const ElementFlags f = step1<V, kSkip>(c, x, k, train, options, draw16, m, v, vmax);
    if (V::kTrack) add_flags(f, k, changed, counts);
    x.exp_avg[k] = stored_bits<V::kStateBf16>(m);
    x.exp_avg_sq[k] = stored_bits<V::kStateBf16>(v);
    x.max_exp_avg_sq[k] = stored_bits<V::kStateBf16>(vmax);
  }
  if (!kSkip) {  // only updated elements are stored
    store8_elements<V::kParam16>(c.param, first, train, x.param);
    store8_elements<V::kStateBf16>(c.exp_avg, first, train, x.exp_avg);
    store8_elements<V::kStateBf16>(c.exp_avg_sq, first, train, x.exp_avg_sq);
    if (V::kAmsgrad) store8_elements<V::kStateBf16>(c.max_exp_avg_sq, first, train, x.max_exp_avg_sq);
    if (V::kMaster != MasterForm::kNone) {
      store8_elements<V::kMaster == MasterForm::kRemainder>(c.master, first, train, x.master);
    }
  }
  if (V::kTrack) {
    counts.changed += __popc(changed);
    if (c.change_bitmap != nullptr) c.change_bitmap[first >> 3] = static_cast<uint8_t>(changed);
    if (c.cumulative_bitmap != nullptr && changed != 0) {
      c.cumulative_bitmap[first >> 3] |= static_cast<uint8_t>(changed);
    }
  }
}

// The end of this block's run of tiles, read at tensor boundaries only. It lives in shared
// memory, read through a volatile access so that it is not kept in a register across the
// steady-state loop: at the 128-register cap of two blocks per SM, that register was
// spilled to local memory (stochastic rounding with bf16 states and tracking, sm_80).
__shared__ Tile shared_block_end;
__device__ __forceinline__ Tile block_end() {
  return *const_cast<const volatile Tile*>(&shared_block_end);
}

// Tiles [tile, block_end()) of the launch, tensor by tensor from tensor t (that of `tile`).
template <class V, bool kSkip>
__device__ __forceinline__ void walk(const LaunchArgs& a, int64_t t, Tile tile,
                                     const GradOptions& options, uint32_t grad_flip) {
  const bool count = V::kTrack && a.counter_workspace != nullptr;
  while (true) {  // the same for the whole block
    const TensorContext c = load_tensor<V>(a, t);
    const Tile last = block_end() < c.end_tile ? block_end() : c.end_tile;
    const Tile vector_end = c.first_tile + c.full_tiles < last ? c.first_tile + c.full_tiles : last;
    const int64_t thread_first = int64_t{threadIdx.x} * kElementsPerThread;
    Counts counts{0, 0, 0};
    if (tile < vector_end) {
      // Software pipelined: the next tile's loads are issued before this tile's math, into
      // the other of two buffers (unrolled by two, so that no buffer is copied), and after
      // this tile's Philox call, whose temporaries are then dead.
      Loaded8<V> even, odd;
      int64_t first = int64_t{tile - c.first_tile} * kTileElements + thread_first;
      vector_loads<V, kSkip>(c, first, even);
      while (true) {
        Philox4 draw = draw_for<V, kSkip>(c, first);
        if (tile + 1 < vector_end) vector_loads<V, kSkip>(c, first + kTileElements, odd);
        vector_tile<V, kSkip>(c, first, even, draw, options, grad_flip, counts);
        first += kTileElements;
        if (++tile == vector_end) break;
        draw = draw_for<V, kSkip>(c, first);
        if (tile + 1 < vector_end) vector_loads<V, kSkip>(c, first + kTileElements, even);
        vector_tile<V, kSkip>(c, first, odd, draw, options, grad_flip, counts);
        first += kTileElements;
        if (++tile == vector_end) break;
      }
    }
    for (; tile < last; ++tile) {
      element_tile<V, kSkip>(c, int64_t{tile - c.first_tile} * kTileElements + thread_first,
                             options, grad_flip, counts);
    }
    if (count) flush_counts(counts, a.counter_workspace + kCounters * t);
    if (tile >= block_end()) break;
    do {
      ++t;
    } while (tile >= first_tile_of(a.rows, t + 1));
  }
}

template <class V>
__global__ void __launch_bounds__(kThreads, V::kMinBlocks) adamw_kernel(const LaunchArgs a) {
  // This block's run of tiles (launch() splits them; the first extra_tiles blocks take one
  // more), and its first tensor from the table's tile -> tensor section.
  const Tile b = blockIdx.x, per_block = a.tiles_per_block, extra = a.extra_tiles;
  const Tile tile = b * per_block + (b < extra ? b : extra);
  const Tile end = tile + per_block + (b < extra ? 1u : 0u);
  if (threadIdx.x == 0) shared_block_end = end;
  __syncthreads();

  const GradOptions options{V::kGradScale ? *a.grad_scale : 1.0f, V::kGradScale, false,
                            V::kL2Decay};
  const uint32_t grad_flip = grad_sign_flip<V>(a.maximize);
  if (tile < end) {  // the same for the whole block
    const int64_t t = __ldg(a.tile_tensor + tile);
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) {
      walk<V, true>(a, t, tile, options, grad_flip);
    } else {
      walk<V, false>(a, t, tile, options, grad_flip);
    }
  }
  if (V::kTrack && a.counter_workspace != nullptr) publish_counters(a);
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
  LaunchArgs args = a;
  args.tiles_per_block = static_cast<uint32_t>(a.total_tiles / grid);
  args.extra_tiles = static_cast<uint32_t>(a.total_tiles % grid);
  const auto on = static_cast<cudaStream_t>(stream);
  adamw_kernel<V><<<static_cast<unsigned>(grid), kThreads, 0, on>>>(args);
  check_cuda(cudaGetLastError(), "launching the AdamW kernel");
}

// The launchers of one 16-bit format and store mode, indexed by flag combination (null
// where invalid).
template <int kHalfFormat, StoreMode kStore, int kFlags>
constexpr LaunchFn launcher_entry() {
  if constexpr (Variant<kHalfFormat, kStore, kFlags>::kValid) {
    return &launch<Variant<kHalfFormat, kStore, kFlags>>;
  } else {
    return nullptr;
  }
}

template <int kHalfFormat, StoreMode kStore, int kParam16Flag, int... kRest>
LaunchFn pick_launcher(int flags, std::integer_sequence<int, kRest...>) {
  // Entries for the 64 combinations of the other six flags, this param dtype only.
  static constexpr LaunchFn table[] = {
      launcher_entry<kHalfFormat, kStore, (kRest << 1) | kParam16Flag>()...};
  if (flags < 0 || flags >= kFlagCombinations || (flags & kFlagParam16) != kParam16Flag) {
    return nullptr;
  }
  return table[flags >> 1];
}

#define RLVR_OPTIM_DEFINE_LAUNCHER(name, half, store, param16_flag)                        \
  LaunchFn name(int flags) {                                                               \
    return pick_launcher<half, store, param16_flag>(                                       \
        flags, std::make_integer_sequence<int, kFlagCombinations / 2>{});                  \
  }

}  // namespace rlvr_optim
