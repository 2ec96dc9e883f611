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

// Bumped whenever the row layout or the arguments or results of step or read_gradients
// change, so that a stale build is never used with a newer cpu_backend.py.
constexpr int kAbiVersion = 2;

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

// None for the error that data_ptr raises on a tensor without storage (TypeError or
// RuntimeError: None, or sparse), which the caller's full checks then name; any other error
// propagates.
py::object no_storage() {
  if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_RuntimeError)) {
    PyErr_Clear();
    return py::none();
  }
  throw py::error_already_set();
}

// The address `data_ptr(t)` returns, as a uint64 (no Python int kept); false, with the
// error set, when it raised (see no_storage).
bool read_address(PyObject* data_ptr, PyObject* t, uint64_t* out) {
  PyObject* value = PyObject_CallOneArg(data_ptr, t);
  if (value == nullptr) return false;
  *out = PyLong_AsUnsignedLongLong(value);
  Py_DECREF(value);
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

// rlvr_optim.plan.read_gradients in one pass: (grads, key) of `params`, with grads the
// list of `p.grad` and key the bytes of (data_ptr(g), address of g.dtype) per grad as
// native uint64s (`data_ptr` is torch.Tensor.data_ptr, passed in so that this file needs
// no torch headers; a dtype is a singleton, so its address names it); None when a grad has
// no storage. With thousands of tensors this pass is a step's host work: the key is
// compared whole with the previous step's (memcmp) instead of as lists of Python ints and
// dtypes, and each grad object is visited once (separate passes each went to memory again
// for the objects the previous one had just touched). The params' own addresses are read
// by the planner in a pass of their own: inside this loop they cost more (measured on a
// 2-core EPYC VM), the longer loop body leaving fewer of their cache misses in flight.
py::object read_gradients(py::handle params, py::handle data_ptr) {
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  static PyObject* const dtype_name = PyUnicode_InternFromString("dtype");
  py::object seq = py::reinterpret_steal<py::object>(
      PySequence_Fast(params.ptr(), "read_gradients: params must be a sequence"));
  if (!seq) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  py::list grads(n);  // empty slots until filled (safe to free)
  py::bytes key(nullptr, static_cast<size_t>(n) * 2 * sizeof(uint64_t));
  auto* words = reinterpret_cast<uint64_t*>(PyBytes_AS_STRING(key.ptr()));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = PyObject_GetAttr(items[i], grad_name);
    if (grad == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(grads.ptr(), i, grad);
    if (!read_address(data_ptr.ptr(), grad, &words[2 * i])) return no_storage();
    PyObject* dtype = PyObject_GetAttr(grad, dtype_name);
    if (dtype == nullptr) throw py::error_already_set();
    words[2 * i + 1] = reinterpret_cast<uintptr_t>(dtype);
    Py_DECREF(dtype);  // a torch.dtype lives as long as torch
  }
  return py::make_tuple(grads, key);
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
        "(grads, key) in one pass, key the native uint64s (data_ptr, dtype address) of each "
        "grad; None when a grad has no storage. data_ptr is torch.Tensor.data_ptr.");
}
