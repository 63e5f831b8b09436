// CUDA kernel for rope: Q and K in one launch. One block per token (b, s) reads that token's cos/sin row once
// and rotates every head of Q and then of K; consecutive threads take consecutive elements of a half-row.
#include "rope.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastsft {
namespace {

template <typename scalar_t>
__device__ __forceinline__ void rotate_heads(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                             const scalar_t* __restrict__ c, const scalar_t* __restrict__ sn,
                                             int64_t b, int64_t s, int64_t H, int64_t S, int64_t D, bool inverse) {
  const int64_t half = D / 2;
  for (int64_t idx = threadIdx.x; idx < H * half; idx += blockDim.x) {
    const int64_t h = idx / half, j = idx % half;
    const int64_t base = ((b * H + h) * S + s) * D;  // 64-bit: q can pass 2**31 elements
    const float x1 = static_cast<float>(x[base + j]), x2 = static_cast<float>(x[base + j + half]);
    const float c1 = static_cast<float>(c[j]), c2 = static_cast<float>(c[j + half]);
    const float s1 = static_cast<float>(sn[j]), s2 = static_cast<float>(sn[j + half]);
    out[base + j] = static_cast<scalar_t>(inverse ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1);
    out[base + j + half] = static_cast<scalar_t>(inverse ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2);
  }
}

template <typename scalar_t>
__global__ void rope_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            scalar_t* __restrict__ q_out, scalar_t* __restrict__ k_out,
                            const scalar_t* __restrict__ cos, const scalar_t* __restrict__ sin, int64_t Hq,
                            int64_t Hk, int64_t S, int64_t D, int64_t cos_batch_stride, bool inverse) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / S, s = token % S;
  const scalar_t* c = cos + b * cos_batch_stride + s * D;
  const scalar_t* sn = sin + b * cos_batch_stride + s * D;
  rotate_heads(q, q_out, c, sn, b, s, Hq, S, D, inverse);
  rotate_heads(k, k_out, c, sn, b, s, Hk, S, D, inverse);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool inverse) {
  check_rope_args(q, k, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3);
  const int64_t tokens = B * S;
  TORCH_CHECK(tokens <= 0x7fffffff, "rope: too many tokens for one launch");
  if (tokens == 0 || D == 0) return {q_out, k_out};
  const int64_t cos_batch_stride = cos.size(0) == 1 ? 0 : S * D;
  const int64_t work = std::max(q.size(1), k.size(1)) * (D / 2);
  const int threads = work >= 1024 ? 512 : (work >= 256 ? 256 : 128);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cuda", [&] {
    rope_kernel<scalar_t><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(),
        cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), q.size(1), k.size(1), S, D, cos_batch_stride, inverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q_out, k_out};
}

}  // namespace fastsft

TORCH_LIBRARY_IMPL(fastsft, CUDA, m) {
  m.impl("rope", &fastsft::rope_cuda);
}
