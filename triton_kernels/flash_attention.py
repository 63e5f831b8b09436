"""Packed (varlen) causal flash attention, forward and backward, in Triton.

Layout as in flash-attn's varlen API: ``q`` [total_tokens, Hq, D], ``k``/``v`` [total_tokens, Hkv, D], sequences
delimited by ``cu_seqlens`` (int32 [num_seqs + 1], starting at 0, ending at total_tokens). No token attends
across a sequence boundary. Query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention
without repeating K/V).

- Grids are ``(heads, num_seqs, cdiv(max_seqlen, BLOCK))``: a program finds its sequence in ``cu_seqlens`` and
  exits when its block starts past the sequence's end, so no host sync is needed. The block index varies
  slowest so that the programs with the most causal work start first, across all heads and sequences.
- Each program splits its loop over the other operand's blocks into three ranges: blocks partly masked at the
  window's left edge, blocks that need no mask at all, and blocks partly masked at the causal diagonal or the
  sequence's end. Blocks outside the causal/window band are never visited; the unmasked range loads without
  masks (and without a head-dim mask when the head dim is a power of two), so its loads vectorize and pipeline.
- Forward: online softmax in base 2 with fp32 accumulation; the log-sum-exp (natural log, fp32, [Hq, total])
  is saved for the backward.
- Backward (FA2): one kernel per query block accumulating dQ over key blocks, which also computes and stores
  ``delta = rowsum(dO * O)`` for its rows; then one kernel per key block accumulating dK/dV over the query blocks
  of every query head of its group (no atomics, K/V read once). Every output element is written by exactly one
  program: deterministic by construction. (Measured on an H200 at packed 8k tokens and not used: dQ added by
  float32 atomics from the dK/dV kernel, FA2's way, 1.02 ms against 0.91 for the two kernels; dS stored once by the
  dK/dV kernel and dQ = dS K computed from it, 0.89 against 0.93 ms with a 570 MB dS buffer.)
- Logit softcap: ``s = cap * tanh(scale * q.k / cap)``; its derivative ``1 - tanh^2`` is applied in backward.
- Sliding window (left size ``w``, causal only): query ``i`` sees keys ``j`` with ``i - w < j <= i``.
- Block shapes, warps and pipeline depth per kernel are the ops' ``config`` arguments: the caller picks them with
  :func:`kernel_config`, from the defaults below and the entries it passes as ``tuned`` (fastsft's per-card table,
  measured by ``python -m bench.tune_attention --write-table``). A configuration with ``tma`` runs the kernel's TMA
  variant (:mod:`flash_attention_tma`) where the inputs allow and the kernels launch directly (eager calls); the
  pointer kernel, same blocks, otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import cdiv, eager_direct_triton_op, launcher, launching_directly, next_power_of_2
from fastsft.triton_kernels.math import tanh

LOG2E = tl.constexpr(1.4426950408889634)  # a kernel may read a global only as a constexpr
LN2 = tl.constexpr(0.6931471805599453)


# The packed token count changes with every batch. Triton would compile a variant of each kernel for counts
# divisible by 16 and another for the rest, and a variant first met mid-training stalls that step for seconds (a
# 5.7 s step among 0.2 s ones, 1B SFT on an H200). It bounds rows and indexes the log-sum-exp only: no load along
# the contiguous head dimension depends on it.
PER_BATCH_ARGS = ["total"]


@triton.jit
def _load(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A tile load masked only where needed: a mask the compiler cannot prove constant stops vectorization."""
    if MASK_ROWS:
        if MASK_COLS:
            return tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
        else:
            return tl.load(ptrs, mask=rows_ok, other=0.0)
    else:
        if MASK_COLS:
            return tl.load(ptrs, mask=cols_ok, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _scores(s, qk_scale, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> logits in base 2 (times log2 e), and tanh's value for the softcap's derivative."""
    if HAS_SOFTCAP:
        t = tanh(s * (sm_scale / softcap))
        return t * (softcap * LOG2E), t  # tensor first: the interpreter keeps constexpr * tensor a constexpr
    else:
        return s * qk_scale, s


@triton.jit
def _band(rows, cols, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query row, key col) pairs of a tile attend: inside the sequence, causal, inside the window."""
    keep = (rows < L) & (cols < L)
    if CAUSAL:
        keep = keep & (cols <= rows)
    if HAS_WINDOW:
        keep = keep & (rows - cols < window)
    return keep


# --- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _softmax_step(s, m_i, l_i, offs_m, offs_n, L, qk_scale, sm_scale, softcap, window,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One key block of the online softmax, from the raw scores ``s`` = q.k: (p, the running sum's rescale alpha,
    the new running sum, the new running max), in base 2."""
    if MASK or HAS_SOFTCAP:
        s, _ = _scores(s, qk_scale, sm_scale, softcap, HAS_SOFTCAP)
        if MASK:
            s = tl.where(_band(offs_m[:, None], offs_n[None, :], L, window, CAUSAL, HAS_WINDOW), s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK:  # a row may have seen no key yet: subtract 0 instead of -inf
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
    else:  # the common case: the scale folds into one multiply-add per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_sub = m_new
        p = tl.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _query_block(CU, BLOCK_M: tl.constexpr):
    """This program's sequence (start, length) and query block's first row, the block index counted down so that
    the longest causal blocks start first. The caller exits when the row is past the sequence's end."""
    seq = tl.program_id(1)
    block = tl.num_programs(2) - 1 - tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    return start, L, block * BLOCK_M


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L, lo, hi,
               qk_scale, sm_scale, softcap, window,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # [D, N]
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]  # [N, D]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k_t = _load(k_ptrs, n_ok[None, :], d_ok[:, None], MASK, MASK_D)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        p, alpha, l_i, m_new = _softmax_step(s, m_i, l_i, offs_m, offs_n, L, qk_scale, sm_scale, softcap, window,
                                             MASK, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
        v = _load(v_ptrs, n_ok[:, None], d_ok[None, :], MASK, MASK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
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
    # a block that needs no mask must also lie inside the sequence: clean blocks end at or before m_last < L
    return lo, clean_lo, clean_hi, hi


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _flash_fwd_kernel(
    Q, K, V, O, LSE, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    start, L, m0 = _query_block(CU, BLOCK_M)
    if m0 >= L:
        return
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    q = _load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], m_ok[:, None], d_ok[None, :],
              True, MASK_D)
    k_base = K + start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + start.to(tl.int64) * stride_vt + kvh * stride_vh
    qk_scale = sm_scale * LOG2E

    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                                   lo, clean_lo, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW,
                                   HAS_SOFTCAP, MASK_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                               clean_lo, clean_hi, qk_scale, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, MASK_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                               clean_hi, hi, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, MASK_D, BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past the end (never stored) can have l == 0
    out = acc / l_safe[:, None]
    o_ptrs = O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    if MASK_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
    lse = (m_i + tl.log2(l_safe)) * LN2
    tl.store(LSE + h.to(tl.int64) * total + start + offs_m, lse, mask=m_ok)


# --- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L, lo, hi,
                  qk_scale, sm_scale, softcap, window,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # [D, N]
    v_ptrs = v_base + offs_n[None, :].to(tl.int64) * stride_vt + offs_d[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k_t = _load(k_ptrs, n_ok[None, :], d_ok[:, None], MASK, MASK_D)
        v_t = _load(v_ptrs, n_ok[None, :], d_ok[:, None], MASK, MASK_D)
        s, t = _scores(tl.dot(q, k_t, input_precision=DOT_PRECISION), qk_scale, sm_scale, softcap, HAS_SOFTCAP)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_band(offs_m[:, None], offs_n[None, :], L, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    start, L, m0 = _query_block(CU, BLOCK_M)
    if m0 >= L:
        return
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    q = _load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], m_ok[:, None], d_ok[None, :],
              True, MASK_D)
    do = _load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], m_ok[:, None], d_ok[None, :],
               True, MASK_D)
    o = _load(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], m_ok[:, None], d_ok[None, :],
              True, MASK_D)
    # delta = rowsum(dO * O): this program owns these rows of this head, and the dK/dV kernel, launched after
    # this one, reads them (no separate pass over O and dO)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = h.to(tl.int64) * total + start + offs_m
    tl.store(DELTA + row, delta, mask=m_ok)
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * LOG2E
    k_base = K + start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + start.to(tl.int64) * stride_vt + kvh * stride_vh
    qk_scale = sm_scale * LOG2E

    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                           lo, clean_lo, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                           MASK_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                       clean_lo, clean_hi, qk_scale, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW,
                       HAS_SOFTCAP, MASK_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_ok, L,
                       clean_hi, hi, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                       MASK_D, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    dq_ptrs = DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :]
    if MASK_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, q_t, do, lse2, delta, offs_m, offs_n, L, qk_scale, sm_scale, softcap, window,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query block's share of a key block's dK and dV: K, V [N, D], Q^T [D, M], dO [M, D], and the query rows'
    log-sum-exp (base 2) and delta."""
    # dP before S: Triton waits for each product right after issuing it, except an accumulating one, so the dV
    # product below then runs while dS is computed (dense 8k tokens on an H200: 2.36 against 2.49 ms)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
    s_t, t = _scores(tl.dot(k, q_t, input_precision=DOT_PRECISION), qk_scale, sm_scale, softcap, HAS_SOFTCAP)
    p_t = tl.exp2(s_t - lse2[None, :])  # [N, M]
    if MASK:
        p_t = tl.where(_band(offs_m[None, :], offs_n[:, None], L, window, CAUSAL, HAS_WINDOW), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - t * t)
    return tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION), dv


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh, stride_dot, stride_doh,
                    total, group, offs_n, offs_d, d_ok, L, lo, hi, qk_scale, sm_scale, softcap, window,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    MASK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query blocks [lo, hi) of every query head of the group, as one loop: a packed sequence's ranges are only a
    few blocks long, and one loop per head would refill the software pipeline for each of them."""
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    # The software pipeline computes the first iteration's addresses before it tests the loop bound; a range with
    # no block (every non-causal program's first one) must not divide by zero there: the quotient is undefined
    per_head = tl.maximum(blocks, 1)
    for it in range(0, group * blocks):
        g = it // per_head
        offs_m = lo + (it - g * per_head) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < L
        q_t = _load(q_base + g * stride_qh + rows[None, :] * stride_qt + offs_d[:, None], m_ok[None, :],
                    d_ok[:, None], MASK, MASK_D)  # [D, M]
        lse_ptrs = lse_base + g.to(tl.int64) * total + offs_m
        if MASK:
            lse2 = tl.load(lse_ptrs, mask=m_ok, other=0.0) * LOG2E
        else:
            lse2 = tl.load(lse_ptrs) * LOG2E
        do = _load(do_base + g * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], m_ok[:, None],
                   d_ok[None, :], MASK, MASK_D)  # [M, D]
        delta_ptrs = delta_base + g.to(tl.int64) * total + offs_m
        if MASK:
            delta = tl.load(delta_ptrs, mask=m_ok, other=0.0)
        else:
            delta = tl.load(delta_ptrs)
        dk, dv = _dkdv_step(dk, dv, k, v, q_t, do, lse2, delta, offs_m, offs_n, L, qk_scale, sm_scale, softcap,
                            window, MASK, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    pid_n = tl.program_id(2)  # causal: the first key blocks see the most queries and start first
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= L:
        return
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < L
    tok_n = (start + offs_n).to(tl.int64)
    k = _load(K + tok_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], n_ok[:, None], d_ok[None, :],
              True, MASK_D)
    v = _load(V + tok_n[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], n_ok[:, None], d_ok[None, :],
              True, MASK_D)
    qk_scale = sm_scale * LOG2E

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
    # keys past the end (zeros) in an unmasked block only touch their own dK/dV rows, which are never stored

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = kvh * group  # the query heads sharing this K/V head: h0 .. h0 + group - 1
    q_base = Q + start.to(tl.int64) * stride_qt + h0 * stride_qh
    do_base = DO + start.to(tl.int64) * stride_dot + h0 * stride_doh
    lse_base = LSE + h0.to(tl.int64) * total + start
    delta_base = DELTA + h0.to(tl.int64) * total + start
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                             stride_dot, stride_doh, total, group, offs_n, offs_d, d_ok, L, lo, clean_lo, qk_scale,
                             sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, MASK_D, BLOCK_M,
                             DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                             stride_dot, stride_doh, total, group, offs_n, offs_d, d_ok, L, clean_lo, clean_hi,
                             qk_scale, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, MASK_D,
                             BLOCK_M, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                             stride_dot, stride_doh, total, group, offs_n, offs_d, d_ok, L, clean_hi, hi, qk_scale,
                             sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, MASK_D, BLOCK_M,
                             DOT_PRECISION)
    dk = dk * sm_scale
    dk_ptrs = DK + tok_n[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + tok_n[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :]
    if MASK_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


# --- launch configuration ------------------------------------------------------------------------------------

LONG_SEQLEN = 2048  # max_seqlen above this takes the "long" tuned entries (dense rows), else "short" (packed)

# bf16/fp16 on a card not in the table: per kernel and head dim, the configuration with the best time summed over
# packed and dense rows in an H200 tuning (bench.tune_attention). BLOCK_M is the query block and BLOCK_N the key
# block of every kernel; shared memory holds the streamed operand per stage (a card with less shared memory than a
# Hopper one fails to launch some: the op then falls back to the next attention backend with a warning).
_DEFAULTS = {
    ("fwd", 64): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    ("fwd", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    ("fwd", 256): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dkdv", 128): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=4),
    ("dkdv", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
    ("dq", 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dq", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dq", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
}
_FLOAT32 = {  # float32 inputs (tests, fp32 training) take smaller blocks
    ("fwd", 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    ("fwd", 128): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("fwd", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", 64): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    ("dkdv", 128): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", 256): dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
    ("dq", 64): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dq", 128): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dq", 256): dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2),
}
# Triton's CPU interpreter: small blocks, so that short test sequences span several of them
_INTERPRETER = {"fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                "dq": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)}


def block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _dim_class(head_dim: int) -> int:
    d = block_d(head_dim)
    return 64 if d <= 64 else 128 if d <= 128 else 256


def table_key(kernel: str, head_dim: int, element_size: int, max_seqlen: int) -> str:
    """The key of a tuned configuration: ``"<kernel>/d<head dim class>/<bits>bit/<short|long>"``."""
    bucket = "long" if max_seqlen > LONG_SEQLEN else "short"
    return f"{kernel}/d{_dim_class(head_dim)}/{8 * element_size}bit/{bucket}"


def default_config(kernel: str, head_dim: int, element_size: int = 2) -> dict:
    """The configuration of ``kernel`` on a CUDA card without a tuned entry."""
    return dict((_FLOAT32 if element_size > 2 else _DEFAULTS)[(kernel, _dim_class(head_dim))])


def kernel_config(kernel: str, head_dim: int, device: torch.device, element_size: int = 2, max_seqlen: int = 0,
                  tuned=None) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys), num_warps, num_stages (and ``tma``) of ``kernel`` ("fwd", "dkdv" or
    "dq"): ``tuned``'s entry for this case (a mapping :func:`table_key` -> configuration), else the default."""
    if device.type != "cuda":
        return dict(_INTERPRETER[kernel])
    entry = tuned.get(table_key(kernel, head_dim, element_size, max_seqlen)) if tuned else None
    return dict(entry) if entry is not None else default_config(kernel, head_dim, element_size)


_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "tma")


def config_args(cfg: dict) -> list[int]:
    """A configuration as the ops take it (a list of ints: a custom op's arguments cannot be dicts)."""
    return [int(bool(cfg.get("tma"))) if name == "tma" else int(cfg[name]) for name in _CONFIG_FIELDS]


def config_of(args) -> dict:
    """The inverse of :func:`config_args`."""
    cfg = dict(zip(_CONFIG_FIELDS, args))
    cfg["tma"] = bool(cfg["tma"])
    return cfg


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


def _flags(q, causal, window, softcap, cfg):
    return dict(HEAD_DIM=q.shape[-1], CAUSAL=causal, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(q.shape[-1]),
                DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes: sequences go on y, blocks on z
MIN_BLOCK = 16  # no configuration (table, defaults, interpreter) has a smaller query or key block


def unsupported_reason(num_seqs: int, max_seqlen: int, head_dim: int, device: torch.device,
                       element_size: int, tuned=None) -> str | None:
    """Why the kernels cannot launch this case (None when they can): the forward and backward grids hold every
    sequence on one axis and every block of the longest one on another, each at most :data:`MAX_GRID_YZ`."""
    if num_seqs > MAX_GRID_YZ:
        return f"{num_seqs} sequences in one call (at most {MAX_GRID_YZ})"
    if cdiv(max_seqlen, MIN_BLOCK) <= MAX_GRID_YZ:  # every call of a training run: no config lookups
        return None
    blocks = [kernel_config(kernel, head_dim, device, element_size, max_seqlen, tuned)[key]
              for kernel, key in (("fwd", "BLOCK_M"), ("dq", "BLOCK_M"), ("dkdv", "BLOCK_N"))]
    if cdiv(max_seqlen, min(blocks)) > MAX_GRID_YZ:
        return f"a sequence of {max_seqlen} tokens (at most {MAX_GRID_YZ * min(blocks)} with blocks of {min(blocks)})"
    return None


def _grid(heads: int, cu_seqlens: torch.Tensor, max_seqlen: int, block: int) -> tuple[int, int, int]:
    """(heads, sequences, blocks): CUDA starts programs in grid order, x fastest, so every head and sequence of
    the heaviest block index starts before any lighter one. With the block index fastest instead, the heaviest
    blocks of the last heads started last and ran alone at the end. Same run on an H200, fwd + dQ + dK/dV kernels,
    32/8 heads of 128: packed 8k tokens 1.249 ms against 1.407, dense 8k 4.86 against 5.58, dense 16k 19.16
    against 19.26 (bench/results/attention_grid_layout.json)."""
    num_seqs, blocks = cu_seqlens.shape[0] - 1, cdiv(max_seqlen, block)
    if num_seqs > MAX_GRID_YZ or blocks > MAX_GRID_YZ:  # the op checks this first (unsupported_reason)
        raise ValueError(f"flash attention: at most {MAX_GRID_YZ} sequences and {MAX_GRID_YZ} blocks of {block} "
                         f"tokens per launch, got {num_seqs} sequences, max_seqlen {max_seqlen}")
    return heads, num_seqs, blocks


# The launchers take explicit configs so that the tuner (bench/tune_attention.py) can time each kernel alone (inside
# launch.direct_launch(), as eager calls of the ops run).

def _tma(cfg, *tensors):
    """The TMA kernels' module (flash_attention_tma) when this launch takes them, else None: the config asks for
    them, the kernels run as launched (``wrap_triton``'s tracing is not given tensor descriptors) and the inputs
    allow it."""
    if not cfg.get("tma") or not launching_directly():
        return None
    from fastsft.triton_kernels import flash_attention_tma

    return flash_attention_tma if flash_attention_tma.usable(tensors[0].device, *tensors) else None


def launch_fwd(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, cfg):
    tma = _tma(cfg, k, v)
    if tma is not None:
        return tma.launch_fwd_tma(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap,
                                  cfg)
    grid = _grid(q.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_M"])
    launcher(_flash_fwd_kernel)[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window, **_flags(q, causal, window, softcap, cfg))


def launch_dkdv(dout, q, k, v, lse, delta, dk, dv, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap,
                cfg):
    tma = _tma(cfg, q, dout)
    if tma is not None:
        return tma.launch_dkdv_tma(dout, q, k, v, lse, delta, dk, dv, cu_seqlens, max_seqlen, softmax_scale,
                                   causal, window, softcap, cfg)
    grid = _grid(k.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_N"])
    launcher(_bwd_dkdv_kernel)[grid](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window, **_flags(q, causal, window, softcap, cfg))


def launch_dq(out, dout, q, k, v, lse, delta, dq, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap,
              cfg):
    """dQ, and ``delta`` (rowsum(dout * out), float32 [Hq, total]) for the dK/dV kernel: launch this one first."""
    tma = _tma(cfg, k, v)
    if tma is not None:
        return tma.launch_dq_tma(out, dout, q, k, v, lse, delta, dq, cu_seqlens, max_seqlen, softmax_scale, causal,
                                 window, softcap, cfg)
    grid = _grid(q.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_M"])
    launcher(_bwd_dq_kernel)[grid](
        q, k, v, out, dout, dq, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window, **_flags(q, causal, window, softcap, cfg))


# --- ops -----------------------------------------------------------------------------------------------------

@eager_direct_triton_op("fastsft::flash_attn_varlen_fwd_triton", mutates_args={})
def flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, softmax_scale: float, causal: bool, window: int, softcap: float,
                          config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [total, Hq, D] (dtype of q) and log-sum-exp [Hq, total] (float32, natural log).

    ``q``/``k``/``v`` need stride 1 in their last dim; ``window`` 0 and ``softcap`` 0 mean none; ``max_seqlen``
    must be at least the longest sequence (blocks are launched up to it). ``config``: the launch configuration
    (:func:`config_args` of a :func:`kernel_config`)."""
    total, hq = q.shape[0], q.shape[1]
    out = _empty(q.shape, q)
    lse = _empty((hq, total), q, torch.float32)
    if total == 0 or cu_seqlens.shape[0] < 2 or max_seqlen <= 0 or _no_launch(q):
        return out, lse
    launch_fwd(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, config_of(config))
    return out, lse


@eager_direct_triton_op("fastsft::flash_attn_varlen_bwd_triton", mutates_args={})
def flash_attn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
                          causal: bool, window: int, softcap: float, dq_config: list[int], dkdv_config: list[int]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of the forward above, given ``dout`` and the forward's ``out`` and ``lse``, with the
    dQ and dK/dV kernels' launch configurations. Deterministic: no atomics, every element written by one program."""
    total, hq = q.shape[0], q.shape[1]
    dq = _empty(q.shape, q)
    dk = _empty(k.shape, k)
    dv = _empty(v.shape, v)
    if total == 0 or cu_seqlens.shape[0] < 2 or max_seqlen <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if _no_launch(q):
        return dq, dk, dv
    delta = _empty((hq, total), q, torch.float32)
    args = (cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap)
    launch_dq(out, dout, q, k, v, lse, delta, dq, *args, config_of(dq_config))
    launch_dkdv(dout, q, k, v, lse, delta, dk, dv, *args, config_of(dkdv_config))
    return dq, dk, dv
