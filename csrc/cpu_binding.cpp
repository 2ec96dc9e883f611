// rlvr_optim._cpu: the pybind11 face of the CPU step. It takes raw host addresses and
// sizes (Python ints), so it builds with a C++17 compiler and pybind11 alone, without
// torch's headers; rlvr_optim/cpu_backend.py turns tensors into those ints. Beside it, the
// fused backends' per-step passes over Python objects: the grads' reader (read_gradients),
// the params' address check (addresses_equal) and the params' identity (same_items); and
// the header's float16 rounding over a range of fp32 patterns (fp16_nearest_patterns), which
// tests compare with torch's cast on all 2**32 of them; for tests too, each instruction
// set's float16 conversions (fp16_loop_conversions) and which loop steps a layout (loop_of).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_step.h"

// The header's inline functions in a namespace of this object's own, as cpu_step.cpp does
// per instruction set: the linker keeps one copy of an inline function of a given name.
namespace isa_binding {
#include "adamw_element.cuh"
}  // namespace isa_binding

namespace py = pybind11;

namespace rlvr_optim {
namespace cpu {
namespace {

// Bumped whenever the row layout or the arguments or results of step or read_gradients
// change, so that a stale build is never used with a newer cpu_backend.py.
constexpr int kAbiVersion = 5;

using StepFn = bool (*)(const CpuStep&);

struct Isa {
  const char* name;
  StepFn fn;
  void (*fp16_round)(uint16_t*, uint64_t, int64_t, const uint16_t*);
  void (*fp16_values)(const uint16_t*, float*, int64_t);
  const char* (*loop_of)(int64_t);
};

// The instruction sets compiled in and supported by this CPU, best first.
std::vector<Isa> usable_isas() {
  std::vector<Isa> out;
#if defined(RLVR_CPU_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    out.push_back({"avx2", &step_avx2, &fp16_round_avx2, &fp16_values_avx2,
                   &loop_of_avx2});
  }
#endif
  out.push_back({"generic", &step_generic, &fp16_round_generic, &fp16_values_generic,
                  &loop_of_generic});
  return out;
}

template <typename T>
T* address(uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

Isa usable_isa(const std::string& isa) {
  std::string names;
  for (const Isa& candidate : usable_isas()) {
    if (isa == candidate.name) return candidate;
    names += (names.empty() ? "" : ", ") + std::string(candidate.name);
  }
  throw py::value_error("isa '" + isa + "' is not usable here; choose one of " + names);
}

void step(const std::string& isa, uintptr_t rows, int64_t num_tensors, uintptr_t scalars,
          uintptr_t sr_keys, uintptr_t grad_scale, uintptr_t found_inf, bool maximize,
          bool l2_decay,
          int threads) {
  const StepFn fn = usable_isa(isa).fn;
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
  args.l2_decay = l2_decay;
  args.threads = threads;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if ((args.rows[t * kRowInt64s + kRow_layout] & kLayoutStochastic) != 0 && sr_keys == 0) {
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

// Clears the error that data_ptr raises on a tensor without storage (TypeError or
// RuntimeError: None, or sparse), which the caller's full checks then name; any other error
// propagates.
void clear_no_storage_error() {
  if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_RuntimeError)) {
    PyErr_Clear();
    return;
  }
  throw py::error_already_set();
}

// None, for read_gradients, after clear_no_storage_error.
py::object no_storage() {
  clear_no_storage_error();
  return py::none();
}

// One attribute read, `getattr(obj, name)`, made at the cost of a call through a pointer
// for the objects of the last type seen. Where a type reads attributes generically (no
// __getattribute__ or __getattr__ of its own) and `name` resolves in its MRO to a getset
// descriptor (a data descriptor: an instance __dict__ cannot shadow it), getattr returns
// what the descriptor's C getter returns, so the getter is called directly. The type's
// version tag, which CPython changes whenever the type or a base is modified, says when
// that resolution must be made again; other types take PyObject_GetAttr. Measured on a
// 2-core EPYC VM over 4000 tensors: reading each grad, its address and its dtype took
// 1.23-1.26x the floor (`[p.grad.data_ptr() for p in params]`) through PyObject_GetAttr
// and PyObject_CallOneArg, 0.90-0.95x with the getters and data_ptr called directly.
class GetsetSite {
 public:
  explicit GetsetSite(const char* name) : name_(PyUnicode_InternFromString(name)) {}

  // New reference, or nullptr with the error set.
  PyObject* get(PyObject* obj) {
    PyTypeObject* type = Py_TYPE(obj);
    if (type == type_ && type->tp_version_tag == tag_) return def_->get(obj, def_->closure);
    learn(type);
    return PyObject_GetAttr(obj, name_);
  }

 private:
  void learn(PyTypeObject* type) {
    Py_CLEAR(type_);  // held, so that a freed type's address cannot pass for it
    if (type->tp_getattro != PyObject_GenericGetAttr) return;
    PyObject* descr = _PyType_Lookup(type, name_);  // borrowed; gives the type a tag
    if (descr == nullptr || Py_TYPE(descr) != &PyGetSetDescr_Type) return;
    PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(descr)->d_getset;
    if (def->get == nullptr || !PyType_IsSubtype(type, PyDescr_TYPE(descr))) return;
    if (type->tp_version_tag == 0) return;  // no valid tag: every read looks up
    Py_INCREF(type);
    type_ = type;
    tag_ = type->tp_version_tag;
    def_ = def;
  }

  PyObject* const name_;
  PyTypeObject* type_ = nullptr;
  unsigned int tag_ = 0;
  PyGetSetDef* def_ = nullptr;
};

// `data_ptr(t)`, for data_ptr a method descriptor (torch.Tensor.data_ptr): its C function
// called directly on the instances of the type that defines it, as the descriptor's own
// call does after its checks; anything else through the descriptor (raising TypeError).
class MethodSite {
 public:
  explicit MethodSite(PyObject* method) : method_(method) {
    if (Py_TYPE(method) == &PyMethodDescr_Type) {
      PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(method)->d_method;
      if ((def->ml_flags & ~METH_COEXIST) == METH_NOARGS) {
        fn_ = def->ml_meth;
        owner_ = PyDescr_TYPE(method);
      }
    }
  }

  // New reference, or nullptr with the error set.
  PyObject* call(PyObject* obj) const {
    if (fn_ != nullptr && PyObject_TypeCheck(obj, owner_)) return fn_(obj, nullptr);
    return PyObject_CallOneArg(method_, obj);
  }

 private:
  PyObject* const method_;
  PyCFunction fn_ = nullptr;
  PyTypeObject* owner_ = nullptr;
};

// A Python int as a uint64. Where unsigned long is 64 bits (LP64: Linux, macOS), through
// PyLong_AsUnsignedLong: CPython 3.11 converts a two-digit int (an address) with a loop
// over its digits there, and in PyLong_AsUnsignedLongLong through the generic byte-array
// path, which took 2.4% of a stubbed many-small step's samples (perf, 2-core EPYC VM).
uint64_t as_uint64(PyObject* value) {
  if constexpr (sizeof(unsigned long) == sizeof(uint64_t)) {
    return PyLong_AsUnsignedLong(value);
  } else {
    return PyLong_AsUnsignedLongLong(value);
  }
}

// The address `data_ptr(t)` returns, as a uint64 (no Python int kept); false, with the
// error set, when it raised (see no_storage).
bool read_address(const MethodSite& data_ptr, PyObject* t, uint64_t* out) {
  PyObject* value = data_ptr.call(t);
  if (value == nullptr) return false;
  *out = as_uint64(value);
  Py_DECREF(value);
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

// `seq` as a list or tuple (PySequence_Fast) and its length; its item i, a new reference,
// checked against that length on every read (a getter may run Python code that changes a
// list under the loop).
class Items {
 public:
  Items(py::handle seq, const char* error)
      : seq_(py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), error))) {
    if (!seq_) throw py::error_already_set();
    n_ = PySequence_Fast_GET_SIZE(seq_.ptr());
  }
  Py_ssize_t size() const { return n_; }
  PyObject* const* data() const { return PySequence_Fast_ITEMS(seq_.ptr()); }
  py::object operator[](Py_ssize_t i) const {
    if (PySequence_Fast_GET_SIZE(seq_.ptr()) != n_) {
      throw py::value_error("the sequence changed size while it was read");
    }
    return py::reinterpret_borrow<py::object>(PySequence_Fast_ITEMS(seq_.ptr())[i]);
  }

 private:
  py::object seq_;
  Py_ssize_t n_ = 0;
};

GetsetSite& grad_site() {
  // Leaked on purpose: no destructor may run once Python is finalized.
  static GetsetSite* const site = new GetsetSite("grad");
  return *site;
}

GetsetSite& dtype_site() {
  static GetsetSite* const site = new GetsetSite("dtype");
  return *site;
}

// rlvr_optim.plan.read_gradients in one pass: (grads, key) of `params`, with grads the
// list of `p.grad` and key the bytes of (data_ptr(g), address of g.dtype) per grad as
// native uint64s (`data_ptr` is torch.Tensor.data_ptr, passed in so that this file needs
// no torch headers; a dtype is a singleton, so its address names it); None when a grad has
// no storage. With thousands of tensors this pass is a step's host work: the key is
// compared whole with the previous step's (memcmp) instead of as lists of Python ints and
// dtypes, and each grad object is visited once (separate passes each went to memory again
// for the objects the previous one had just touched). The params' own addresses are read
// by addresses_equal in a pass of their own: inside this loop they cost more (measured on
// a 2-core EPYC VM), the longer loop body leaving fewer of their cache misses in flight.
py::object read_gradients(py::handle params, py::handle data_ptr) {
  const Items items(params, "read_gradients: params must be a sequence");
  const Py_ssize_t n = items.size();
  const MethodSite address_of(data_ptr.ptr());
  GetsetSite& grad_of = grad_site();
  GetsetSite& dtype_of = dtype_site();
  py::list grads(n);  // empty slots until filled (safe to free)
  py::bytes key(nullptr, static_cast<size_t>(n) * 2 * sizeof(uint64_t));
  auto* words = reinterpret_cast<uint64_t*>(PyBytes_AS_STRING(key.ptr()));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = grad_of.get(items[i].ptr());
    if (grad == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(grads.ptr(), i, grad);
    if (!read_address(address_of, grad, &words[2 * i])) return no_storage();
    PyObject* dtype = dtype_of.get(grad);
    if (dtype == nullptr) throw py::error_already_set();
    words[2 * i + 1] = reinterpret_cast<uintptr_t>(dtype);
    Py_DECREF(dtype);  // a torch.dtype lives as long as torch
  }
  return py::make_tuple(grads, key);
}

// Whether `data_ptr(t)` of each tensor equals the native uint64 at its index in `key` (as
// array('Q', addresses).tobytes() builds it): the params' per-step check that no `.data`
// was swapped, without a list of Python ints. False, not an error, for a length that
// differs, a non-tensor or a tensor without storage.
bool addresses_equal(py::handle tensors, py::bytes key, py::handle data_ptr) {
  const Items items(tensors, "addresses_equal: tensors must be a sequence");
  const Py_ssize_t n = items.size();
  char* bytes = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(key.ptr(), &bytes, &size) != 0) throw py::error_already_set();
  if (size != n * static_cast<Py_ssize_t>(sizeof(uint64_t))) return false;
  const MethodSite address_of(data_ptr.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    uint64_t address = 0;
    if (!read_address(address_of, items[i].ptr(), &address)) {
      clear_no_storage_error();
      return false;
    }
    uint64_t expected;
    std::memcpy(&expected, bytes + i * sizeof(uint64_t), sizeof(uint64_t));
    if (address != expected) return false;
  }
  return true;
}

// Whether sequences `a` and `b` hold the very same objects in the same order: the
// per-step check that a group's params are the plan's, as one memcmp of the two arrays of
// object pointers instead of a Python `is` per param.
bool same_items(py::handle a, py::handle b) {
  const Items x(a, "same_items: a must be a sequence");
  const Items y(b, "same_items: b must be a sequence");
  if (x.size() != y.size()) return false;
  return x.size() == 0 ||
         std::memcmp(x.data(), y.data(), static_cast<size_t>(x.size()) * sizeof(PyObject*)) == 0;
}

// round_nearest_fp16 (the spec's integer formula, adamw_element.cuh) of the fp32 patterns
// first, first + 1, ..., first + count - 1, as uint16s at `out`, on `threads` OpenMP threads.
void fp16_nearest_patterns(uintptr_t out, uint64_t first, int64_t count, int threads) {
  if (out == 0 || count < 0 || first + static_cast<uint64_t>(count) > (uint64_t{1} << 32) ||
      threads < 1) {
    throw py::value_error("fp16_nearest_patterns needs an address, count >= 0, "
                          "first + count <= 2**32 and threads >= 1");
  }
  uint16_t* dst = address<uint16_t>(out);
  py::gil_scoped_release release;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    dst[i] = static_cast<uint16_t>(
        isa_binding::rlvr_optim::round_nearest_fp16(static_cast<uint32_t>(first + i)));
  }
}

// The float16 conversions of instruction set `isa`'s loops (cpu_step.h): fp32 patterns
// first .. first + count - 1 rounded into the uint16s at `out` (nearest even; stochastic
// with the uint16 at random16 + 2k for pattern k when random16 is not 0), or, with
// values=true, the fp32 values of the count uint16 patterns at `first` (an address) into
// `out`.
void fp16_loop_conversions(const std::string& isa, uintptr_t out, uint64_t first, int64_t count,
                           uintptr_t random16, bool values) {
  const Isa& chosen = usable_isa(isa);
  if (out == 0 || count < 0 || (values && first == 0) ||
      (!values && first + static_cast<uint64_t>(count) > (uint64_t{1} << 32))) {
    throw py::value_error("fp16_loop_conversions needs an address, count >= 0, and "
                          "first + count <= 2**32 (or an input address, with values)");
  }
  py::gil_scoped_release release;
  if (values) {
    chosen.fp16_values(address<const uint16_t>(first), address<float>(out), count);
  } else {
    chosen.fp16_round(address<uint16_t>(out), first, count, address<const uint16_t>(random16));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace rlvr_optim

PYBIND11_MODULE(_cpu, m) {
  using namespace rlvr_optim;
  using namespace rlvr_optim::cpu;
  m.doc() = "rlvr_optim's CPU step, on raw host addresses (see csrc/cpu_step.h).";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::tuple fields(static_cast<size_t>(kRowInt64s));
  for (int i = 0; i < kRowInt64s; ++i) fields[i] = py::str(kRowFields[i]);
  m.attr("ROW_FIELDS") = fields;
  py::tuple counters(static_cast<size_t>(kCounters));
  for (int i = 0; i < kCounters; ++i) counters[i] = py::str(kCounterNames[i]);
  m.attr("COUNTER_NAMES") = counters;
  py::dict layout;
  layout["param_bf16"] = kLayoutParamBf16;
  layout["grad_bf16"] = kLayoutGradBf16;
  layout["state_bf16"] = kLayoutStateBf16;
  layout["amsgrad"] = kLayoutAmsgrad;
  layout["master_fp32"] = kLayoutMasterFp32;
  layout["remainder"] = kLayoutRemainder;
  layout["stochastic"] = kLayoutStochastic;
  layout["track"] = kLayoutTrack;
  layout["param_fp16"] = kLayoutParamFp16;
  layout["image_fp16"] = kLayoutImageFp16;
  layout["grad_fp16"] = kLayoutGradFp16;
  layout["vector_aligned"] = kLayoutVectorAligned;
  layout["bitmap_aligned"] = kLayoutBitmapAligned;
  m.attr("LAYOUT_BITS") = layout;
  py::tuple isas(usable_isas().size());
  for (size_t i = 0; i < usable_isas().size(); ++i) isas[i] = py::str(usable_isas()[i].name);
  m.attr("ISAS") = isas;
  m.def("step", &step, py::arg("isa"), py::arg("rows"), py::arg("num_tensors"),
        py::arg("scalars"), py::arg("sr_keys"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("maximize"), py::arg("l2_decay"), py::arg("threads"),
        "One AdamW step of a table of host tensors (rows: num_tensors x len(ROW_FIELDS) "
        "int64s) with the instruction set `isa` (one of ISAS) on `threads` OpenMP threads. "
        "Addresses are ints, 0 for absent.");
  m.def("read_gradients", &read_gradients, py::arg("params"), py::arg("data_ptr"),
        "(grads, key) in one pass, key the native uint64s (data_ptr, dtype address) of each "
        "grad; None when a grad has no storage. data_ptr is torch.Tensor.data_ptr.");
  m.def("addresses_equal", &addresses_equal, py::arg("tensors"), py::arg("key"),
        py::arg("data_ptr"),
        "Whether data_ptr(t) of each tensor equals the native uint64 at its index in key; "
        "False for another length, a non-tensor or no storage.");
  m.def("same_items", &same_items, py::arg("a"), py::arg("b"),
        "Whether sequences a and b hold the very same objects in the same order.");
  m.def("loop_of", [](const std::string& isa, int64_t layout) {
          return std::string(usable_isa(isa).loop_of(layout));
        }, py::arg("isa"), py::arg("layout"),
        "The loop of instruction set isa that steps the whole 8-element groups of a row of "
        "this layout code: 'step_span' (the spec loop), 'vector_span', 'fast_span, "
        "vector_span' or 'none'.");
  m.def("fp16_loop_conversions", &fp16_loop_conversions, py::arg("isa"), py::arg("out"),
        py::arg("first"), py::arg("count"), py::arg("random16"), py::arg("values"),
        "The float16 conversions of one instruction set's loops, for tests: fp32 patterns "
        "first .. first + count - 1 rounded to float16 (nearest even, or stochastic with the "
        "uint16s at address random16 when it is not 0) into the uint16s at address out; with "
        "values=True the fp32 values of the count float16 patterns at address first.");
  m.def("fp16_nearest_patterns", &fp16_nearest_patterns, py::arg("out"), py::arg("first"),
        py::arg("count"), py::arg("threads"),
        "Writes the spec's nearest-even float16 pattern of each fp32 pattern first .. first + "
        "count - 1 (as uint16) to the address out, on `threads` OpenMP threads.");
}
