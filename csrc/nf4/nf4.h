// NF4 dequantization, bit-for-bit equal to bitsandbytes' dequantize_4bit (see ops.cpp's schema and
// fastsft/reference/nf4.py for the layout and the exact float32 arithmetic).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastsft {

// Writes the n = out.numel() dequantized elements into `out` (contiguous, float32/float16/bfloat16):
// out[j] = out_dtype(code[q_j] * scale[j / blocksize]) in float32, q_j the 4-bit code of element j (element 2i
// in the high nibble of packed[i]). scale = absmax (float32), or with nested_absmax/nested_code (double
// quantization: absmax holds uint8 codes) scale[b] = (nested_code[absmax[b]] * nested_absmax[b / nested_blocksize])
// + offset, each op rounded to float32.
void dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        int64_t blocksize, int64_t nested_blocksize, double offset, at::Tensor& out);

// Shared argument checks (both devices); throw c10::Error with a readable message.
void check_dequantize_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, int64_t blocksize,
                               int64_t nested_blocksize, const at::Tensor& out);

}  // namespace fastsft
