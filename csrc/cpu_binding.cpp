// rlvr_optim._cpu: the pybind11 face of the CPU step. It takes raw host addresses and
// sizes (Python ints), so it builds with a C++17 compiler and pybind11 alone, without
// torch's headers; rlvr_optim/cpu_backend.py turns tensors into those ints. Beside it, the
// fused backends' one-pass reader of a step's grads (read_gradients), on Python objects.
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

// rlvr_optim.plan.read_gradients in one pass instead of three: (grads, their data
// pointers, their dtypes) of `params`, read as `p.grad`, `data_ptr(g)` and `g.dtype` (with
// `data_ptr` torch.Tensor.data_ptr, passed in so that this file needs no torch headers),
// or None when a grad has no storage (None, or sparse: data_ptr raises TypeError or
// RuntimeError). With thousands of tensors the separate passes cost more than the reads:
// each went to memory again for the grad objects the previous pass had just touched.
py::object read_gradients(py::handle params, py::handle data_ptr) {
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  static PyObject* const dtype_name = PyUnicode_InternFromString("dtype");
  py::object seq = py::reinterpret_steal<py::object>(
      PySequence_Fast(params.ptr(), "read_gradients: params must be a sequence"));
  if (!seq) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  py::list grads(n), pointers(n), dtypes(n);  // empty slots until filled (safe to free)
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = PyObject_GetAttr(items[i], grad_name);
    if (grad == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(grads.ptr(), i, grad);
    PyObject* pointer = PyObject_CallOneArg(data_ptr.ptr(), grad);
    if (pointer == nullptr) {
      if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_RuntimeError)) {
        PyErr_Clear();
        return py::none();
      }
      throw py::error_already_set();
    }
    PyList_SET_ITEM(pointers.ptr(), i, pointer);
    PyObject* dtype = PyObject_GetAttr(grad, dtype_name);
    if (dtype == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(dtypes.ptr(), i, dtype);
  }
  return py::make_tuple(grads, pointers, dtypes);
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
  m.def("read_gradients", &read_gradients, py::arg("params"), py::arg("data_ptr"),
        "(grads, data pointers, dtypes) of params in one pass, or None when a grad has no "
        "storage; data_ptr is torch.Tensor.data_ptr.");
}
