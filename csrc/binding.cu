// rlvr_optim._C: the pybind11 face of the kernels. It takes raw device addresses, sizes
// and a stream handle (all Python ints), so it builds with nvcc + pybind11 alone, without
// torch's headers; rlvr_optim/cuda_backend.py turns tensors into those ints.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "adamw_launch.h"

namespace py = pybind11;

namespace rlvr_optim {
namespace {

// Bumped whenever the table layout or launch_adamw's arguments change, so that a stale
// build is never used with a newer cuda_backend.py.
constexpr int kAbiVersion = 1;

LaunchFn find_launcher(int variant) {
  if (variant < 0 || variant >= kStoreModes * kFlagCombinations) return nullptr;
  const StoreMode store = static_cast<StoreMode>(variant / kFlagCombinations);
  const int flags = variant % kFlagCombinations;
  const bool param_bf16 = (flags & kFlagParamBf16) != 0;
  switch (store) {
    case StoreMode::kNearest:
      return param_bf16 ? launcher_bf16_nearest(flags) : launcher_fp32_param(flags);
    case StoreMode::kStochastic:
      return launcher_bf16_stochastic(flags);
    case StoreMode::kMasterNearest:
      return launcher_master_nearest(flags);
    case StoreMode::kMasterStochastic:
      return launcher_master_stochastic(flags);
    case StoreMode::kRemainder:
      return launcher_remainder(flags);
  }
  return nullptr;
}

int variant_of(int store, bool param_bf16, bool grad_bf16, bool state_bf16, bool amsgrad,
               bool track) {
  if (store < 0 || store >= kStoreModes) {
    throw py::value_error("store mode must be in [0, " + std::to_string(kStoreModes) + ")");
  }
  const int flags = (param_bf16 ? kFlagParamBf16 : 0) | (grad_bf16 ? kFlagGradBf16 : 0) |
                    (state_bf16 ? kFlagStateBf16 : 0) | (amsgrad ? kFlagAmsgrad : 0) |
                    (track ? kFlagTrack : 0);
  const int variant = variant_code(static_cast<StoreMode>(store), flags);
  if (find_launcher(variant) == nullptr) {
    throw py::value_error("no kernel for this combination: fp32 params are stored by nearest "
                          "rounding, without master or remainder");
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
  if (((variant / kFlagCombinations) == static_cast<int>(StoreMode::kStochastic) ||
       (variant / kFlagCombinations) == static_cast<int>(StoreMode::kMasterStochastic)) &&
      sr_keys == 0) {
    throw py::value_error("stochastic rounding needs sr_keys");
  }
  int64_t* base = address<int64_t>(table);
  LaunchArgs args;
  args.rows = reinterpret_cast<const TensorRow*>(base);
  args.num_tensors = num_tensors;
  args.total_tiles = total_tiles;
  int64_t* workspace = base + (num_tensors + 1) * kRowInt64s;
  args.counter_workspace = counters ? reinterpret_cast<unsigned long long*>(workspace) : nullptr;
  args.ticket = reinterpret_cast<unsigned int*>(workspace + 3 * num_tensors);
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

}  // namespace
}  // namespace rlvr_optim

PYBIND11_MODULE(_C, m) {
  using namespace rlvr_optim;
  m.doc() = "rlvr_optim's CUDA kernels, on raw device addresses (see csrc/adamw_launch.h).";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::tuple fields(kRowInt64s);
  for (int i = 0; i < kRowInt64s; ++i) fields[i] = py::str(kRowFields[i]);
  m.attr("ROW_FIELDS") = fields;
  m.attr("ROW_VECTOR_ALIGNED") = kRowVectorAligned;
  m.attr("ROW_BITMAP_WORD_ALIGNED") = kRowBitmapWordAligned;
  m.attr("TILE_ELEMENTS") = kTileElements;
  m.attr("STORE_MODES") = py::make_tuple("nearest", "stochastic", "master_nearest",
                                         "master_stochastic", "remainder");
  m.def("table_int64s", [](int64_t num_tensors) { return table_int64s(num_tensors); },
        py::arg("num_tensors"),
        "Length of the int64 table of num_tensors tensors: rows, counter workspace, ticket.");
  m.def("variant", &variant_of, py::arg("store"), py::arg("param_bf16"), py::arg("grad_bf16"),
        py::arg("state_bf16"), py::arg("amsgrad"), py::arg("track"),
        "The kernel variant of a store mode (index into STORE_MODES) and dtype flags.");
  m.def("launch_adamw", &launch_adamw, py::arg("variant"), py::arg("table"),
        py::arg("num_tensors"), py::arg("total_tiles"), py::arg("counters"), py::arg("scalars"),
        py::arg("sr_keys"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("maximize"),
        py::arg("device"), py::arg("stream"),
        "One AdamW step of a table of tensors on `stream` (a cudaStream_t as int). Addresses "
        "are ints, 0 for absent; the table holds table_int64s(num_tensors) int64s whose "
        "workspace and ticket are zero (they are zero again after the launch).");
}
