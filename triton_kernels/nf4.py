"""NF4 dequantization in Triton, bit-for-bit equal to bitsandbytes' ``dequantize_4bit`` (see fastsft.reference.nf4).

One program per ``BYTES`` packed bytes (``2 * BYTES`` elements: many absmax blocks): contiguous byte loads
(vectorized to 16 bytes), both nibbles decoded through the 16-entry code table, each scaled by its block's
float32 absmax (decoded first from its uint8 code when double-quantized), the two halves interleaved with
``tl.join`` and stored contiguously; bfloat16 rounded to nearest even explicitly. Launched with ``enable_fp_fusion=False``: the nested scale is a float32
product then a float32 sum, and an FMA would round once instead of twice and differ from bitsandbytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import cdiv, eager_direct_triton_op, launcher

from fastsft.fakes import dequantize_nf4_fake

BYTES = 1024  # packed bytes a program (2048 elements)


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, out_ptr, n, n_bytes, offset,
                           blocksize2, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: element indices pass 2**31 for big weights
    byte = pid * BYTES + tl.arange(0, BYTES)
    bmask = byte < n_bytes
    b = tl.load(packed_ptr + byte, mask=bmask, other=0).to(tl.int32)
    block = (byte * 2) // BLOCKSIZE  # elements 2i and 2i + 1 share a block (BLOCKSIZE is even)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=bmask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // blocksize2, mask=bmask, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=bmask, other=0.0)
    high = tl.load(code_ptr + (b >> 4)) * scale  # element 2i: the high nibble
    low = tl.load(code_ptr + (b & 15)) * scale
    vals = tl.reshape(tl.join(high, low), [2 * BYTES])
    elem = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the same bits as the GPU's cvt.rn.bf16.f32, and Triton's CPU interpreter
        # would truncate. (The values are finite: NaN needs no special case.)
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = vals.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + elem, out, mask=elem < n)


@eager_direct_triton_op("fastsft::dequantize_nf4_triton", mutates_args={"out"})
def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor], blocksize: int,
                   nested_blocksize: int, offset: float, out: torch.Tensor) -> None:
    """Write the dequantized weight into ``out`` (contiguous, flat): see ``fastsft::dequantize_nf4``."""
    n, n_bytes = out.numel(), packed.numel()
    if n == 0:
        return
    nested = nested_absmax is not None
    grid = (cdiv(n_bytes, BYTES),)
    launcher(_dequantize_nf4_kernel)[grid](
        packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code, out, n, n_bytes,
        offset, nested_blocksize, BLOCKSIZE=blocksize, NESTED=nested, BYTES=BYTES, num_warps=4,
        enable_fp_fusion=False)


# Explicit fake, shared with the compiled op: the traced default would launch the kernel on fake tensors under
# TRITON_INTERPRET.
dequantize_nf4.register_fake(dequantize_nf4_fake)
