"""Reference gated activations of the MLP: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gated_activation(gate, up, activation):
    """``act(gate) * up`` in float32 math or wider, returned in the input dtype. ``activation``: ``"silu"``,
    ``"gelu"`` (exact, erf) or ``"gelu_tanh"`` (the tanh approximation)."""
    dtype = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(dtype)
    if activation == "silu":
        a = F.silu(g)
    elif activation == "gelu":
        a = F.gelu(g)
    elif activation == "gelu_tanh":
        a = F.gelu(g, approximate="tanh")
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return (a * up.to(dtype)).to(gate.dtype)


def swiglu(gate, up):
    return gated_activation(gate, up, "silu")


def geglu(gate, up, approximate="none"):
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
