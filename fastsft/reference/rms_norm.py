"""Reference RMSNorm (Llama/Qwen ``x / rms(x) * w`` and Gemma's ``* (1 + w)``), float32 math or wider."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x, weight, eps, *, offset=0.0, residual=None):
    """``x * rsqrt(mean(x**2, -1) + eps) * (offset + weight)`` over the last dim, in the input dtype.

    With ``residual``, the norm is of ``s = x + residual`` (summed and rounded in the input dtype, as the
    unfused model does) and ``(y, s)`` is returned.
    """
    s = x if residual is None else x + residual
    dtype = compute_dtype(s.dtype)
    sf = s.to(dtype)
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    y = (sf * rstd * (weight.to(dtype) + offset)).to(x.dtype)
    return y if residual is None else (y, s)
