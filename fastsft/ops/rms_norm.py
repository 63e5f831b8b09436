"""RMSNorm, optionally fused with the residual add: Llama/Qwen's ``x / rms(x) * w`` and Gemma's ``* (1 + w)``.

The fast backends (``cuda``: the compiled ``fastsft::rms_norm_forward/backward``, C++ on the CPU; ``triton``)
compute in float32 and save only the normalized input (``x``, or ``x + residual``) and one float32 ``rstd`` per
row. The backward pass writes the input gradient in one kernel; the weight gradient, only when the weight
requires grad, comes from per-block float32 partial sums reduced afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import math

import torch

from fastsft.fakes import rms_norm_backward_fake, rms_norm_forward_fake
from fastsft import _extension, backends
from fastsft.reference import rms_norm as reference

OP = "rms_norm"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HIDDEN = 65536  # the Triton kernels hold one row in registers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             residual: torch.Tensor | None = None, backend: str = "auto"):
    """``x * rsqrt(mean(x**2, -1) + eps) * (offset + weight)``, normalized over the last dim in float32.

    Args:
        x: [..., H] (float16, bfloat16 or float32; float64 on the reference backend).
        weight: [H], same dtype and device as ``x``. Its gradient is computed only when it requires grad.
        eps: added to the mean square, > 0.
        offset: 0 for Llama/Mistral/Qwen (``* w``), 1 for Gemma (``* (1 + w)``).
        residual: optional, shape of ``x``: the norm is then of ``s = x + residual`` (rounded to the input
            dtype, as the unfused model adds them) and ``(y, s)`` is returned — ``s`` is the residual stream
            that the next layer adds to.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see :mod:`fastsft.backends`).

    Returns ``y`` in ``x``'s dtype and shape, or ``(y, s)`` with ``residual``.
    """
    _check(x, weight, eps, offset, residual)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    r2 = None if residual is None else residual.reshape(-1, shape[-1])
    out = backends.dispatch(OP, backend, x.device, x2, weight, float(eps), float(offset), r2)
    if residual is None:
        return out.reshape(shape)
    y, s = out
    return y.reshape(shape), s.reshape(shape)


def _check(x, weight, eps, offset, residual):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rms_norm: {name} must be a tensor, got {type(t).__name__}")
    if not x.is_floating_point() or weight.dtype != x.dtype:
        raise TypeError(f"rms_norm: x and weight must share a floating dtype, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: expected x [..., H] and weight [H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"rms_norm: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                             f"{tuple(residual.shape)}, {residual.dtype}")
    devices = {t.device for t in (x, weight, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"rms_norm: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"rms_norm: eps must be a positive number, got {eps}")
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"rms_norm: offset must be a finite number, got {offset}")


# --- reference backend ---------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(x, weight, eps, offset, residual):
    return reference.rms_norm(x, weight, eps, offset=offset, residual=residual)


# --- fast backends (triton, cuda) ----------------------------------------------------------------------------

def _kernels(backend: str):
    """A fast backend's pair of ops: ``forward(x, w, residual, eps, offset)`` and ``backward(...)``."""
    if backend == "triton":
        from fastsft.triton_kernels import rms_norm as kernels

        return kernels.rms_norm_forward, kernels.rms_norm_backward
    return torch.ops.fastsft.rms_norm_forward, torch.ops.fastsft.rms_norm_backward


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(x, weight, eps, offset, residual):
    if x.shape[-1] > MAX_TRITON_HIDDEN:
        raise backends.Unsupported(f"rms_norm: the triton backend takes hidden sizes up to {MAX_TRITON_HIDDEN}, "
                                   f"got {x.shape[-1]}; use backend='cuda' or 'reference'")
    return _fast("triton", x, weight, eps, offset, residual)


@backends.register(OP, "cuda", available=backends.extension_available("rms_norm_forward"))
def _cuda_backend(x, weight, eps, offset, residual):
    return _fast("cuda", x, weight, eps, offset, residual)


def _fast(backend, x, weight, eps, offset, residual):
    if x.dtype not in _KERNEL_DTYPES:
        raise backends.Unsupported(f"rms_norm: the fast backends take {_KERNEL_DTYPES}, got {x.dtype}; "
                        "use backend='reference' for float64")
    return _RmsNorm.apply(x, weight, residual, eps, offset, backend)


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, backend):
        residual = None if residual is None else residual.contiguous()
        y, s, rstd = _kernels(backend)[0](x.contiguous(), weight.contiguous(), residual, eps, offset)
        # x itself (an input), not a contiguous copy: a double backward differentiates through what is saved
        ctx.save_for_backward(x if residual is None else s, weight, rstd)
        ctx.backend, ctx.eps, ctx.offset, ctx.has_residual = backend, eps, offset, residual is not None
        if residual is None:
            return y
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s=None):
        s, weight, rstd = ctx.saved_tensors
        need_x, need_w, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_x or need_w or need_r):
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable, the reference's
            ds, dw = _differentiable_backward(s, weight, grad_y, grad_s, ctx.eps, ctx.offset, need_w)
        else:
            grad_s = None if grad_s is None else grad_s.contiguous()
            ds, dw = _kernels(ctx.backend)[1](grad_y.contiguous(), grad_s, s.contiguous(), weight.contiguous(), rstd,
                                       ctx.offset, need_w)
        return (ds if need_x else None, dw.to(weight.dtype) if need_w else None, ds if need_r else None,
                None, None, None)


def _differentiable_backward(s, weight, grad_y, grad_s, eps, offset, need_w):
    """The input and weight gradients in plain PyTorch ops (float32 or wider), which autograd can differentiate
    again. Written out rather than through ``torch.autograd.grad`` of the reference: ``s`` may be this op's own
    output (with a residual), and a nested grad would then run this backward again, endlessly."""
    dtype = reference.compute_dtype(s.dtype)
    sf, g = s.to(dtype), grad_y.to(dtype)
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    normed = sf * rstd
    gn = g * (weight.to(dtype) + offset)
    ds = (rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))).to(s.dtype)
    if grad_s is not None:
        ds = ds + grad_s
    return ds, (g * normed).sum(0) if need_w else None


# --- the compiled op's fake (fastsft.fakes) ----------------------------------------------------------------

if _extension.load() and hasattr(torch.ops.fastsft, "rms_norm_forward"):  # an older build lacks it
    torch.library.register_fake("fastsft::rms_norm_forward")(rms_norm_forward_fake)
    torch.library.register_fake("fastsft::rms_norm_backward")(rms_norm_backward_fake)
