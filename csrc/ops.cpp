// Schemas of every compiled fastsft op, defined once, and their CPU kernels. CUDA kernels register
// themselves in their .cu files; fake (meta) implementations live in Python beside each op's wrapper.
#include <torch/library.h>

#include "cross_entropy/cross_entropy.h"

TORCH_LIBRARY(fastsft, m) {
  m.def(
      "cross_entropy_rows(Tensor(a!) logits, Tensor labels, Tensor grad_scale, float scale, float softcap, int ignore_index, "
      "bool compute_grad, bool compute_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsft, CPU, m) {
  m.impl("cross_entropy_rows", &fastsft::cross_entropy_rows_cpu);
}
