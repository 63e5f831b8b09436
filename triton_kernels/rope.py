"""Rotary position embedding of Q and K in one launch (transformers' rotate_half convention).

One program per token ``(b, s)``: it loads that token's cos/sin row once and rotates every head of Q and then
of K as ``[heads, head_dim / 2]`` tiles, in float32. Q and K may be strided views (as transformers'
``transpose(1, 2)`` leaves them) as long as the head dim is contiguous. The outputs take the inputs' memory
layout (``torch.empty_like``): for transformers' ``[B, S, H, D]`` storage seen as ``[B, H, S, D]``, each token's
heads are then written as one contiguous row, as they are read (a contiguous output would scatter them H ways).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import eager_direct_triton_op, launcher, next_power_of_2



def _layout_preserving_fake(q, k, cos, sin, inverse):
    """The outputs: ``empty_like`` keeps a dense input's strides (and is contiguous otherwise), in fake mode too."""
    return torch.empty_like(q), torch.empty_like(k)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, c1, c2, s1, s2, b, s, H, stride_b, stride_h, stride_s, o_sb, o_sh, o_ss, half,
                  INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (j < half)
    src = x_ptr + b * stride_b + h * stride_h + s * stride_s + j  # b, s are int64: no 32-bit overflow
    dst = o_ptr + b * o_sb + h * o_sh + s * o_ss + j
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transposed rotation: the backward pass
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(dst, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, o2.to(o_ptr.dtype.element_ty), mask=mask)


# S (the batch's sequence length) changes per batch: not specialized, so one compiled variant serves every batch
# (see flash_attention.PER_BATCH_ARGS)
@triton.jit(do_not_specialize=["S"])
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, Hq, Hk, S, half, cos_stride_b,
                 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss,
                 INVERSE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token % S
    j = tl.arange(0, BLOCK_D)[None, :]
    jm = j < half
    row = b * cos_stride_b + s * (2 * half)
    c1 = tl.load(cos_ptr + row + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row + half + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row + half + j, mask=jm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, c1, c2, s1, s2, b, s, Hq, q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss, half, INVERSE,
                  BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, c1, c2, s1, s2, b, s, Hk, k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss, half, INVERSE,
                  BLOCK_HK, BLOCK_D)


@eager_direct_triton_op("fastsft::rope_triton", mutates_args={})
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(q, k)`` rotated by ``cos``/``sin`` [B or 1, S, D] (contiguous), in the inputs' memory layout;
    ``inverse`` applies the transposed rotation. ``q``/``k`` [B, H, S, D] need only a contiguous last dim."""
    q_out, k_out = _layout_preserving_fake(q, k, cos, sin, inverse)
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    if B * S == 0 or D == 0:
        return q_out, k_out
    half = D // 2
    block_d = next_power_of_2(half)
    launcher(_rope_kernel)[(B * S,)](
        q, k, q_out, k_out, cos, sin, Hq, Hk, S, half, 0 if cos.shape[0] == 1 else S * D,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        INVERSE=inverse, BLOCK_HQ=next_power_of_2(Hq), BLOCK_HK=next_power_of_2(Hk), BLOCK_D=block_d,
        num_warps=4 if Hq * half <= 4096 else 8)
    return q_out, k_out


rope.register_fake(_layout_preserving_fake)  # explicit: the traced default would launch the kernel under
# TRITON_INTERPRET
