// CUDA kernels for rms_norm_forward / rms_norm_backward. One block per row in the forward pass, 16-byte loads
// where every row is aligned. The backward pass runs a fixed grid of blocks over the rows; each block adds its
// rows' weight-gradient terms to its own float32 row of partial sums (each column owned by one thread, rows in
// a fixed order), reduced afterwards: deterministic, no atomics.
#include "rms_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastsft {
namespace {

__device__ float block_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  const int warps = (blockDim.x + 31) / 32;
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < warps; ++w) r += shared[w];
  __syncthreads();
  return r;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store(scalar_t* p, const Pack<scalar_t, VEC>& v) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = v;
}

// H is a multiple of VEC (VEC = 1 otherwise); blockDim.x is a multiple of 32.
template <typename scalar_t, int VEC, bool HAS_RES>
__global__ void rms_norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                                        const scalar_t* __restrict__ w, scalar_t* __restrict__ y,
                                        scalar_t* __restrict__ s, float* __restrict__ rstd, int64_t H, float eps,
                                        float offset) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * H;  // 64-bit: rows * H can pass 2**31
  const scalar_t* src = HAS_RES ? s + base : x + base;
  float sq = 0.f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < H; j += static_cast<int64_t>(blockDim.x) * VEC) {
    Pack<scalar_t, VEC> a = load<scalar_t, VEC>(x + base + j);
    if (HAS_RES) {
      const Pack<scalar_t, VEC> b = load<scalar_t, VEC>(res + base + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) a.v[k] = static_cast<scalar_t>(static_cast<float>(a.v[k]) + static_cast<float>(b.v[k]));
      store<scalar_t, VEC>(s + base + j, a);  // read back below by this same thread
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = static_cast<float>(a.v[k]);
      sq += v * v;
    }
  }
  const float rs = rsqrtf(block_sum(sq, shared) / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < H; j += static_cast<int64_t>(blockDim.x) * VEC) {
    const Pack<scalar_t, VEC> a = load<scalar_t, VEC>(src + j);
    const Pack<scalar_t, VEC> wv = load<scalar_t, VEC>(w + j);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      out.v[k] = static_cast<scalar_t>(static_cast<float>(a.v[k]) * rs * (static_cast<float>(wv.v[k]) + offset));
    store<scalar_t, VEC>(y + base + j, out);
  }
}

template <typename scalar_t, int VEC, bool HAS_GS, bool DW>
__global__ void rms_norm_backward_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ gs,
                                         const scalar_t* __restrict__ s, const scalar_t* __restrict__ w,
                                         const float* __restrict__ rstd, scalar_t* __restrict__ dx,
                                         float* __restrict__ partial, int64_t rows, int64_t H, float offset) {
  __shared__ float shared[32];
  float* dw = DW ? partial + static_cast<int64_t>(blockIdx.x) * H : nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * H;
    const float rs = rstd[row];
    float dot = 0.f;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < H; j += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<scalar_t, VEC> g = load<scalar_t, VEC>(gy + base + j);
      const Pack<scalar_t, VEC> a = load<scalar_t, VEC>(s + base + j);
      const Pack<scalar_t, VEC> wv = load<scalar_t, VEC>(w + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        dot += static_cast<float>(g.v[k]) * (static_cast<float>(wv.v[k]) + offset) * static_cast<float>(a.v[k]);
    }
    const float mean = block_sum(dot, shared) * rs / static_cast<float>(H);
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < H; j += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<scalar_t, VEC> g = load<scalar_t, VEC>(gy + base + j);
      const Pack<scalar_t, VEC> a = load<scalar_t, VEC>(s + base + j);
      const Pack<scalar_t, VEC> wv = load<scalar_t, VEC>(w + j);
      Pack<scalar_t, VEC> gsv;
      if (HAS_GS) gsv = load<scalar_t, VEC>(gs + base + j);
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = static_cast<float>(a.v[k]) * rs;
        const float gf = static_cast<float>(g.v[k]);
        float d = rs * (gf * (static_cast<float>(wv.v[k]) + offset) - xhat * mean);
        if (HAS_GS) d += static_cast<float>(gsv.v[k]);
        out.v[k] = static_cast<scalar_t>(d);
        if (DW) dw[j + k] += gf * xhat;  // this thread owns columns j..j+VEC-1 of its block's partial row
      }
      store<scalar_t, VEC>(dx + base + j, out);
    }
  }
}

int threads_for(int64_t H, int vec) {
  int64_t t = 32;
  while (t < 1024 && t * vec < H) t *= 2;
  return static_cast<int>(t);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

RmsNormForwardResult rms_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& residual, double eps, double offset) {
  check_rms_norm_forward_args(x, weight, residual, eps);
  TORCH_CHECK(x.size(0) <= 0x7fffffff, "rms_norm: too many rows for one launch");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), H = x.size(1);
  const bool has_res = residual.has_value();
  at::Tensor y = at::empty_like(x);
  at::Tensor s = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || H == 0) return {y, s, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* res = has_res ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = has_res ? s.data_ptr<scalar_t>() : nullptr;
    const bool vec = H % kVec == 0 && aligned16(x.data_ptr()) && aligned16(y.data_ptr()) &&
                     aligned16(weight.data_ptr()) && (!has_res || (aligned16(res) && aligned16(sp)));
    auto go = [&](auto kernel, int v) {
      kernel<<<static_cast<unsigned>(rows), threads_for(H, v), 0, stream>>>(
          x.data_ptr<scalar_t>(), res, weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sp,
          rstd.data_ptr<float>(), H, static_cast<float>(eps), static_cast<float>(offset));
    };
    if (vec) {
      has_res ? go(rms_norm_forward_kernel<scalar_t, kVec, true>, kVec) : go(rms_norm_forward_kernel<scalar_t, kVec, false>, kVec);
    } else {
      has_res ? go(rms_norm_forward_kernel<scalar_t, 1, true>, 1) : go(rms_norm_forward_kernel<scalar_t, 1, false>, 1);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s, rstd};
}

RmsNormBackwardResult rms_norm_backward_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                             const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd,
                                             double offset, bool compute_weight_grad) {
  check_rms_norm_backward_args(grad_y, grad_sum, s, weight, rstd);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t rows = s.size(0), H = s.size(1);
  const bool has_gs = grad_sum.has_value();
  at::Tensor dx = at::empty_like(s);
  auto f32 = s.options().dtype(at::kFloat);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(rows, 4LL * sms));
  at::Tensor partial = compute_weight_grad ? at::zeros({grid, H}, f32) : at::empty({0}, f32);
  if (rows > 0 && H > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rms_norm_backward_cuda", [&] {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const scalar_t* gs = has_gs ? grad_sum->data_ptr<scalar_t>() : nullptr;
      const bool vec = H % kVec == 0 && aligned16(grad_y.data_ptr()) && aligned16(s.data_ptr()) &&
                       aligned16(weight.data_ptr()) && aligned16(dx.data_ptr()) && (!has_gs || aligned16(gs));
      auto go = [&](auto kernel, int v) {
        kernel<<<static_cast<unsigned>(grid), threads_for(H, v), 0, stream>>>(
            grad_y.data_ptr<scalar_t>(), gs, s.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
            rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(), compute_weight_grad ? partial.data_ptr<float>() : nullptr,
            rows, H, static_cast<float>(offset));
      };
      // (has grad_sum, weight grad) x (vectorized or not): eight instantiations.
      auto pick = [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        if (has_gs) {
          compute_weight_grad ? go(rms_norm_backward_kernel<scalar_t, V, true, true>, V)
                              : go(rms_norm_backward_kernel<scalar_t, V, true, false>, V);
        } else {
          compute_weight_grad ? go(rms_norm_backward_kernel<scalar_t, V, false, true>, V)
                              : go(rms_norm_backward_kernel<scalar_t, V, false, false>, V);
        }
      };
      if (vec) {
        pick(std::integral_constant<int, kVec>{});
      } else {
        pick(std::integral_constant<int, 1>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor dw = compute_weight_grad ? partial.sum(0) : at::empty({0}, f32);
  return {dx, dw};
}

}  // namespace fastsft

TORCH_LIBRARY_IMPL(fastsft, CUDA, m) {
  m.impl("rms_norm_forward", &fastsft::rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &fastsft::rms_norm_backward_cuda);
}
