"""The elementwise part of the fused LoRA MLP, in place, so that no extra [tokens, intermediate] buffer exists.

Forward: ``gate <- act(gate) * up`` (the activation overwrites the gate projection it came from).
Backward: from the recomputed ``gate`` and ``up`` projections and the gradient ``grad_h`` of the activation, one
pass writes ``gate <- d gate``, ``up <- d up`` and ``grad_h <- act(gate) * up`` (the recomputed activation, which
the down projection's adapter gradient needs). Each element is read and written by one program only, so the
in-place writes are safe. Float32 math, 64-bit offsets; the forward kernel and the backward's element-wise math
and gradient stores are ``gated_activation.py``'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import cdiv, eager_direct_triton_op, launcher

from fastsft.triton_kernels.gated_activation import ACTIVATION_CODES, _gated_forward_kernel, _store_gated_grads

_BLOCK = 1024


@triton.jit
def _lora_gated_backward_kernel(grad_h_ptr, gate_ptr, up_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(grad_h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = _store_gated_grads(gate_ptr, up_ptr, offs, mask, dh, g, u, ACT)  # d gate, d up over gate, up
    tl.store(grad_h_ptr + offs, (a * u).to(grad_h_ptr.dtype.element_ty), mask=mask)


@eager_direct_triton_op("fastsft::lora_gated_forward_triton", mutates_args={"gate"})
def lora_gated_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """``gate <- act(gate) * up`` for contiguous tensors of one shape and dtype; ``activation`` is
    ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``."""
    n = gate.numel()
    if n:
        # the gated activation's own kernel, writing over gate: each element is read, then written, by one program
        launcher(_gated_forward_kernel)[(cdiv(n, _BLOCK),)](
            gate, up, gate, n, ACT=ACTIVATION_CODES[activation], BLOCK=_BLOCK, num_warps=4)


@eager_direct_triton_op("fastsft::lora_gated_backward_triton", mutates_args={"grad_h", "gate", "up"})
def lora_gated_backward(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """In place: ``gate <- d gate``, ``up <- d up``, ``grad_h <- act(gate) * up`` (all contiguous, one shape and
    dtype)."""
    n = gate.numel()
    if n:
        launcher(_lora_gated_backward_kernel)[(cdiv(n, _BLOCK),)](
            grad_h, gate, up, n, ACT=ACTIVATION_CODES[activation], BLOCK=_BLOCK, num_warps=4)


def _fake_none(*args):
    return None


lora_gated_forward.register_fake(_fake_none)  # explicit: the traced default cannot run under TRITON_INTERPRET
lora_gated_backward.register_fake(_fake_none)
