"""Reference LoRA projections: one linear, the fused QKV and the gated MLP, float32 math or wider.

A projection with a frozen base weight ``W`` [out, in] and an adapter ``A`` [r, in], ``B`` [out, r] is
``x @ W.T + scaling * (x @ A.T) @ B.T`` (PEFT's vanilla LoRA without dropout and without bias). ``W`` may be a
tensor or an object whose ``dequantize()`` returns the dense weight (a 4-bit base layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def dense_weight(weight) -> torch.Tensor:
    """The base weight as a tensor: itself, or what its ``dequantize()`` returns."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


def _projection(x, weight, lora_a, lora_b, scaling):
    """One LoRA projection in ``x``'s (wide) dtype."""
    w = dense_weight(weight).to(x.dtype)
    return x @ w.T + scaling * ((x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T)


def lora_linear(x, weight, lora_a, lora_b, scaling):
    """``x @ W.T + scaling * (x @ A.T) @ B.T``, returned in ``x``'s dtype."""
    xf = x.to(compute_dtype(x.dtype))
    return _projection(xf, weight, lora_a, lora_b, scaling).to(x.dtype)


def lora_qkv(x, q, k, v, scaling):
    """Three LoRA projections of one input; ``q``, ``k``, ``v`` are ``(W, A, B)`` triples."""
    xf = x.to(compute_dtype(x.dtype))
    return tuple(_projection(xf, *p, scaling).to(x.dtype) for p in (q, k, v))


def gated(gate, up, activation):
    """``act(gate) * up`` for the MLP's ``activation``: ``"swiglu"``, ``"geglu"`` or ``"geglu_tanh"``."""
    name = ACTIVATIONS[activation]
    if name == "silu":
        a = F.silu(gate)
    else:
        a = F.gelu(gate, approximate="tanh" if name == "gelu_tanh" else "none")
    return a * up


def lora_mlp(x, gate, up, down, scaling, activation="swiglu"):
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections, each a ``(W, A, B)`` triple.

    The intermediate activations are rounded to ``x``'s dtype between the projections, as the unfused model does
    in that dtype (a float64 input keeps everything in float64)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
    xf = x.to(compute_dtype(x.dtype))
    g = _projection(xf, *gate, scaling).to(x.dtype).to(xf.dtype)
    u = _projection(xf, *up, scaling).to(x.dtype).to(xf.dtype)
    h = gated(g, u, activation).to(x.dtype).to(xf.dtype)
    return _projection(h, *down, scaling).to(x.dtype)
