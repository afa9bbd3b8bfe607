// The op schema, declared once; kernels register per device (redistribute_cpu.cpp, cuda/redistribute.cu).
// Also the Python module red_kernels._C, whose import runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu_isa.h"

#ifndef RED_KERNELS_CUDA_ARCH_LIST
#define RED_KERNELS_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(red_kernels, m) {
  m.def(
      "redistribute(Tensor hidden, Tensor weight, Tensor? bias, Tensor mask, Tensor start, bool baseline_zero)"
      " -> (Tensor scores, Tensor rewards, Tensor token_rewards, Tensor last_index)");
  m.def(
      "redistribute_backward(Tensor grad_scores, Tensor grad_rewards, Tensor grad_token_rewards, Tensor hidden,"
      " Tensor weight, Tensor mask, Tensor start, Tensor last_index, bool baseline_zero, bool[3] output_mask)"
      " -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Packed sequences (docs/spec.md section 5): hidden [T, H], cu_seqlens int64 [N+1], seq_lens and start int64 [N],
  // prev_scores float32 [N] (NaN: no carried baseline).
  m.def(
      "redistribute_varlen(Tensor hidden, Tensor weight, Tensor? bias, Tensor cu_seqlens, Tensor seq_lens,"
      " Tensor start, Tensor? prev_scores, bool baseline_zero)"
      " -> (Tensor scores, Tensor rewards, Tensor token_rewards, Tensor last_index)");
  m.def(
      "redistribute_varlen_backward(Tensor grad_scores, Tensor grad_rewards, Tensor grad_token_rewards,"
      " Tensor hidden, Tensor weight, Tensor cu_seqlens, Tensor seq_lens, Tensor start, Tensor last_index,"
      " bool baseline_zero, bool[3] output_mask) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

namespace {

PyObject* build_flags(PyObject*, PyObject*) {
#ifdef RED_KERNELS_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  // "8.0;9.0+PTX" -> ["8.0", "9.0+PTX"]
  PyObject* separator = PyUnicode_FromString(";");
  PyObject* all = PyUnicode_FromString(RED_KERNELS_CUDA_ARCH_LIST);
  PyObject* archs = PyUnicode_GET_LENGTH(all) > 0 ? PyUnicode_Split(all, separator, -1) : PyList_New(0);
  Py_DECREF(separator);
  Py_DECREF(all);
  PyObject* flags = Py_BuildValue("{s:O,s:N}", "cuda", cuda, "cuda_arch_list", archs);
  return flags;
}

PyObject* get_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(red_kernels::cpu_isa_name()); }

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!red_kernels::set_cpu_isa(name)) {
    PyErr_Format(PyExc_ValueError, "isa: expected one of %s (what this CPU supports), got '%s'",
                 red_kernels::supported_cpu_isas(), name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"build_flags", build_flags, METH_NOARGS, "What the extension was compiled with."},
    {"cpu_isa", get_cpu_isa, METH_NOARGS, "The instruction set the CPU kernel uses."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Pin the CPU kernel to 'avx512', 'avx2' or 'scalar' (for tests)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "red_kernels compiled ops", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
