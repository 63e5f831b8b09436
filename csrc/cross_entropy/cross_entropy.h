// Row-wise cross-entropy over a chunk of logits, gradient written in place (see cross_entropy_rows in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastsft {

// Gradient rows are of grad_scale[row] * loss[row] (grad_scale: float32, 1 value or 1 per row).
// Returns (loss [T] f32, lse [T] f32, entropy [T or 0] f32, argmax [T] i64). softcap <= 0 means none.
using CrossEntropyRowsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

CrossEntropyRowsResult cross_entropy_rows_cpu(at::Tensor& logits, const at::Tensor& labels,
                                              const at::Tensor& grad_scale, double scale,
                                              double softcap, int64_t ignore_index, bool compute_grad,
                                              bool compute_entropy);

#ifdef FASTSFT_WITH_CUDA
CrossEntropyRowsResult cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& labels,
                                              const at::Tensor& grad_scale, double scale,
                                               double softcap, int64_t ignore_index, bool compute_grad,
                                               bool compute_entropy);
#endif

// Shared argument checks (both devices); throws c10::Error with a readable message.
void check_cross_entropy_rows_args(const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& grad_scale);

}  // namespace fastsft
