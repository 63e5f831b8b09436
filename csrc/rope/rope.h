// Rotary position embedding of Q and K in one call, transformers' rotate_half convention (see ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastsft {

// q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D], all contiguous, one dtype. Returns new (q, k):
// x * cos + rotate_half(x) * sin, or with inverse the transposed rotation (the backward pass).
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse);

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace fastsft
