// Schemas of every compiled fastsft op, defined once, and their CPU kernels. CUDA kernels register
// themselves in their .cu files; fake (meta) implementations live in Python beside each op's wrapper.
#include <torch/library.h>

#include "cross_entropy/cross_entropy.h"
#include "nf4/nf4.h"
#include "rms_norm/rms_norm.h"
#include "rope/rope.h"

TORCH_LIBRARY(fastsft, m) {
  m.def(
      "cross_entropy_rows(Tensor(a!) logits, Tensor labels, Tensor grad_scale, float scale, float softcap, int ignore_index, "
      "bool compute_grad, bool compute_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, Tensor? residual, float eps, float offset) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor? grad_sum, Tensor s, Tensor weight, Tensor rstd, float offset, "
      "bool compute_weight_grad) -> (Tensor, Tensor)");
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
      "int blocksize, int nested_blocksize, float offset, Tensor(a!) out) -> ()");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsft, CPU, m) {
  m.impl("cross_entropy_rows", &fastsft::cross_entropy_rows_cpu);
  m.impl("rms_norm_forward", &fastsft::rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &fastsft::rms_norm_backward_cpu);
  m.impl("dequantize_nf4", &fastsft::dequantize_nf4_cpu);
  m.impl("rope", &fastsft::rope_cpu);
}
