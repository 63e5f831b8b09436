"""Rotary position embedding of Q and K in one launch, from the cos/sin the model computes.

Taking the model's own per-token ``(cos, sin)`` (transformers' rotary embedding output) keeps every scaling
scheme right (Llama-3, YaRN, dynamic NTK, ...) and handles packed rows whose positions restart: positions are
already folded into cos/sin. The backward pass is the transposed rotation (by ``-sin`` when, as in every
transformers model, the two halves of cos/sin are equal).
"""

from __future__ import annotations

import torch

from fastsft.fakes import rope_fake
from fastsft import _extension, backends
from fastsft.reference import rope as reference

OP = "rope"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"):
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``, as transformers'
    ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``), computed in float32.

    Args:
        q: [batch, heads, seq, head_dim]; k: [batch, kv_heads, seq, head_dim] (GQA: any kv_heads); both of one
            floating dtype; views (e.g. after ``transpose(1, 2)``) are fine.
        cos, sin: [batch or 1, seq, head_dim] (or [seq, head_dim]), per token; cast to q's dtype if they differ
            (transformers already returns them in it). They receive no gradient.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see :mod:`fastsft.backends`).

    Returns new ``(q, k)`` in the input dtype.
    """
    _check(q, k, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return backends.dispatch(OP, backend, q.device, q, k, cos, sin)


def _check(q, k, cos, sin):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"rope: {name} must be floating point, got {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"rope: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq and head_dim")
    if D % 2:
        raise ValueError(f"rope: head_dim must be even, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    ok = (cos.dim() == 2 and tuple(cos.shape) == (S, D)) or (
        cos.dim() == 3 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (S, D))
    if not ok:
        raise ValueError(f"rope: cos and sin must be [{B} or 1, {S}, {D}] (batch, seq, head_dim), got "
                         f"{tuple(cos.shape)}")
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) > 1:
        raise ValueError(f"rope: all tensors must be on one device, got {sorted(map(str, devices))}")


# --- backends --------------------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(q, k, cos, sin):
    return reference.rope(q, k, cos, sin)


def _rotation(backend: str):
    """The kernel op of a fast backend: ``(q, k, cos, sin, inverse) -> (q_out, k_out)``."""
    if backend == "triton":
        from fastsft.triton_kernels.rope import rope as kernel

        return kernel
    return torch.ops.fastsft.rope


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(q, k, cos, sin):
    return _fast("triton", q, k, cos, sin)


@backends.register(OP, "cuda", available=backends.extension_available("rope"))
def _cuda_backend(q, k, cos, sin):
    return _fast("cuda", q, k, cos, sin)


def _fast(backend, q, k, cos, sin):
    if q.dtype not in _KERNEL_DTYPES:
        raise backends.Unsupported(f"rope: the fast backends take {_KERNEL_DTYPES}, got {q.dtype}; "
                        "use backend='reference' for float64")
    return _Rope.apply(q, k, _table(cos, q.dtype), _table(sin, q.dtype), backend, False)


def _table(t, dtype):
    """cos or sin as the kernels take it: no autograd history, ``dtype``, contiguous. The model's tables usually are
    all three already, and this runs for every attention layer's forward: only what is needed is called."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _prepare(t, backend):
    # The Triton kernel reads strided q/k directly (only the head dim must be contiguous); the compiled one does not
    return t if backend == "triton" and t.stride(-1) == 1 else t.contiguous()


class _Rope(torch.autograd.Function):
    """The rotation (``inverse=False``) or its transpose, the rotation by ``-sin`` (``inverse=True``): each is the
    other's backward, so a double backward runs the kernels again."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backend, inverse):
        ctx.save_for_backward(cos, sin)
        ctx.backend, ctx.inverse = backend, inverse
        return _rotation(backend)(_prepare(q, backend), _prepare(k, backend), cos, sin, inverse)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward through this Function, differentiable
            dq, dk = _Rope.apply(grad_q, grad_k, cos, sin, ctx.backend, not ctx.inverse)
        else:
            dq, dk = _rotation(ctx.backend)(_prepare(grad_q, ctx.backend), _prepare(grad_k, ctx.backend), cos, sin,
                                            not ctx.inverse)
        return dq, dk, None, None, None, None


if _extension.load() and hasattr(torch.ops.fastsft, "rope"):  # an older build lacks it
    torch.library.register_fake("fastsft::rope")(rope_fake)
