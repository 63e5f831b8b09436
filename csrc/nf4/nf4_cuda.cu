// CUDA kernel for dequantize_nf4. Each thread decodes one 16-byte chunk of packed codes (32 elements, all in one
// absmax block since blocksize >= 32 is a power of two) with one 16-byte load and 16-byte stores, the tail and
// unaligned buffers element by element. The nested scale uses __fmul_rn/__fadd_rn: never contracted to an FMA,
// so it rounds twice in float32 exactly like bitsandbytes' dequantize_blockwise followed by `absmax += offset`.
#include "nf4.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastsft {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 16;  // packed bytes a thread

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <bool NESTED>
__device__ __forceinline__ float block_scale(const void* absmax, const float* __restrict__ nested_absmax,
                                             const float* __restrict__ nested_code, int64_t block,
                                             int64_t nested_blocksize, float offset) {
  if (NESTED) {
    const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
    return __fadd_rn(__fmul_rn(__ldg(nested_code + q), __ldg(nested_absmax + block / nested_blocksize)), offset);
  }
  return __ldg(static_cast<const float*>(absmax) + block);
}

template <typename scalar_t, bool NESTED>
__global__ void dequantize_nf4_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                                      const float* __restrict__ code, const float* __restrict__ nested_absmax,
                                      const float* __restrict__ nested_code, scalar_t* __restrict__ out, int64_t n,
                                      int blocksize_log2, int64_t nested_blocksize, float offset, bool aligned) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t n_bytes = (n + 1) / 2;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kChunk;
  if (first >= n_bytes) return;
  const float s = block_scale<NESTED>(absmax, nested_absmax, nested_code, (2 * first) >> blocksize_log2,
                                      nested_blocksize, offset);
  if (aligned && first + kChunk <= n_bytes && 2 * (first + kChunk) <= n) {
    const uint4 raw = *reinterpret_cast<const uint4*>(packed + first);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    constexpr int kPer16 = 16 / sizeof(scalar_t);
    scalar_t vals[2 * kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      vals[2 * k] = static_cast<scalar_t>(table[bytes[k] >> 4] * s);  // high nibble first
      vals[2 * k + 1] = static_cast<scalar_t>(table[bytes[k] & 0xF] * s);
    }
#pragma unroll
    for (int k = 0; k < 2 * kChunk / kPer16; ++k) {
      Pack<scalar_t, kPer16> p;
#pragma unroll
      for (int j = 0; j < kPer16; ++j) p.v[j] = vals[k * kPer16 + j];
      *reinterpret_cast<Pack<scalar_t, kPer16>*>(out + 2 * first + k * kPer16) = p;
    }
    return;
  }
  const int64_t last = first + kChunk < n_bytes ? first + kChunk : n_bytes;
  for (int64_t i = first; i < last; ++i) {
    const uint8_t b = packed[i];
    out[2 * i] = static_cast<scalar_t>(table[b >> 4] * s);
    if (2 * i + 1 < n) out[2 * i + 1] = static_cast<scalar_t>(table[b & 0xF] * s);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         int64_t blocksize, int64_t nested_blocksize, double offset, at::Tensor& out) {
  check_dequantize_nf4_args(packed, absmax, code, nested_absmax, nested_code, blocksize, nested_blocksize, out);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t chunks = ((n + 1) / 2 + kChunk - 1) / kChunk;
  const int64_t grid = (chunks + kThreads - 1) / kThreads;
  TORCH_CHECK(grid <= 0x7fffffff, "dequantize_nf4: too many elements for one launch");
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  const bool nested = nested_absmax.has_value();
  const bool aligned = aligned16(packed.data_ptr()) && aligned16(out.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_nf4_cuda", [&] {
    auto go = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(),
          nested ? nested_absmax->data_ptr<float>() : nullptr, nested ? nested_code->data_ptr<float>() : nullptr,
          out.data_ptr<scalar_t>(), n, log2, nested_blocksize, static_cast<float>(offset), aligned);
    };
    nested ? go(dequantize_nf4_kernel<scalar_t, true>) : go(dequantize_nf4_kernel<scalar_t, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastsft

TORCH_LIBRARY_IMPL(fastsft, CUDA, m) { m.impl("dequantize_nf4", &fastsft::dequantize_nf4_cuda); }
