"""Row-wise cross-entropy over a chunk of logits, with the gradient written in place.

The fused linear cross-entropy computes logits a chunk of tokens at a time (cuBLAS), then this kernel runs one
program per token row: pass 1 finds the row's max, first argmax and log-sum-exp online; pass 2 recomputes the
softmax and overwrites the logits with d(loss_row)/d(raw logit) (softmax minus one-hot, through the scale and
the softcap), accumulating the entropy on the way. The chunk buffer thus never needs a second copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import eager_direct_triton_op, launcher, next_power_of_2
from fastsft.triton_kernels.math import tanh

from fastsft.fakes import cross_entropy_rows_fake


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scaled logits -> the logits the loss sees (``softcap * tanh(z / softcap)`` with a softcap), and tanh's value
    for the softcap's derivative (without a softcap, the logits again: unused)."""
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        return softcap * t, t
    else:
        return z, z


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, stride_row, labels_ptr, grad_scale_ptr, grad_scale_stride, loss_ptr, lse_ptr, entropy_ptr, argmax_ptr,
    V, ignore_index, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride can pass 2**31
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index

    # pass 1: online max / sum-exp, first argmax
    m = -float("inf")
    s = 0.0
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        z, _ = _capped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        block_max = tl.max(z, axis=0)
        block_arg = tl.argmax(z, axis=0)
        if block_max > best:  # strict: keeps the first index among equal maxima
            best = block_max
            best_idx = start + block_arg
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    z_label = 0.0
    if valid:
        z_label, _ = _capped(tl.load(row_ptr + label).to(tl.float32) * scale, softcap, HAS_SOFTCAP)
    loss = tl.where(valid, lse - z_label, 0.0)

    # pass 2: softmax again; entropy = lse - sum(p * z); gradient in place
    if COMPUTE_GRAD or COMPUTE_ENTROPY:
        pz = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            z, t = _capped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale, softcap, HAS_SOFTCAP)
            p = tl.exp(z - lse)
            if COMPUTE_ENTROPY:
                pz += tl.sum(tl.where(mask, p * z, 0.0), axis=0)
            if COMPUTE_GRAD:
                g = p - tl.where(offs == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                g = tl.where(valid, g * (scale * tl.load(grad_scale_ptr + row * grad_scale_stride)), 0.0)
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, lse - pz)

    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(argmax_ptr + row, best_idx.to(tl.int64))


def _block_size(vocab: int) -> int:
    return min(next_power_of_2(vocab), 4096)


@eager_direct_triton_op("fastsft::cross_entropy_rows_triton", mutates_args={"logits"})
def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor, scale: float, softcap: float,
                       ignore_index: int, compute_grad: bool, compute_entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, log-sum-exp, entropy (empty unless asked) and argmax of ``logits`` [T, V] (row stride 1
    within a row). ``softcap`` 0 means none. With ``compute_grad`` the logits are overwritten with the gradient
    of ``grad_scale[row] * loss[row]`` with respect to them (``grad_scale``: float32, one value or one per row),
    scaled in float32 before the single rounding to the logits' dtype."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    entropy = torch.empty(rows if compute_entropy else 0, device=logits.device, dtype=torch.float32)
    argmax = torch.empty(rows, device=logits.device, dtype=torch.int64)
    if rows == 0:
        return loss, lse, entropy, argmax
    block = _block_size(vocab)
    launcher(_cross_entropy_rows_kernel)[(rows,)](
        logits, logits.stride(0), labels, grad_scale, 0 if grad_scale.numel() == 1 else 1, loss, lse, entropy, argmax,
        vocab, ignore_index, scale, softcap,
        HAS_SOFTCAP=softcap > 0, COMPUTE_GRAD=compute_grad, COMPUTE_ENTROPY=compute_entropy, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss, lse, entropy, argmax


# An explicit fake, shared with the compiled op: the traced default would launch the kernel on fake tensors
# under TRITON_INTERPRET.
cross_entropy_rows.register_fake(cross_entropy_rows_fake)
