"""Gated activations of the MLP: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up`` (exact or tanh).

The ``triton`` backend computes in float32 and saves only ``gate`` and ``up``; the backward pass recomputes the
activation and writes both gradients in one elementwise pass. Backend choice for both functions is the op
``gated_activation`` (``FASTSFT_BACKEND_GATED_ACTIVATION``).
"""

from __future__ import annotations

import torch

from fastsft import backends
from fastsft.reference import gated_activation as reference

OP = "gated_activation"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (Llama, Mistral, Qwen MLPs), in float32 math, returned in the input dtype.

    ``gate`` and ``up``: one shape, one floating dtype, one device. ``backend``: ``"auto"``, ``"triton"`` or
    ``"reference"``.
    """
    _check("swiglu", gate, up)
    return backends.dispatch(OP, backend, gate.device, gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", *, backend: str = "auto") -> torch.Tensor:
    """``gelu(gate) * up`` (Gemma's MLP uses ``approximate="tanh"``), in float32 math, in the input dtype."""
    if approximate not in _APPROXIMATE:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check("geglu", gate, up)
    return backends.dispatch(OP, backend, gate.device, gate, up, _APPROXIMATE[approximate])


def _check(name, gate, up):
    for arg, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if not gate.is_floating_point() or gate.dtype != up.dtype:
        raise TypeError(f"{name}: gate and up must share a floating dtype, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"{name}: gate and up must be on one device, got {gate.device} and {up.device}")


@backends.register(OP, "reference")
def _reference_backend(gate, up, activation):
    return reference.gated_activation(gate, up, activation)


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(gate, up, activation):
    if gate.dtype not in _KERNEL_DTYPES:
        raise backends.Unsupported(f"gated activation: the triton backend takes {_KERNEL_DTYPES}, got {gate.dtype}; "
                        "use backend='reference' for float64")
    return _GatedActivation.apply(gate, up, activation)


class _GatedActivation(torch.autograd.Function):
    """The Triton kernels' forward and backward."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        from fastsft.triton_kernels.gated_activation import gated_activation_forward

        # the inputs themselves, not contiguous copies: a double backward differentiates through what is saved
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return gated_activation_forward(gate.contiguous(), up.contiguous(), activation)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable, the reference's
            inputs = [t for t, need in ((gate, need_gate), (up, need_up)) if need]
            out = reference.gated_activation(gate, up, ctx.activation)
            grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
            return (next(grads) if need_gate else None, next(grads) if need_up else None, None)
        from fastsft.triton_kernels.gated_activation import gated_activation_backward

        dgate, dup = gated_activation_backward(grad.contiguous(), gate.contiguous(), up.contiguous(), ctx.activation)
        return (dgate if need_gate else None, dup if need_up else None, None)


