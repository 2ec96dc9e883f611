// rlvr_optim._cpu: the pybind11 face of the CPU step. It takes raw host addresses and
// sizes (Python ints), so it builds with a C++17 compiler and pybind11 alone, without
// torch's headers; rlvr_optim/cpu_backend.py turns tensors into those ints.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu_step.h"

namespace py = pybind11;

namespace rlvr_optim {
namespace cpu {
namespace {

// Bumped whenever the row layout or step's arguments change, so that a stale build is
// never used with a newer cpu_backend.py.
constexpr int kAbiVersion = 1;

using StepFn = bool (*)(const CpuStep&);

struct Isa {
  const char* name;
  StepFn fn;
};

// The instruction sets compiled in and supported by this CPU, best first.
std::vector<Isa> usable_isas() {
  std::vector<Isa> out;
#if defined(RLVR_CPU_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2")) out.push_back({"avx2", &step_avx2});
#endif
  out.push_back({"generic", &step_generic});
  return out;
}

template <typename T>
T* address(uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

void step(const std::string& isa, uintptr_t rows, int64_t num_tensors, uintptr_t scalars,
          uintptr_t sr_keys, uintptr_t grad_scale, uintptr_t found_inf, bool maximize,
          int threads) {
  StepFn fn = nullptr;
  std::string names;
  for (const Isa& candidate : usable_isas()) {
    if (isa == candidate.name) fn = candidate.fn;
    names += (names.empty() ? "" : ", ") + std::string(candidate.name);
  }
  if (fn == nullptr) {
    throw py::value_error("isa '" + isa + "' is not usable here; choose one of " + names);
  }
  if (num_tensors < 0 || (num_tensors > 0 && (rows == 0 || scalars == 0)) || threads < 1) {
    throw py::value_error("step needs rows and scalars for num_tensors >= 0, and threads >= 1");
  }
  CpuStep args;
  args.rows = address<const int64_t>(rows);
  args.num_tensors = num_tensors;
  args.scalars = address<const float>(scalars);
  args.sr_keys = address<const int64_t>(sr_keys);
  args.grad_scale = address<const float>(grad_scale);
  args.found_inf = address<const float>(found_inf);
  args.maximize = maximize;
  args.threads = threads;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if ((args.rows[t * kCpuRowInt64s + kLayout] & kLayoutStochastic) != 0 && sr_keys == 0) {
      throw py::value_error("a stochastic row needs sr_keys");
    }
  }
  bool ok;
  {
    py::gil_scoped_release release;
    ok = fn(args);
  }
  if (!ok) {
    throw py::value_error("a row's layout has no loop: fp32 params are stored by nearest "
                          "rounding, without master or remainder; the remainder form by "
                          "nearest rounding only");
  }
}

}  // namespace
}  // namespace cpu
}  // namespace rlvr_optim

PYBIND11_MODULE(_cpu, m) {
  using namespace rlvr_optim::cpu;
  m.doc() = "rlvr_optim's CPU step, on raw host addresses (see csrc/cpu_step.h).";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::tuple fields(static_cast<size_t>(kCpuRowInt64s));
  for (int i = 0; i < kCpuRowInt64s; ++i) fields[i] = py::str(kCpuRowFields[i]);
  m.attr("ROW_FIELDS") = fields;
  py::dict layout;
  layout["param_bf16"] = kLayoutParamBf16;
  layout["grad_bf16"] = kLayoutGradBf16;
  layout["state_bf16"] = kLayoutStateBf16;
  layout["amsgrad"] = kLayoutAmsgrad;
  layout["master_fp32"] = kLayoutMasterFp32;
  layout["remainder"] = kLayoutRemainder;
  layout["stochastic"] = kLayoutStochastic;
  layout["track"] = kLayoutTrack;
  m.attr("LAYOUT_BITS") = layout;
  py::tuple isas(usable_isas().size());
  for (size_t i = 0; i < usable_isas().size(); ++i) isas[i] = py::str(usable_isas()[i].name);
  m.attr("ISAS") = isas;
  m.def("step", &step, py::arg("isa"), py::arg("rows"), py::arg("num_tensors"),
        py::arg("scalars"), py::arg("sr_keys"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("maximize"), py::arg("threads"),
        "One AdamW step of a table of host tensors (rows: num_tensors x len(ROW_FIELDS) "
        "int64s) with the instruction set `isa` (one of ISAS) on `threads` OpenMP threads. "
        "Addresses are ints, 0 for absent.");
}
