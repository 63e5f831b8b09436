// CPU kernel for dequantize_nf4: the same float32 arithmetic as the CUDA and Triton kernels and bitsandbytes.
#include "nf4.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace fastsft {

namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, "dequantize_nf4: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "dequantize_nf4: ", name, " must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), "dequantize_nf4: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), "dequantize_nf4: ", name, " on ", t.device(), " but out on ", like.device());
}

}  // namespace

void check_dequantize_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, int64_t blocksize,
                               int64_t nested_blocksize, const at::Tensor& out) {
  const auto dt = out.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "dequantize_nf4: out must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(out.is_contiguous(), "dequantize_nf4: out must be contiguous");
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "dequantize_nf4: blocksize must be a power of two from 32 to 4096, got ", blocksize);
  const int64_t n = out.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  check_tensor(packed, "packed", at::kByte, (n + 1) / 2, out);
  check_tensor(code, "code", at::kFloat, 16, out);
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(),
              "dequantize_nf4: nested_absmax and nested_code come together");
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_blocksize > 0, "dequantize_nf4: nested_blocksize must be positive, got ", nested_blocksize);
    check_tensor(absmax, "absmax (nested codes)", at::kByte, blocks, out);
    check_tensor(*nested_absmax, "nested_absmax", at::kFloat, (blocks + nested_blocksize - 1) / nested_blocksize, out);
    check_tensor(*nested_code, "nested_code", at::kFloat, 256, out);
  } else {
    check_tensor(absmax, "absmax", at::kFloat, blocks, out);
  }
}

namespace {

template <typename scalar_t>
void dequantize_cpu(const uint8_t* packed, const float* scale, const float* code, scalar_t* out, int64_t n,
                    int64_t blocksize) {
  const int64_t n_bytes = (n + 1) / 2;
  at::parallel_for(0, n_bytes, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t b = packed[i];
      const float s = scale[(2 * i) / blocksize];  // elements 2i and 2i + 1 share a block (blocksize is even)
      out[2 * i] = static_cast<scalar_t>(code[b >> 4] * s);  // high nibble first
      if (2 * i + 1 < n) out[2 * i + 1] = static_cast<scalar_t>(code[b & 0xF] * s);
    }
  });
}

}  // namespace

void dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        int64_t blocksize, int64_t nested_blocksize, double offset, at::Tensor& out) {
  check_dequantize_nf4_args(packed, absmax, code, nested_absmax, nested_code, blocksize, nested_blocksize, out);
  const int64_t n = out.numel();
  if (n == 0) return;
  at::Tensor scale = absmax;
  if (nested_absmax.has_value()) {
    // As bitsandbytes: dequantize_blockwise (one float32 product) then += offset (one float32 sum), as separate
    // ATen ops so no compiler can fuse them into an FMA.
    const int64_t blocks = absmax.numel();
    at::Tensor second = nested_absmax->repeat_interleave(nested_blocksize).narrow(0, 0, blocks);
    scale = at::mul(nested_code->index_select(0, absmax.to(at::kLong)), second);
    scale = at::add(scale, at::full({}, static_cast<float>(offset), scale.options()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_nf4_cpu", [&] {
    dequantize_cpu<scalar_t>(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), code.data_ptr<float>(),
                             out.data_ptr<scalar_t>(), n, blocksize);
  });
}

}  // namespace fastsft
