"""Gated activations of the MLP, ``act(gate) * up``, forward and backward (SwiGLU, GeGLU exact and tanh).

Elementwise over flat contiguous tensors, float32 math, 64-bit offsets. The backward pass recomputes the
activation from ``gate`` and ``up`` (nothing else is saved) and writes both gradients in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import cdiv, eager_direct_triton_op, launcher
from fastsft.triton_kernels.math import tanh

from fastsft.fakes import gated_activation_backward_fake, gated_activation_forward_fake

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # the kernels' ACT argument

_BLOCK = 1024


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, WANT_GRAD: tl.constexpr):
    """act(g) and, when asked, act'(g); ACT 0: silu, 1: exact gelu, 2: tanh gelu."""
    d = g
    if ACT == 0:
        sig = tl.sigmoid(g)
        a = g * sig
        if WANT_GRAD:
            d = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        if WANT_GRAD:
            d = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = tanh(inner)
        a = 0.5 * g * (1.0 + t)
        if WANT_GRAD:
            d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return a, d


@triton.jit
def _store_gated_grads(dgate_ptr, dup_ptr, offs, mask, dy, g, u, ACT: tl.constexpr):
    """Stores d gate and d up of ``sum(dy * act(g) * u)`` (float32 blocks of dy, gate and up) and returns act(g).
    The stores are in here, not in the callers: computing the products first and storing them in the caller
    compiles to other sm_90 code (instruction order and registers), this to the code of the math written inline."""
    a, d = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offs, (dy * u * d).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)
    return a


@triton.jit
def _gated_forward_kernel(gate_ptr, up_ptr, out_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: n can pass 2**31
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, ACT: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_gated_grads(dgate_ptr, dup_ptr, offs, mask, dy, g, u, ACT)


@eager_direct_triton_op("fastsft::gated_activation_forward_triton", mutates_args={})
def gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` of contiguous tensors of one shape and dtype."""
    out = gated_activation_forward_fake(gate, up, activation)
    n = gate.numel()
    if n:
        launcher(_gated_forward_kernel)[(cdiv(n, _BLOCK),)](
            gate, up, out, n, ACT=ACTIVATION_CODES[activation], BLOCK=_BLOCK, num_warps=4)
    return out


@eager_direct_triton_op("fastsft::gated_activation_backward_triton", mutates_args={})
def gated_activation_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of ``sum(grad * act(gate) * up)``, all contiguous of one shape and dtype."""
    dgate, dup = gated_activation_backward_fake(grad, gate, up, activation)
    n = gate.numel()
    if n:
        launcher(_gated_backward_kernel)[(cdiv(n, _BLOCK),)](
            grad, gate, up, dgate, dup, n, ACT=ACTIVATION_CODES[activation], BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


gated_activation_forward.register_fake(gated_activation_forward_fake)  # explicit: see cross_entropy.py
gated_activation_backward.register_fake(gated_activation_backward_fake)
