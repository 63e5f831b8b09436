// RMSNorm over the last dim of a [rows, hidden] tensor, optionally of x + residual (see ops.cpp's schemas).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastsft {

// Returns (y [rows, H] in x's dtype, sum = x + residual [rows, H] or [0] without residual, rstd [rows] f32).
// y = s * rstd * (offset + weight), s = x (+ residual, rounded to x's dtype), rstd = 1 / sqrt(mean(s^2) + eps).
using RmsNormForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// Returns (grad of s [rows, H] in s's dtype, plus grad_sum when given; grad of weight [H] f32, or [0]).
using RmsNormBackwardResult = std::tuple<at::Tensor, at::Tensor>;

RmsNormForwardResult rms_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& residual, double eps, double offset);
RmsNormBackwardResult rms_norm_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                            const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd,
                                            double offset, bool compute_weight_grad);

// Shared argument checks (both devices); throw c10::Error with a readable message.
void check_rms_norm_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& residual, double eps);
void check_rms_norm_backward_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                  const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd);

}  // namespace fastsft
