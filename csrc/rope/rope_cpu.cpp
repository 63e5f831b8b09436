// CPU kernel for rope: the same per-element rotation as the CUDA and Triton kernels, in float32.
#include "rope.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace fastsft {

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope: q and k must be 4-D [batch, heads, seq, head_dim], got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "rope: q ", q.sizes(), " and k ", k.sizes(), " must agree on batch, seq and head_dim");
  TORCH_CHECK(q.size(3) % 2 == 0, "rope: head_dim must be even, got ", q.size(3));
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == q.size(0) || cos.size(0) == 1) &&
                  cos.size(1) == q.size(2) && cos.size(2) == q.size(3),
              "rope: cos and sin must be [batch or 1, seq, head_dim] = [", q.size(0), ", ", q.size(2), ", ",
              q.size(3), "], got ", cos.sizes(), " and ", sin.sizes());
  auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "rope: q must be float32, float16 or bfloat16, got ", dt);
  for (const at::Tensor* t : {&k, &cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == dt, "rope: q, k, cos and sin must share a dtype, got ", dt, " and ",
                t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "rope: all tensors must be on one device, got ", q.device(), " and ",
                t->device());
  }
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rope: q, k, cos and sin must be contiguous");
}

namespace {

template <typename scalar_t>
void rotate_cpu(const scalar_t* x, scalar_t* out, const scalar_t* cos, const scalar_t* sin, int64_t B, int64_t H,
                int64_t S, int64_t D, int64_t cos_batch_stride, bool inverse) {
  const int64_t half = D / 2;
  at::parallel_for(0, B * H * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i = (b * H + h) * S + s
      const int64_t s = i % S, b = i / (H * S);
      const scalar_t* c = cos + b * cos_batch_stride + s * D;
      const scalar_t* sn = sin + b * cos_batch_stride + s * D;
      const scalar_t* xr = x + i * D;
      scalar_t* o = out + i * D;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(xr[j]), x2 = static_cast<float>(xr[j + half]);
        const float c1 = static_cast<float>(c[j]), c2 = static_cast<float>(c[j + half]);
        const float s1 = static_cast<float>(sn[j]), s2 = static_cast<float>(sn[j + half]);
        // forward: (x1 c1 - x2 s1, x2 c2 + x1 s2); inverse (transpose): (x1 c1 + x2 s2, x2 c2 - x1 s1)
        o[j] = static_cast<scalar_t>(inverse ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1);
        o[j + half] = static_cast<scalar_t>(inverse ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  check_rope_args(q, k, cos, sin);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3);
  const int64_t cos_batch_stride = cos.size(0) == 1 ? 0 : S * D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cpu", [&] {
    rotate_cpu<scalar_t>(q.data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                         sin.data_ptr<scalar_t>(), B, q.size(1), S, D, cos_batch_stride, inverse);
    rotate_cpu<scalar_t>(k.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                         sin.data_ptr<scalar_t>(), B, k.size(1), S, D, cos_batch_stride, inverse);
  });
  return {q_out, k_out};
}

}  // namespace fastsft
