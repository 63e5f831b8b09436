// CUDA kernel for cross_entropy_rows: one block per token row, 16-byte loads where the row is aligned.
// Pass 1 reduces (max, sum-exp) online and the first argmax; pass 2 recomputes the softmax, accumulates the
// entropy and overwrites the row with d(loss)/d(raw logit).
#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastsft {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

struct ArgMax {
  float v;
  int64_t i;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

// Block-wide reductions through warp shuffles and one shared slot per warp; every thread gets the result.
__device__ MaxSum block_reduce(MaxSum x, MaxSum* shared) {
  for (int o = 16; o > 0; o >>= 1)
    x = combine(x, {__shfl_xor_sync(0xffffffff, x.m, o), __shfl_xor_sync(0xffffffff, x.s, o)});
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  MaxSum r = shared[0];
  for (int w = 1; w < kWarps; ++w) r = combine(r, shared[w]);
  __syncthreads();
  return r;
}

__device__ ArgMax block_reduce(ArgMax x, ArgMax* shared) {
  for (int o = 16; o > 0; o >>= 1)
    x = better(x, {__shfl_xor_sync(0xffffffff, x.v, o), __shfl_xor_sync(0xffffffff, x.i, o)});
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  ArgMax r = shared[0];
  for (int w = 1; w < kWarps; ++w) r = better(r, shared[w]);
  __syncthreads();
  return r;
}

__device__ float block_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < kWarps; ++w) r += shared[w];
  __syncthreads();
  return r;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 x) { return static_cast<float>(x); }

// VEC elements per load: 16 bytes when the row is aligned, 1 otherwise.
template <typename scalar_t, int VEC, bool HAS_CAP>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(
    scalar_t* __restrict__ logits, int64_t stride, const int64_t* __restrict__ labels,
    const float* __restrict__ grad_scale, int64_t grad_scale_stride, float* __restrict__ loss,
    float* __restrict__ lse_out, float* __restrict__ entropy, int64_t* __restrict__ argmax, int64_t vocab,
    int64_t ignore_index, float scale, float softcap, bool compute_grad, bool compute_entropy) {
  __shared__ MaxSum shared_ms[kWarps];
  __shared__ ArgMax shared_am[kWarps];
  __shared__ float shared_f[kWarps];
  struct alignas(sizeof(scalar_t) * VEC) Pack {
    scalar_t v[VEC];
  };

  const int64_t row = blockIdx.x;
  scalar_t* z = logits + row * stride;
  const int64_t label = labels[row];
  const bool valid = label != ignore_index;
  const float g_scale = scale * grad_scale[row * grad_scale_stride];
  auto transform = [&](float raw) { return HAS_CAP ? softcap * tanhf(raw / softcap) : raw; };

  MaxSum ms{-INFINITY, 0.f};
  ArgMax am{-INFINITY, vocab};
  for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < vocab; base += kThreads * VEC) {
    Pack pack;
    if (base + VEC <= vocab) {
      pack = *reinterpret_cast<const Pack*>(z + base);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) pack.v[j] = base + j < vocab ? z[base + j] : scalar_t(-INFINITY);
    }
    float x[VEC];
    float local_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      x[j] = base + j < vocab ? transform(to_float(pack.v[j]) * scale) : -INFINITY;
      if (x[j] > am.v) am = {x[j], base + j};  // in index order, so strict > keeps the first
      local_max = fmaxf(local_max, x[j]);
    }
    float local_sum = 0.f;
    const float m_new = fmaxf(ms.m, local_max);
    if (m_new != -INFINITY) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) local_sum += __expf(x[j] - m_new);
      ms = {m_new, ms.s * __expf(ms.m - m_new) + local_sum};
    }
  }
  ms = block_reduce(ms, shared_ms);
  am = block_reduce(am, shared_am);
  const float lse = ms.m + __logf(ms.s);
  if (threadIdx.x == 0) {
    // Read the label's logit before pass 2 overwrites the row; the barrier below orders the two.
    const float z_label = valid ? transform(to_float(z[label]) * scale) : 0.f;
    loss[row] = valid ? lse - z_label : 0.f;
    lse_out[row] = lse;
    argmax[row] = am.i;
  }
  __syncthreads();

  if (compute_grad || compute_entropy) {
    float pz = 0.f;
    for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < vocab; base += kThreads * VEC) {
      const bool full = base + VEC <= vocab;
      Pack pack;
      if (full) {
        pack = *reinterpret_cast<const Pack*>(z + base);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) pack.v[j] = base + j < vocab ? z[base + j] : scalar_t(0.f);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float raw = to_float(pack.v[j]) * scale;
        const float t = HAS_CAP ? tanhf(raw / softcap) : 0.f;
        const float x = HAS_CAP ? softcap * t : raw;
        const float p = __expf(x - lse);
        if (base + j < vocab) pz += p * x;
        float g = p - (base + j == label ? 1.f : 0.f);
        if (HAS_CAP) g *= 1.f - t * t;
        pack.v[j] = static_cast<scalar_t>(valid ? g * g_scale : 0.f);
      }
      if (compute_grad) {
        if (full) {
          *reinterpret_cast<Pack*>(z + base) = pack;
        } else {
          for (int j = 0; j < VEC && base + j < vocab; ++j) z[base + j] = pack.v[j];
        }
      }
    }
    if (compute_entropy) {
      pz = block_sum(pz, shared_f);
      if (threadIdx.x == 0) entropy[row] = lse - pz;
    }
  }
}

template <typename scalar_t, int VEC>
void launch(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& grad_scale, at::Tensor& loss, at::Tensor& lse, at::Tensor& entropy,
            at::Tensor& argmax, int64_t ignore_index, float scale, float softcap, bool compute_grad,
            bool compute_entropy) {
  const dim3 grid(static_cast<unsigned>(logits.size(0)));
  auto stream = at::cuda::getCurrentCUDAStream();
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), labels.data_ptr<int64_t>(), grad_scale.data_ptr<float>(),
        grad_scale.numel() == 1 ? 0 : 1, loss.data_ptr<float>(),
        lse.data_ptr<float>(), compute_entropy ? entropy.data_ptr<float>() : nullptr, argmax.data_ptr<int64_t>(),
        logits.size(1), ignore_index, scale, softcap, compute_grad, compute_entropy);
  };
  if (softcap > 0.f) {
    args(cross_entropy_rows_kernel<scalar_t, VEC, true>);
  } else {
    args(cross_entropy_rows_kernel<scalar_t, VEC, false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

CrossEntropyRowsResult cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& labels,
                                               const at::Tensor& grad_scale, double scale,
                                               double softcap, int64_t ignore_index, bool compute_grad,
                                               bool compute_entropy) {
  check_cross_entropy_rows_args(logits, labels, grad_scale);
  TORCH_CHECK(logits.size(0) <= 0x7fffffff, "cross_entropy_rows: too many rows for one launch");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  at::Tensor entropy = at::empty({compute_entropy ? rows : 0}, f32);
  at::Tensor argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return {loss, lse, entropy, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                         (logits.stride(0) * sizeof(scalar_t)) % 16 == 0;
    if (aligned) {
      launch<scalar_t, kVec>(logits, labels, grad_scale, loss, lse, entropy, argmax, ignore_index, static_cast<float>(scale),
                             static_cast<float>(softcap), compute_grad, compute_entropy);
    } else {
      launch<scalar_t, 1>(logits, labels, grad_scale, loss, lse, entropy, argmax, ignore_index, static_cast<float>(scale),
                          static_cast<float>(softcap), compute_grad, compute_entropy);
    }
  });
  return {loss, lse, entropy, argmax};
}

}  // namespace fastsft

TORCH_LIBRARY_IMPL(fastsft, CUDA, m) {
  m.impl("cross_entropy_rows", &fastsft::cross_entropy_rows_cuda);
}
