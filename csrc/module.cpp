// The Python module fastsft._C: importing it runs the static TORCH_LIBRARY registrations. It has no
// Python-level functions of its own; ops are reached through torch.ops.fastsft.
#include <Python.h>

static struct PyModuleDef fastsft_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastsft_c_module); }
