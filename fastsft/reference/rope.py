"""Reference rotary position embedding, transformers' ``apply_rotary_pos_emb`` convention (rotate_half)."""

from __future__ import annotations

import torch


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q, k, cos, sin):
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` in float32 math or wider.

    ``q`` [batch, heads, seq, head_dim], ``k`` [batch, kv_heads, seq, head_dim], ``cos``/``sin``
    [batch or 1, seq, head_dim] (per token, so packed rows with their own positions need nothing more).
    Outputs keep the dtype of ``q`` and ``k``.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    c, s = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)
    out = []
    for t in (q, k):
        tf = t.to(dtype)
        out.append((tf * c + rotate_half(tf) * s).to(t.dtype))
    return tuple(out)
