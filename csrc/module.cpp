// Makes the operator library importable as `catalyst_fused._C`; importing it runs the TORCH_LIBRARY
// registrations. No Python bindings live here: everything is reached through torch.ops.catalyst_fused.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "catalyst_fused operator library (registers torch.ops.catalyst_fused.*)",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
