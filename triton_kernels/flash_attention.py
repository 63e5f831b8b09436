"""Packed (varlen) causal flash attention, forward and backward, in Triton.

Layout as in flash-attn's varlen API: ``q`` [total_tokens, Hq, D], ``k``/``v`` [total_tokens, Hkv, D], sequences
delimited by ``cu_seqlens`` (int32 [num_seqs + 1], starting at 0, ending at total_tokens). No token attends
across a sequence boundary. Query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention
without repeating K/V).

- Grids are ``(cdiv(max_seqlen, BLOCK), num_seqs, heads)``: a program finds its sequence in ``cu_seqlens`` and
  exits when its block starts past the sequence's end, so no host sync is needed.
- Each program splits its loop over the other operand's blocks into three ranges: blocks partly masked at the
  window's left edge, blocks that need no mask at all, and blocks partly masked at the causal diagonal or the
  sequence's end. Blocks outside the causal/window band are never visited.
- Forward: online softmax in base 2 with fp32 accumulation; the log-sum-exp (natural log, fp32, [Hq, total])
  is saved for the backward.
- Backward (FA2): ``delta = rowsum(dO * O)``; one kernel per key block accumulating dK/dV over the query blocks
  of every query head of its group (no atomics, K/V read once); one kernel per query block accumulating dQ over
  key blocks. Every output element is written by exactly one program: deterministic by construction.
- Logit softcap: ``s = cap * tanh(scale * q.k / cap)``; its derivative ``1 - tanh^2`` is applied in backward.
- Sliding window (left size ``w``, causal only): query ``i`` sees keys ``j`` with ``i - w < j <= i``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

LOG2E = tl.constexpr(1.4426950408889634)  # a kernel may read a global only as a constexpr
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


@triton.jit
def _tanh(x):
    # tl has no tanh that also runs under TRITON_INTERPRET; this form is exact enough in fp32.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


# --- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L, lo, hi,
               sm_scale, softcap, window,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        if MASK:
            kv_mask = n_mask
        else:
            kv_mask = offs_n >= 0  # all true: the block lies inside the sequence
        k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
                      mask=kv_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = (softcap * LOG2E) * _tanh(s * (sm_scale / softcap))
        else:
            s = s * (sm_scale * LOG2E)
        if MASK:
            keep = n_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                keep = keep & (offs_m[:, None] - offs_n[None, :] < window)
            s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK:  # a row may have seen no key yet: subtract 0 instead of -inf
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(m0, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key-block ranges for query rows [m0, m0 + BLOCK_M) of a sequence of length L: [lo, clean_lo) masked,
    [clean_lo, clean_hi) unmasked, [clean_hi, hi) masked. Starts are multiples of BLOCK_N."""
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    if CAUSAL:
        hi = m_last + 1
        clean_hi = (m0 + 1) // BLOCK_N * BLOCK_N  # n0 + BLOCK_N - 1 <= m0 (and m0 < L)
    else:
        hi = L
        clean_hi = L // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        clean_lo = (tl.maximum(m_last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        lo = m0 * 0
        clean_lo = m0 * 0
    clean_lo = tl.minimum(clean_lo, hi)
    clean_hi = tl.maximum(tl.minimum(clean_hi, hi), clean_lo)
    return lo, clean_lo, clean_hi, hi


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest query blocks start first
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + start.to(tl.int64) * stride_vt + kvh * stride_vh

    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                               lo, clean_lo, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                               BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                               clean_lo, clean_hi, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                               clean_hi, hi, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                               BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past the end (never stored) can have l == 0
    out = acc / l_safe[:, None]
    tl.store(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.log2(l_safe)) * LN2
    tl.store(LSE + h.to(tl.int64) * total + start + offs_m, lse, mask=m_mask)


# --- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tok = offs_m.to(tl.int64)
    o = tl.load(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * total + offs_m, delta, mask=offs_m < total)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L, lo, hi,
                  sm_scale, softcap, window,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        if MASK:
            kv_mask = n_mask
        else:
            kv_mask = offs_n >= 0
        ld_mask = kv_mask[None, :] & d_mask[:, None]
        k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None], mask=ld_mask, other=0.0)
        v_t = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vt + offs_d[:, None], mask=ld_mask, other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            t = _tanh(s * (sm_scale / softcap))
            s2 = (softcap * LOG2E) * t
        else:
            s2 = s * (sm_scale * LOG2E)
        p = tl.exp2(s2 - lse2[:, None])
        if MASK:
            keep = n_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                keep = keep & (offs_m[:, None] - offs_n[None, :] < window)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest query blocks start first
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=md_mask, other=0.0)
    row = h.to(tl.int64) * total + start + offs_m
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    k_base = K + start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + start.to(tl.int64) * stride_vt + kvh * stride_vh

    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                       lo, clean_lo, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
                       DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                       clean_lo, clean_hi, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                       BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, L,
                       clean_hi, hi, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
                       DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=md_mask)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                    d_mask, L, lo, hi, sm_scale, softcap, window,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < L
        if MASK:
            row_mask = m_mask
        else:
            row_mask = offs_m >= 0  # all true: the block lies inside the sequence
        tok = offs_m.to(tl.int64)
        q_t = tl.load(q_base + tok[None, :] * stride_qt + offs_d[:, None],
                      mask=row_mask[None, :] & d_mask[:, None], other=0.0)  # [D, M]
        lse2 = tl.load(lse_base + offs_m, mask=row_mask, other=0.0) * LOG2E
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)  # [N, M]
        if HAS_SOFTCAP:
            t = _tanh(s_t * (sm_scale / softcap))
            s2 = (softcap * LOG2E) * t
        else:
            s2 = s_t * (sm_scale * LOG2E)
        p_t = tl.exp2(s2 - lse2[None, :])
        if MASK:
            keep = m_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            if HAS_WINDOW:
                keep = keep & (offs_m[None, :] - offs_n[:, None] < window)
            p_t = tl.where(keep, p_t, 0.0)
        do = tl.load(do_base + tok[:, None] * stride_dot + offs_d[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t * t)
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= L:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < L
    tok_n = (start + offs_n).to(tl.int64)
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + tok_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + tok_n[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)

    # query-block ranges: [lo, clean_lo) masked, [clean_lo, clean_hi) unmasked, [clean_hi, hi) masked
    n_last = tl.minimum(n0 + BLOCK_N, L) - 1
    if CAUSAL:
        lo = n0 // BLOCK_M * BLOCK_M
        clean_lo = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # m0 >= n0 + BLOCK_N - 1
    else:
        lo = n0 * 0
        clean_lo = n0 * 0
    hi = L
    clean_hi = L // BLOCK_M * BLOCK_M  # m0 + BLOCK_M <= L
    if HAS_WINDOW:
        hi = tl.minimum(L, n_last + window)
        clean_hi = tl.minimum(clean_hi, (n0 + window) // BLOCK_M * BLOCK_M)  # m0 + BLOCK_M - 1 - n0 < window
    clean_lo = tl.minimum(clean_lo, hi)
    clean_hi = tl.maximum(tl.minimum(clean_hi, hi), clean_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):  # the query heads sharing this K/V head
        h = kvh * group + g
        q_base = Q + start.to(tl.int64) * stride_qt + h * stride_qh
        do_base = DO + start.to(tl.int64) * stride_dot + h * stride_doh
        lse_base = LSE + h.to(tl.int64) * total + start
        delta_base = DELTA + h.to(tl.int64) * total + start
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, d_mask, L, lo, clean_lo, sm_scale, softcap, window, True, CAUSAL,
                                 HAS_WINDOW, HAS_SOFTCAP, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, d_mask, L, clean_lo, clean_hi, sm_scale, softcap, window, False,
                                 CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, d_mask, L, clean_hi, hi, sm_scale, softcap, window, True, CAUSAL,
                                 HAS_WINDOW, HAS_SOFTCAP, BLOCK_M, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + tok_n[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=nd_mask)
    tl.store(DV + tok_n[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=nd_mask)


# --- launch configuration ------------------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def fwd_config(head_dim: int, device_type: str, element_size: int = 2) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys), warps, stages of the forward kernel. Shared memory on an H100 is
    ~227 KB: Q [BLOCK_M, D] plus K and V [BLOCK_N, D] per stage; float32 inputs (tests) take smaller blocks."""
    if device_type != "cuda":  # Triton's CPU interpreter: small blocks so short test sequences span several
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    d = block_d(head_dim)
    if element_size > 2:
        if d <= 128:
            return dict(BLOCK_M=64, BLOCK_N=64 if d <= 64 else 32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def bwd_config(head_dim: int, device_type: str, element_size: int = 2) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys), warps, stages of both backward kernels (the dK/dV kernel keeps K, V
    [BLOCK_N, D] and streams Q, dO [BLOCK_M, D] per stage)."""
    if device_type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    d = block_d(head_dim)
    if element_size > 2:
        if d <= 128:
            return dict(BLOCK_M=32, BLOCK_N=64 if d <= 64 else 32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2)
    if d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer the launchers allocate (tests replace this with a NaN fill to catch unwritten elements)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def _no_launch(t: torch.Tensor) -> bool:
    """Shape-only call that must not launch: under TRITON_INTERPRET ``wrap_triton`` returns the raw kernel, which
    cannot run on the fake tensors of a fake-tensor trace (on a GPU, ``wrap_triton`` records the launch)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or (t.device.type != "cuda" and is_fake(t))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding


# --- ops -----------------------------------------------------------------------------------------------------

@triton_op("fastsft::flash_attn_varlen_fwd_triton", mutates_args={})
def flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, softmax_scale: float, causal: bool, window: int, softcap: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [total, Hq, D] (dtype of q) and log-sum-exp [Hq, total] (float32, natural log).

    ``q``/``k``/``v`` need stride 1 in their last dim; ``window`` 0 and ``softcap`` 0 mean none; ``max_seqlen``
    must be at least the longest sequence (blocks are launched up to it)."""
    total, hq, d = q.shape
    hkv = k.shape[1]
    out = _empty(q.shape, q)
    lse = _empty((hq, total), q, torch.float32)
    num_seqs = cu_seqlens.shape[0] - 1
    if total == 0 or num_seqs == 0 or max_seqlen <= 0 or _no_launch(q):
        return out, lse
    cfg = fwd_config(d, q.device.type, q.element_size())
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), num_seqs, hq)
    wrap_triton(_flash_fwd_kernel)[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total, hq // hkv, softmax_scale, softcap, window,
        HEAD_DIM=d, CAUSAL=causal, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(d), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


@triton_op("fastsft::flash_attn_varlen_bwd_triton", mutates_args={})
def flash_attn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
                          causal: bool, window: int, softcap: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of the forward above, given ``dout`` and the forward's ``out`` and ``lse``.
    Deterministic: no atomics, every element written by one program."""
    total, hq, d = q.shape
    hkv = k.shape[1]
    dq = _empty(q.shape, q)
    dk = _empty(k.shape, k)
    dv = _empty(v.shape, v)
    num_seqs = cu_seqlens.shape[0] - 1
    if total == 0 or num_seqs == 0 or max_seqlen <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if _no_launch(q):
        return dq, dk, dv
    delta = _empty((hq, total), q, torch.float32)
    cfg = bwd_config(d, q.device.type, q.element_size())
    bd = block_d(d)
    pre_m = 64 if q.device.type == "cuda" else 32
    wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(total, pre_m), hq)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total,
        HEAD_DIM=d, BLOCK_M=pre_m, BLOCK_D=bd, num_warps=4,
    )
    common = dict(HEAD_DIM=d, CAUSAL=causal, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, DOT_PRECISION=_dot_precision(q.dtype),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    group = hq // hkv
    wrap_triton(_bwd_dkdv_kernel)[(triton.cdiv(max_seqlen, cfg["BLOCK_N"]), num_seqs, hkv)](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, group, softmax_scale, softcap, window, **common,
    )
    wrap_triton(_bwd_dq_kernel)[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), num_seqs, hq)](
        q, k, v, dout, dq, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1),
        total, group, softmax_scale, softcap, window, **common,
    )
    return dq, dk, dv
