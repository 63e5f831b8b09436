// CPU kernel for cross_entropy_rows: the same two passes as the CUDA and Triton kernels, in float32.
#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace fastsft {

void check_cross_entropy_rows_args(const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& grad_scale) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_rows: logits must be 2-D [tokens, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "cross_entropy_rows: logits rows must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "cross_entropy_rows: labels must be [tokens] = [", logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cross_entropy_rows: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous(), "cross_entropy_rows: labels must be contiguous");
  TORCH_CHECK(labels.device() == logits.device(), "cross_entropy_rows: labels on ", labels.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.is_contiguous() &&
                  (grad_scale.numel() == 1 || grad_scale.numel() == logits.size(0)) &&
                  grad_scale.device() == logits.device(),
              "cross_entropy_rows: grad_scale must be a contiguous float32 tensor of 1 or [tokens] values on the "
              "logits' device");
  auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "cross_entropy_rows: logits must be float32, float16 or bfloat16, got ", dt);
}

namespace {

template <typename scalar_t>
void rows_cpu(scalar_t* logits, int64_t stride, const int64_t* labels, const float* grad_scale,
              int64_t grad_scale_stride, float* loss, float* lse_out,
              float* entropy, int64_t* argmax, int64_t rows, int64_t vocab, int64_t ignore_index, float scale,
              float softcap, bool compute_grad, bool compute_entropy) {
  const bool has_cap = softcap > 0.f;
  auto transform = [&](float raw) { return has_cap ? softcap * std::tanh(raw / softcap) : raw; };
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* z = logits + r * stride;
      const int64_t label = labels[r];
      const bool valid = label != ignore_index;
      float m = -std::numeric_limits<float>::infinity(), s = 0.f;
      int64_t best = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        const float x = transform(static_cast<float>(z[v]) * scale);
        if (x > m) {  // strict: first index among equal maxima
          s = s * std::exp(m - x) + 1.f;
          m = x;
          best = v;
        } else {
          s += std::exp(x - m);
        }
      }
      const float lse = m + std::log(s);
      const float z_label = valid ? transform(static_cast<float>(z[label]) * scale) : 0.f;
      loss[r] = valid ? lse - z_label : 0.f;
      lse_out[r] = lse;
      argmax[r] = best;
      if (!compute_grad && !compute_entropy) continue;
      double pz = 0.0;
      for (int64_t v = 0; v < vocab; ++v) {
        const float raw = static_cast<float>(z[v]) * scale;
        const float t = has_cap ? std::tanh(raw / softcap) : 0.f;
        const float x = has_cap ? softcap * t : raw;
        const float p = std::exp(x - lse);
        pz += static_cast<double>(p) * x;
        if (compute_grad) {
          float g = p - (v == label ? 1.f : 0.f);
          if (has_cap) g *= 1.f - t * t;
          z[v] = static_cast<scalar_t>(valid ? g * (scale * grad_scale[r * grad_scale_stride]) : 0.f);
        }
      }
      if (compute_entropy) entropy[r] = lse - static_cast<float>(pz);
    }
  });
}

}  // namespace

CrossEntropyRowsResult cross_entropy_rows_cpu(at::Tensor& logits, const at::Tensor& labels,
                                              const at::Tensor& grad_scale, double scale,
                                              double softcap, int64_t ignore_index, bool compute_grad,
                                              bool compute_entropy) {
  check_cross_entropy_rows_args(logits, labels, grad_scale);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  at::Tensor entropy = at::empty({compute_entropy ? rows : 0}, f32);
  at::Tensor argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows_cpu", [&] {
    rows_cpu<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), labels.data_ptr<int64_t>(),
                       grad_scale.data_ptr<float>(), grad_scale.numel() == 1 ? 0 : 1,
                       loss.data_ptr<float>(), lse.data_ptr<float>(),
                       compute_entropy ? entropy.data_ptr<float>() : nullptr, argmax.data_ptr<int64_t>(), rows,
                       vocab, ignore_index, static_cast<float>(scale), static_cast<float>(softcap), compute_grad,
                       compute_entropy);
  });
  return {loss, lse, entropy, argmax};
}

}  // namespace fastsft
