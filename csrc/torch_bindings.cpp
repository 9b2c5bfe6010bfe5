// The extension module grace_kernels._C: CUDA implementations of op schemas that grace_kernels defines in
// Python (schemas, fakes and CPU implementations live beside the ops, so the package works without this
// module). Loading the module is what registers the implementations below.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "w4a16/w4a16.h"

namespace grace_kernels::w4a16 {
at::Tensor w4a16_matmul_repacked_cuda(const at::Tensor& x, const at::Tensor& kernel_packed,
                                      const at::Tensor& kernel_scales, int64_t group_size,
                                      const std::optional<at::Tensor>& bias);
at::Tensor w4a16_dequantize_repacked_cuda(const at::Tensor& kernel_packed, const at::Tensor& kernel_scales,
                                          int64_t group_size);
}

TORCH_LIBRARY_IMPL(grace_kernels, CUDA, m) {
  m.impl("w4a16_matmul_repacked", &grace_kernels::w4a16::w4a16_matmul_repacked_cuda);
  m.impl("w4a16_dequantize_repacked", &grace_kernels::w4a16::w4a16_dequantize_repacked_cuda);
}

// A near-empty Python module: importing it runs the static registrations above. (No pybind11: its headers
// would add to every build and nothing here is called from Python.) Its one attribute,
// dynamic_shared_memory, maps each kernel the extension launches to the shared memory it requests at launch,
// which cuobjdump cannot see; python -m grace_kernels.aot reports it. The keys are the kernels' names as
// written in the source (template arguments included), the names aot finds in the demangled symbols.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "grace_kernels CUDA kernels (torch.ops.grace_kernels)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  PyObject* smem = PyDict_New();
  if (m == nullptr || smem == nullptr) return nullptr;
  auto add = [smem](const std::string& name, int bytes) {
    PyObject* value = PyLong_FromLong(bytes);
    PyDict_SetItemString(smem, name.c_str(), value);
    Py_XDECREF(value);
  };
  namespace w = grace_kernels::w4a16;
  for (const std::string dtype : {"__half", "__nv_bfloat16"}) {
    for (int m_blocks : {1, 2, 4}) {
      add("w4a16_gemm_kernel<" + dtype + ", " + std::to_string(m_blocks) + ">", w::shared_bytes(m_blocks));
    }
    add("reduce_partials_kernel<" + dtype + ">", 0);
    add("w4a16_dequant_kernel<" + dtype + ">", w::dequantize_shared_bytes());
  }
  if (PyModule_AddObject(m, "dynamic_shared_memory", smem) < 0) {
    Py_DECREF(smem);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
