// The partialfc extension module: defines the `partialfc` op namespace and a small Python module so that
// `import partialfc._C` loads every op registered in csrc/ops/ (schemas) and csrc/ops/{cpu,cuda}/ (kernels).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(partialfc, m) {
  // Fake (meta) kernels and autograd formulas are registered from Python, in partialfc/_ext.py.
  m.set_python_module("partialfc._ext");
}

#ifdef PARTIALFC_WITH_CUDA
static const int kWithCuda = 1;
#else
static const int kWithCuda = 0;
#endif

namespace partialfc {
extern PyMethodDef image_fastpath_methods[];  // csrc/image_fastpath.cpp
}

static struct PyModuleDef partialfc_module = {
    PyModuleDef_HEAD_INIT, "_C", "Fused Partial FC kernels; the ops live in torch.ops.partialfc.", -1,
    partialfc::image_fastpath_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&partialfc_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
