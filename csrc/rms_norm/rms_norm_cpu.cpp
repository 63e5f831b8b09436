// CPU kernels for rms_norm_forward / rms_norm_backward: the same math as the CUDA and Triton kernels.
#include "rms_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace fastsft {

namespace {

void check_float_2d(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes(), "rms_norm: ", name, " must be [rows, hidden] = ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "rms_norm: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rms_norm: ", name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "rms_norm: ", name, " on ", t.device(), " but x on ", like.device());
}

}  // namespace

void check_rms_norm_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.dim() == 2, "rms_norm: x must be 2-D [rows, hidden], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "rms_norm: x must be contiguous");
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "rms_norm: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be a contiguous [", x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dt, "rms_norm: weight must be ", dt, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "rms_norm: weight on ", weight.device(), " but x on ", x.device());
  if (residual.has_value()) check_float_2d(*residual, "residual", x);
  TORCH_CHECK(eps > 0, "rms_norm: eps must be positive, got ", eps);
}

void check_rms_norm_backward_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                  const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_forward_args(s, weight, std::nullopt, 1.0);
  check_float_2d(grad_y, "grad_y", s);
  if (grad_sum.has_value()) check_float_2d(*grad_sum, "grad_sum", s);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == s.size(0) && rstd.scalar_type() == at::kFloat &&
                  rstd.is_contiguous() && rstd.device() == s.device(),
              "rms_norm: rstd must be a contiguous float32 [rows] on x's device");
}

namespace {

template <typename scalar_t>
void forward_cpu(const scalar_t* x, const scalar_t* res, const scalar_t* w, scalar_t* y, scalar_t* s, float* rstd,
                 int64_t rows, int64_t H, float eps, float offset) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x + r * H;
      if (res != nullptr) {
        scalar_t* sr = s + r * H;
        for (int64_t j = 0; j < H; ++j)
          sr[j] = static_cast<scalar_t>(static_cast<float>(src[j]) + static_cast<float>(res[r * H + j]));
        src = sr;
      }
      double sq = 0.0;
      for (int64_t j = 0; j < H; ++j) {
        const double v = static_cast<float>(src[j]);
        sq += v * v;
      }
      const float rs = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(H) + eps));
      rstd[r] = rs;
      scalar_t* yr = y + r * H;
      for (int64_t j = 0; j < H; ++j)
        yr[j] = static_cast<scalar_t>(static_cast<float>(src[j]) * rs * (static_cast<float>(w[j]) + offset));
    }
  });
}

// Rows in a part: each part owns one float32 row of weight-gradient partial sums, reduced afterwards in a
// fixed order, so the result does not depend on scheduling.
constexpr int64_t kRowsPerPart = 64;

template <typename scalar_t>
void backward_cpu(const scalar_t* gy, const scalar_t* gs, const scalar_t* s, const scalar_t* w, const float* rstd,
                  scalar_t* dx, float* partial, int64_t rows, int64_t H, float offset) {
  const int64_t parts = (rows + kRowsPerPart - 1) / kRowsPerPart;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dw = partial == nullptr ? nullptr : partial + p * H;
      for (int64_t r = p * kRowsPerPart; r < std::min(rows, (p + 1) * kRowsPerPart); ++r) {
        const scalar_t* g = gy + r * H;
        const scalar_t* sr = s + r * H;
        const float rs = rstd[r];
        double dot = 0.0;
        for (int64_t j = 0; j < H; ++j)
          dot += static_cast<double>(static_cast<float>(g[j]) * (static_cast<float>(w[j]) + offset)) *
                 (static_cast<float>(sr[j]) * rs);
        const float mean = static_cast<float>(dot / static_cast<double>(H));
        for (int64_t j = 0; j < H; ++j) {
          const float xhat = static_cast<float>(sr[j]) * rs;
          const float gf = static_cast<float>(g[j]);
          float d = rs * (gf * (static_cast<float>(w[j]) + offset) - xhat * mean);
          if (gs != nullptr) d += static_cast<float>(gs[r * H + j]);
          dx[r * H + j] = static_cast<scalar_t>(d);
          if (dw != nullptr) dw[j] += gf * xhat;
        }
      }
    }
  });
}

}  // namespace

RmsNormForwardResult rms_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& residual, double eps, double offset) {
  check_rms_norm_forward_args(x, weight, residual, eps);
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_forward_cpu", [&] {
    forward_cpu<scalar_t>(x.data_ptr<scalar_t>(), residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                          weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                          residual.has_value() ? s.data_ptr<scalar_t>() : nullptr, rstd.data_ptr<float>(), rows, H,
                          static_cast<float>(eps), static_cast<float>(offset));
  });
  return {y, s, rstd};
}

RmsNormBackwardResult rms_norm_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                            const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd,
                                            double offset, bool compute_weight_grad) {
  check_rms_norm_backward_args(grad_y, grad_sum, s, weight, rstd);
  const int64_t rows = s.size(0), H = s.size(1);
  const int64_t parts = (rows + kRowsPerPart - 1) / kRowsPerPart;
  at::Tensor dx = at::empty_like(s);
  auto f32 = s.options().dtype(at::kFloat);
  at::Tensor partial = compute_weight_grad ? at::zeros({parts, H}, f32) : at::empty({0}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rms_norm_backward_cpu", [&] {
    backward_cpu<scalar_t>(grad_y.data_ptr<scalar_t>(), grad_sum.has_value() ? grad_sum->data_ptr<scalar_t>() : nullptr,
                           s.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rstd.data_ptr<float>(),
                           dx.data_ptr<scalar_t>(), compute_weight_grad ? partial.data_ptr<float>() : nullptr, rows, H,
                           static_cast<float>(offset));
  });
  at::Tensor dw = compute_weight_grad ? partial.sum(0) : at::empty({0}, f32);
  return {dx, dw};
}

}  // namespace fastsft
