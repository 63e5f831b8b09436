"""The flash-attention kernels of :mod:`flash_attention` with their streamed operand loaded by the Tensor Memory
Accelerator (Hopper and later): K/V tiles in the forward and dQ kernels, Q/dO tiles in the dK/dV kernel, through
host tensor descriptors over the ``[total, heads * D]`` view of each input. Same grids, block ranges, masks and
arithmetic as the pointer kernels; a tile is fetched by one instruction instead of per-thread address arithmetic,
which frees registers (forward 64x64 tiles, sm_90: 255 -> 188) and issue slots.

A TMA tile of a sequence's last block runs into the next sequence (or is zero-filled past ``total``): those rows
are set to 0 or masked before they can reach a result, even where they hold inf or NaN.

A table entry with ``"tma": true`` selects these kernels (:func:`flash_attention.kernel_config`); the launchers in
:mod:`flash_attention` use them only where :func:`usable` says so, and the pointer kernels otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastsft.triton_kernels.flash_attention import (LN2, LOG2E, PER_BATCH_ARGS, _band, _flags, _grid, _key_ranges,
                                                    _dkdv_step, _query_block, _scores, _softmax_step)
from fastsft.triton_kernels.launch import launcher, next_power_of_2


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def usable(device: torch.device, *tensors: torch.Tensor) -> bool:
    """Whether TMA can stream these ``[total, heads, D]`` inputs: a CUDA card of compute capability 9 or more (or
    Triton's CPU interpreter, which emulates it), a power-of-two head dim (the tile is the whole head), heads
    contiguous, 16-byte aligned base and token stride."""
    if device.type == "cuda" and not _has_tma(device.index if device.index is not None else
                                              torch.cuda.current_device()):
        return False
    for x in tensors:
        total, _, d = x.shape
        size = x.element_size()
        if (total == 0 or d != next_power_of_2(d) or d * size < 16 or x.stride(2) != 1 or x.stride(1) != d
                or x.data_ptr() % 16 or (x.stride(0) * size) % 16):
            return False
    return True


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, row0, col, offs_m, L, lo, hi, qk_scale, sm_scale, softcap, window,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = desc_k.load([row0 + start_n, col])  # [N, D]; rows past this sequence belong to the next one (or are 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p, alpha, l_i, m_new = _softmax_step(s, m_i, l_i, offs_m, offs_n, L, qk_scale, sm_scale, softcap, window,
                                             MASK, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
        v = desc_v.load([row0 + start_n, col])
        if MASK:  # the next sequence's values stay out even where they are not finite
            v = tl.where((offs_n < L)[:, None], v, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _flash_fwd_tma_kernel(
    Q, desc_k, desc_v, O, LSE, CU,
    stride_qt, stride_qh, stride_ot, stride_oh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(HEAD_DIM == BLOCK_D)
    h = tl.program_id(0)
    start, L, m0 = _query_block(CU, BLOCK_M)
    if m0 >= L:
        return
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E
    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    col = kvh * HEAD_DIM
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, start, col, offs_m, L, lo, clean_lo,
                                       qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                       BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, start, col, offs_m, L, clean_lo, clean_hi,
                                   qk_scale, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                   BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, start, col, offs_m, L, clean_hi, hi,
                                   qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                   BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * total + start + offs_m, (m_i + tl.log2(l_safe)) * LN2, mask=m_ok)


def _descriptor(x, block_rows):
    """[total, heads, D] with contiguous heads -> a descriptor over its [total, heads * D] view, blocks of
    [block_rows, D] (TMA zero-fills rows past total)."""
    total, heads, d = x.shape
    return TensorDescriptor(x, [total, heads * d], [x.stride(0), 1], [block_rows, d])


def launch_fwd_tma(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, cfg):
    grid = _grid(q.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_M"])
    desc_k = _descriptor(k, cfg["BLOCK_N"])
    desc_v = _descriptor(v, cfg["BLOCK_N"])
    launcher(_flash_fwd_tma_kernel)[grid](
        q, desc_k, desc_v, out, lse, cu_seqlens, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window, **_flags(q, causal, window, softcap, cfg))


# --- dQ with K/V streamed by TMA ------------------------------------------------------------------------------

@triton.jit
def _dq_inner_tma(dq, q, do, lse2, delta, desc_k, desc_v, row0, col, offs_m, L, lo, hi, qk_scale, sm_scale, softcap,
                  window, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = desc_k.load([row0 + start_n, col])  # [N, D]
        v = desc_v.load([row0 + start_n, col])
        if MASK:  # rows of the next sequence: 0 (dS is 0 there, but 0 * inf would not be)
            k = tl.where((offs_n < L)[:, None], k, 0.0)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, sm_scale, softcap,
                       HAS_SOFTCAP)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            keep = _band(offs_m[:, None], offs_n[None, :], L, window, CAUSAL, HAS_WINDOW)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if MASK:  # again: the next sequence's V rows may make dP inf, and 0 * inf is not 0
            ds = tl.where(keep, ds, 0.0)
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dq_tma_kernel(
    Q, desc_k, desc_v, O, DO, DQ, LSE, DELTA, CU,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(HEAD_DIM == BLOCK_D)
    h = tl.program_id(0)
    start, L, m0 = _query_block(CU, BLOCK_M)
    if m0 >= L:
        return
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    tok_m = (start + offs_m).to(tl.int64)
    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    o = tl.load(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = h.to(tl.int64) * total + start + offs_m
    tl.store(DELTA + row, delta, mask=m_ok)
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * LOG2E
    qk_scale = sm_scale * LOG2E
    lo, clean_lo, clean_hi, hi = _key_ranges(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    col = kvh * HEAD_DIM
    if HAS_WINDOW:
        dq = _dq_inner_tma(dq, q, do, lse2, delta, desc_k, desc_v, start, col, offs_m, L, lo, clean_lo, qk_scale,
                           sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner_tma(dq, q, do, lse2, delta, desc_k, desc_v, start, col, offs_m, L, clean_lo, clean_hi, qk_scale,
                       sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner_tma(dq, q, do, lse2, delta, desc_k, desc_v, start, col, offs_m, L, clean_hi, hi, qk_scale,
                       sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


def launch_dq_tma(out, dout, q, k, v, lse, delta, dq, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap,
                  cfg):
    grid = _grid(q.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_M"])
    launcher(_dq_tma_kernel)[grid](
        q, _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]), out, dout, dq, lse,
        delta, cu_seqlens, q.stride(0), q.stride(1), out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1), q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window,
        **_flags(q, causal, window, softcap, cfg))


# --- dK/dV with Q/dO streamed by TMA --------------------------------------------------------------------------

@triton.jit
def _dkdv_inner_tma(dk, dv, k, v, desc_q, desc_do, lse_base, delta_base, row0, h0, total, group, offs_n, L, lo, hi,
                    qk_scale, sm_scale, softcap, window,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    per_head = tl.maximum(blocks, 1)  # see _bwd_dkdv_inner: an empty range must not divide by zero
    for it in range(0, group * blocks):
        g = it // per_head
        m = lo + (it - g * per_head) * BLOCK_M
        offs_m = m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q = desc_q.load([row0 + m, (h0 + g) * HEAD_DIM])  # [M, D]
        do = desc_do.load([row0 + m, (h0 + g) * HEAD_DIM])
        lse_ptrs = lse_base + g.to(tl.int64) * total + offs_m
        delta_ptrs = delta_base + g.to(tl.int64) * total + offs_m
        if MASK:  # rows of the next sequence: 0 (their dS and P are 0, but 0 * inf would not be)
            q = tl.where(m_ok[:, None], q, 0.0)
            do = tl.where(m_ok[:, None], do, 0.0)
            lse2 = tl.load(lse_ptrs, mask=m_ok, other=0.0) * LOG2E
            delta = tl.load(delta_ptrs, mask=m_ok, other=0.0)
        else:
            lse2 = tl.load(lse_ptrs) * LOG2E
            delta = tl.load(delta_ptrs)
        dk, dv = _dkdv_step(dk, dv, k, v, tl.trans(q), do, lse2, delta, offs_m, offs_n, L, qk_scale, sm_scale,
                            softcap, window, MASK, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dkdv_tma_kernel(
    desc_q, K, V, desc_do, DK, DV, LSE, DELTA, CU,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, group, sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(HEAD_DIM == BLOCK_D)
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= L:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    tok_n = (start + offs_n).to(tl.int64)
    k = tl.load(K + tok_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + tok_n[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E
    n_last = tl.minimum(n0 + BLOCK_N, L) - 1
    if CAUSAL:
        lo = n0 // BLOCK_M * BLOCK_M
        clean_lo = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = n0 * 0
        clean_lo = n0 * 0
    hi = L
    clean_hi = L // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(L, n_last + window)
        clean_hi = tl.minimum(clean_hi, (n0 + window) // BLOCK_M * BLOCK_M)
    clean_lo = tl.minimum(clean_lo, hi)
    clean_hi = tl.maximum(tl.minimum(clean_hi, hi), clean_lo)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = kvh * group
    lse_base = LSE + h0.to(tl.int64) * total + start
    delta_base = DELTA + h0.to(tl.int64) * total + start
    dk, dv = _dkdv_inner_tma(dk, dv, k, v, desc_q, desc_do, lse_base, delta_base, start, h0, total, group, offs_n, L,
                             lo, clean_lo, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION)
    dk, dv = _dkdv_inner_tma(dk, dv, k, v, desc_q, desc_do, lse_base, delta_base, start, h0, total, group, offs_n, L,
                             clean_lo, clean_hi, qk_scale, sm_scale, softcap, window, False, CAUSAL, HAS_WINDOW,
                             HAS_SOFTCAP, BLOCK_M, HEAD_DIM, DOT_PRECISION)
    dk, dv = _dkdv_inner_tma(dk, dv, k, v, desc_q, desc_do, lse_base, delta_base, start, h0, total, group, offs_n, L,
                             clean_hi, hi, qk_scale, sm_scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + tok_n[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(DV + tok_n[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None])


def launch_dkdv_tma(dout, q, k, v, lse, delta, dk, dv, cu_seqlens, max_seqlen, softmax_scale, causal, window,
                    softcap, cfg):
    grid = _grid(k.shape[1], cu_seqlens, max_seqlen, cfg["BLOCK_N"])
    launcher(_dkdv_tma_kernel)[grid](
        _descriptor(q, cfg["BLOCK_M"]), k, v, _descriptor(dout, cfg["BLOCK_M"]), dk, dv, lse,
        delta, cu_seqlens, k.stride(0), k.stride(1), v.stride(0), v.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), q.shape[0], q.shape[1] // k.shape[1], softmax_scale, softcap, window,
        **_flags(q, causal, window, softcap, cfg))
