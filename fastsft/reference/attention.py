"""Reference packed (varlen) attention: explicit scores per sequence, masks, softcap, softmax.

``q`` [total, Hq, D], ``k``/``v`` [total, Hkv, D]; sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.
Grouped-query attention repeats each K/V head ``Hq // Hkv`` times (query head ``h`` reads K/V head
``h // (Hq // Hkv)``). Computes in float32 (float64 inputs stay float64); differentiable by autograd.
"""

from __future__ import annotations

import math

import torch


def attention_mask(length: int, *, causal: bool = True, window: int | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[length, length] bool, True where query i may attend key j: j <= i when causal, and i - window < j
    when a (left) window is given."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= i - j < window
    return keep


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                           causal: bool = True, softmax_scale: float | None = None, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """softmax(mask(softcap(scale * q k^T))) v per sequence and head; output [total, Hq, D] in q's dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].to(compute).transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].to(compute).transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, L, D]
        vs = v[start:end].to(compute).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = scale * (qs @ ks.transpose(1, 2))  # [Hq, L, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        keep = attention_mask(end - start, causal=causal, window=window, device=q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append((probs @ vs).transpose(0, 1))  # [L, Hq, D]
    if not outs:  # no sequences: an empty output still connected to q, k and v for autograd
        outs = [(q[:0].to(compute) + (k.to(compute).sum() + v.to(compute).sum()) * 0)]
    out = torch.cat(outs, dim=0)
    if out.shape[0] != q.shape[0]:  # tokens past cu_seqlens[-1] belong to no sequence
        raise ValueError(f"cu_seqlens covers {out.shape[0]} tokens, q has {q.shape[0]}")
    return out.to(q.dtype)
