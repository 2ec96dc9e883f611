// rlvr_optim._C: the pybind11 face of the kernels. It takes raw device addresses, sizes
// and a stream handle (all Python ints), so it builds with nvcc + pybind11 alone, without
// torch's headers; rlvr_optim/cuda_backend.py turns tensors into those ints.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "adamw_element.cuh"
#include "adamw_launch.h"

namespace py = pybind11;

namespace rlvr_optim {
namespace {

// Bumped whenever the table layout or launch_adamw's arguments change, so that a stale
// build is never used with a newer cuda_backend.py.
constexpr int kAbiVersion = 6;

StoreMode store_of(int variant) {
  return static_cast<StoreMode>(variant / kFlagCombinations % kStoreModes);
}

LaunchFn find_launcher(int variant) {
  if (variant < 0 || variant >= kHalfFormats * kStoreModes * kFlagCombinations) return nullptr;
  const bool fp16 = variant / (kStoreModes * kFlagCombinations) == kHalfFp16;
  const int flags = variant % kFlagCombinations;
  const bool param16 = (flags & kFlagParam16) != 0;
  switch (store_of(variant)) {
    case StoreMode::kNearest:
      if (fp16) {
        return param16 ? launcher_fp16_nearest(flags) : launcher_fp32_param_fp16_image(flags);
      }
      return param16 ? launcher_bf16_nearest(flags) : launcher_fp32_param(flags);
    case StoreMode::kStochastic:
      return fp16 ? launcher_fp16_stochastic(flags) : launcher_bf16_stochastic(flags);
    case StoreMode::kMasterNearest:
      return fp16 ? launcher_fp16_master_nearest(flags) : launcher_master_nearest(flags);
    case StoreMode::kMasterStochastic:
      return fp16 ? launcher_fp16_master_stochastic(flags) : launcher_master_stochastic(flags);
    case StoreMode::kRemainder:
      return fp16 ? nullptr : launcher_remainder(flags);
  }
  return nullptr;
}

int variant_of(int store, bool fp16, bool param16, bool grad16, bool state_bf16, bool amsgrad,
               bool track, bool grad_scale, bool l2_decay) {
  if (store < 0 || store >= kStoreModes) {
    throw py::value_error("store mode must be in [0, " + std::to_string(kStoreModes) + ")");
  }
  const int flags = (param16 ? kFlagParam16 : 0) | (grad16 ? kFlagGrad16 : 0) |
                    (state_bf16 ? kFlagStateBf16 : 0) | (amsgrad ? kFlagAmsgrad : 0) |
                    (track ? kFlagTrack : 0) | (grad_scale ? kFlagGradScale : 0) |
                    (l2_decay ? kFlagL2Decay : 0);
  const int variant =
      variant_code(fp16 ? kHalfFp16 : kHalfBf16, static_cast<StoreMode>(store), flags);
  if (find_launcher(variant) == nullptr) {
    throw py::value_error("no kernel for this combination: fp32 params are stored by nearest "
                          "rounding, without master or remainder, and the remainder form "
                          "needs bf16 params");
  }
  return variant;
}

template <typename T>
T* address(uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

void launch_adamw(int variant, uintptr_t table, int64_t num_tensors, int64_t total_tiles,
                  bool counters, uintptr_t scalars, uintptr_t sr_keys, uintptr_t grad_scale,
                  uintptr_t found_inf, bool maximize, int device, uintptr_t stream) {
  const LaunchFn launch = find_launcher(variant);
  if (launch == nullptr) throw py::value_error("unknown kernel variant " + std::to_string(variant));
  if (table == 0 || scalars == 0 || num_tensors < 1 || total_tiles < 0) {
    throw py::value_error("launch_adamw needs a table, scalars and at least one tensor");
  }
  if (total_tiles > int64_t{UINT32_MAX}) {  // tile indices are 32-bit in the kernel
    throw py::value_error("launch_adamw takes fewer than 2**32 tiles (" +
                          std::to_string(kTileElements) + " elements each) per launch, got " +
                          std::to_string(total_tiles));
  }
  if ((variant % kFlagCombinations & kFlagGradScale) != 0 && grad_scale == 0) {
    throw py::value_error("this kernel variant divides by grad_scale: pass its address");
  }
  if ((store_of(variant) == StoreMode::kStochastic ||
       store_of(variant) == StoreMode::kMasterStochastic) &&
      sr_keys == 0) {
    throw py::value_error("stochastic rounding needs sr_keys");
  }
  int64_t* base = address<int64_t>(table);
  LaunchArgs args;
  args.rows = reinterpret_cast<const TensorRow*>(base);
  args.num_tensors = num_tensors;
  args.total_tiles = total_tiles;
  int64_t* workspace = base + workspace_offset(num_tensors);
  args.counter_workspace = counters ? reinterpret_cast<unsigned long long*>(workspace) : nullptr;
  args.ticket = reinterpret_cast<unsigned int*>(base + ticket_offset(num_tensors));
  args.tile_tensor = reinterpret_cast<const int32_t*>(base + tile_tensor_offset(num_tensors));
  args.scalars = address<const float>(scalars);
  args.sr_keys = address<const int64_t>(sr_keys);
  args.grad_scale = address<const float>(grad_scale);
  args.found_inf = address<const float>(found_inf);
  args.maximize = maximize;
  const cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("rlvr_optim._C: cudaSetDevice: ") +
                             cudaGetErrorString(status));
  }
  launch(args, device, reinterpret_cast<void*>(stream));
}

// The GPU check of the hardware bf16 rounding (round_nearest_bf16_computed and its x2
// form) against the spec's integer formula on every fp32 pattern: a NaN pattern must give
// 0x7FC0 (the image of the canonical NaN, the only NaN the step rounds), any other pattern
// round_nearest_bf16's bits. With `control` the expected bits are those of truncation
// instead, which must disagree: the check can fail.
__global__ void bf16_rounding_check_kernel(unsigned long long* mismatches, unsigned* first_bad,
                                           bool control) {
  unsigned long long bad = 0;
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < (uint64_t{1} << 32);
       i += stride) {
    const uint32_t bits = static_cast<uint32_t>(i), other = ~bits;
    const uint32_t expected = control ? bits >> 16
                              : is_nan_bits(bits) ? 0x7FC0u : round_nearest_bf16(bits);
    const uint32_t expected_other = control ? other >> 16
                                    : is_nan_bits(other) ? 0x7FC0u : round_nearest_bf16(other);
    const uint32_t pair = round_nearest_bf16x2_computed(fp32_from_bits(bits), fp32_from_bits(other));
    if (round_nearest_bf16_computed(fp32_from_bits(bits)) != expected ||
        pair != (expected | (expected_other << 16))) {
      ++bad;
      atomicMin(first_bad, bits);
    }
  }
  if (bad != 0) atomicAdd(mismatches, bad);
}

// The same for float16 (round_nearest_fp16_computed, cvt.rn.f16.f32): a NaN pattern must
// give 0x7E00, any other round_nearest_fp16's bits; `control`: truncation toward zero.
__global__ void fp16_rounding_check_kernel(unsigned long long* mismatches, unsigned* first_bad,
                                           bool control) {
  unsigned long long bad = 0;
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < (uint64_t{1} << 32);
       i += stride) {
    const uint32_t bits = static_cast<uint32_t>(i);
    const uint32_t expected = control ? round_stochastic_fp16(bits, 0u)
                              : is_nan_bits(bits) ? kFp16QuietNan : round_nearest_fp16(bits);
    if (round_nearest_fp16_computed(fp32_from_bits(bits)) != expected) {
      ++bad;
      atomicMin(first_bad, bits);
    }
  }
  if (bad != 0) atomicAdd(mismatches, bad);
}

py::tuple rounding_check(int device, bool fp16, bool control) {
  auto check = [](cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
      throw std::runtime_error(std::string("rlvr_optim._C: ") + what + ": " +
                               cudaGetErrorString(status));
    }
  };
  check(cudaSetDevice(device), "cudaSetDevice");
  unsigned long long* mismatches = nullptr;
  unsigned* first_bad = nullptr;
  check(cudaMalloc(&mismatches, sizeof *mismatches), "cudaMalloc");
  check(cudaMalloc(&first_bad, sizeof *first_bad), "cudaMalloc");
  check(cudaMemset(mismatches, 0, sizeof *mismatches), "cudaMemset");
  check(cudaMemset(first_bad, 0xFF, sizeof *first_bad), "cudaMemset");
  if (fp16) {
    fp16_rounding_check_kernel<<<1024, 256>>>(mismatches, first_bad, control);
  } else {
    bf16_rounding_check_kernel<<<1024, 256>>>(mismatches, first_bad, control);
  }
  check(cudaGetLastError(), "launching the rounding check");
  unsigned long long count = 0;
  unsigned first = 0;
  check(cudaMemcpy(&count, mismatches, sizeof count, cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(&first, first_bad, sizeof first, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(mismatches);
  cudaFree(first_bad);
  return py::make_tuple(count, first);
}

}  // namespace
}  // namespace rlvr_optim

PYBIND11_MODULE(_C, m) {
  using namespace rlvr_optim;
  m.doc() = "rlvr_optim's CUDA kernels, on raw device addresses (see csrc/adamw_launch.h).";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::tuple fields(static_cast<size_t>(kRowInt64s));  // an enum: no tuple(size) overload
  for (int i = 0; i < kRowInt64s; ++i) fields[i] = py::str(kRowFields[i]);
  m.attr("ROW_FIELDS") = fields;
  py::tuple counters(kCounters);
  for (int i = 0; i < kCounters; ++i) counters[i] = py::str(kCounterNames[i]);
  m.attr("COUNTER_NAMES") = counters;
  m.attr("LAYOUT_VECTOR_ALIGNED") = kLayoutVectorAligned;
  m.attr("LAYOUT_BITMAP_ALIGNED") = kLayoutBitmapAligned;
  m.attr("TILE_ELEMENTS") = kTileElements;
  m.attr("STORE_MODES") = py::make_tuple("nearest", "stochastic", "master_nearest",
                                         "master_stochastic", "remainder");
  m.def("table_int64s",
        [](int64_t num_tensors, int64_t total_tiles) {
          return table_int64s(num_tensors, total_tiles);
        },
        py::arg("num_tensors"), py::arg("total_tiles"),
        "Length of the int64 table of num_tensors tensors cut into total_tiles tiles: rows, "
        "counter workspace, ticket, then the int32 tensor row of each tile.");
  m.def("tile_tensor_offset",
        [](int64_t num_tensors) { return tile_tensor_offset(num_tensors); },
        py::arg("num_tensors"),
        "Where the table's int32 tile -> tensor section starts, in int64s from its base.");
  m.def("variant", &variant_of, py::arg("store"), py::arg("fp16"), py::arg("param16"),
        py::arg("grad16"), py::arg("state_bf16"), py::arg("amsgrad"), py::arg("track"),
        py::arg("grad_scale"), py::arg("l2_decay") = false,
        "The kernel variant of a store mode (index into STORE_MODES), 16-bit format (fp16: "
        "float16, else bf16; that of a 16-bit param and grad and of an fp32 param's change "
        "image), dtype and mode flags.");
  m.def("bf16_rounding_check",
        [](int device, bool control) { return rounding_check(device, false, control); },
        py::arg("device"), py::arg("control") = false,
        "GPU check of the kernels' hardware bf16 rounding against the spec on all 2**32 fp32 "
        "patterns: (mismatches, first mismatching pattern). control=True compares with "
        "truncation instead, which must mismatch.");
  m.def("fp16_rounding_check",
        [](int device, bool control) { return rounding_check(device, true, control); },
        py::arg("device"), py::arg("control") = false,
        "The same check for the kernels' hardware float16 rounding (cvt.rn.f16.f32).");
  m.def("launch_adamw", &launch_adamw, py::arg("variant"), py::arg("table"),
        py::arg("num_tensors"), py::arg("total_tiles"), py::arg("counters"), py::arg("scalars"),
        py::arg("sr_keys"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("maximize"),
        py::arg("device"), py::arg("stream"),
        "One AdamW step of a table of tensors on `stream` (a cudaStream_t as int). Addresses "
        "are ints, 0 for absent; the table holds table_int64s(num_tensors, total_tiles) "
        "int64s whose workspace and ticket are zero (they are zero again after the launch).");
}
