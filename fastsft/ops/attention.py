"""Packed (varlen) flash attention: several sequences in one row of tokens, no attention across them.

The layout is flash-attn's varlen API: ``q`` [total_tokens, Hq, D], ``k``/``v`` [total_tokens, Hkv, D], and
``cu_seqlens`` (int32 [num_seqs + 1]: 0, end of sequence 0, ..., total_tokens). Backends:
- ``triton``: ``fastsft.triton_kernels.flash_attention`` (forward saves the log-sum-exp; FA2 backward with a
  dK/dV kernel and a dQ kernel, no atomics, so always deterministic).
- ``reference``: explicit scores per sequence (``fastsft.reference.attention``), autograd through PyTorch.
"""

from __future__ import annotations

import math

import torch

from fastsft import backends, card_table
from fastsft._tensor_cache import LastTensorCache
from fastsft.reference import attention as reference

OP = "flash_attention_varlen"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL_HEAD_DIM = 256


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, *, causal: bool = True, softmax_scale: float | None = None,
                           window: int | None = None, softcap: float | None = None, deterministic: bool = True,
                           backend: str = "auto") -> torch.Tensor:
    """Attention of packed sequences; returns [total_tokens, Hq, D] in q's dtype.

    Args:
        q: [total_tokens, Hq, D]; k, v: [total_tokens, Hkv, D] with ``Hq % Hkv == 0`` (grouped-query attention:
            query head ``h`` reads K/V head ``h // (Hq // Hkv)``). float16, bfloat16 or float32 (float64 on the
            reference backend); the Triton backend takes head dims up to 256.
        cu_seqlens: int32 [num_seqs + 1], non-decreasing, from 0 to total_tokens, on q's device.
        max_seqlen: the longest sequence (a Python int, at least ``max(diff(cu_seqlens))``): it sizes the
            kernel grid without a host sync.
        causal: query i sees keys j <= i of its sequence (else every key of its sequence).
        softmax_scale: default ``1 / sqrt(D)``.
        window: sliding window (left size, needs ``causal``): query i sees keys j with ``i - window < j <= i``;
            None for no limit.
        softcap: Gemma 2's logit soft-capping ``cap * tanh(s / cap)`` before the softmax; None for none.
        deterministic: accepted for flash-attn compatibility; every backend here is deterministic.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see :mod:`fastsft.backends`).

    Gradients flow to q, k and v. cu_seqlens values are checked on the CPU; on a GPU they are checked by an
    asynchronous device assert (no host sync), skipped while compiling.
    """
    del deterministic
    _check(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap)
    _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return backends.dispatch(OP, backend, q.device, q, k, v, cu_seqlens, int(max_seqlen), causal=bool(causal),
                             softmax_scale=scale, window=window, softcap=softcap)


# --- input checks ------------------------------------------------------------------------------------------

def _check(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    name = OP
    for arg, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{name}: q, k and v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: expected q [total, Hq, D] and k, v [total, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{name}: k and v must be [total, Hkv, D] matching q's total and D, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{name}: the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    if q.shape[2] == 0:
        raise ValueError(f"{name}: head dim must be positive")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError(f"{name}: cu_seqlens must be a 1-D int32 tensor [num_seqs + 1], got "
                        f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    devices = {t.device for t in (q, k, v, cu_seqlens)}
    if len(devices) > 1:
        raise ValueError(f"{name}: q, k, v and cu_seqlens must be on one device, got {sorted(map(str, devices))}")
    if isinstance(max_seqlen, torch.Tensor) or isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name}: max_seqlen must be a Python int (it sizes the grid), got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name}: max_seqlen must be non-negative, got {max_seqlen}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"{name}: softmax_scale must be finite, got {softmax_scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name}: window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError(f"{name}: window (a left window) needs causal=True")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"{name}: softcap must be a positive number or None, got {softcap}")


_checked = LastTensorCache()


def _check_cu_seqlens_values(cu_seqlens, total, max_seqlen):
    """0 = cu[0] <= cu[1] <= ... <= cu[-1] = total and every length <= max_seqlen: a kernel reads out of bounds
    otherwise. On the CPU a plain check, not repeated for the same tensor with the same values (every layer of a
    model gets the same cu_seqlens; compared by value, so an edit through ``.data`` is seen). On a GPU an
    asynchronous device assert (no host sync) at every call: a version counter misses such edits, and a value
    comparison would sync. Skipped while compiling."""
    if torch.compiler.is_compiling():
        return
    if cu_seqlens.device.type == "cpu":
        _checked.get(cu_seqlens, lambda cu: _check_cu_seqlens_cpu_values(cu, total, max_seqlen), total, max_seqlen)
    else:
        _assert_cu_seqlens_device_values(cu_seqlens, total, max_seqlen)


def _check_cu_seqlens_cpu_values(cu_seqlens, total, max_seqlen):
    lengths = cu_seqlens.diff()
    if cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != total:
        raise ValueError(f"{OP}: cu_seqlens must start at 0 and end at the number of tokens ({total}), got "
                         f"{cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}")
    if lengths.numel() and lengths.min().item() < 0:
        raise ValueError(f"{OP}: cu_seqlens must be non-decreasing")
    if lengths.numel() and lengths.max().item() > max_seqlen:
        raise ValueError(f"{OP}: max_seqlen ({max_seqlen}) is less than the longest sequence "
                         f"({lengths.max().item()})")


def _assert_cu_seqlens_device_values(cu_seqlens, total, max_seqlen):
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total)
    if cu_seqlens.numel() > 1:
        shortest, longest = torch.aminmax(cu_seqlens.diff())
        ok = ok & (shortest >= 0) & (longest <= max_seqlen)
    torch._assert_async(ok, f"{OP}: bad cu_seqlens (must go from 0 to {total}, non-decreasing, lengths <= "
                            f"max_seqlen {max_seqlen})")


# --- reference backend ---------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale, window, softcap, launch):
    del max_seqlen, launch
    return reference.flash_attention_varlen(q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale,
                                            window=window, softcap=softcap)


# --- triton backend ------------------------------------------------------------------------------------------

class KernelLaunch:
    """The Triton kernels' launch configurations on one device: the card table's tuned entries (section
    ``attention_kernels``) over the kernels' defaults, as the ops take them, worked out once per case (head dim,
    dtype width, short or long rows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tuned = dict(card_table.section(device, "attention_kernels"))
        self._configs: dict = {}

    def configs(self, head_dim: int, element_size: int, max_seqlen: int) -> tuple[list[int], list[int], list[int]]:
        """The forward, dQ and dK/dV kernels' configurations (:func:`~fastsft.triton_kernels.flash_attention.
        config_args`) for this case."""
        from fastsft.triton_kernels import flash_attention as fa

        key = (head_dim, element_size, max_seqlen > fa.LONG_SEQLEN)
        found = self._configs.get(key)
        # worked out again when kernel_config is not the one they came from (a test or tool replaced it)
        if found is None or found[0] is not fa.kernel_config:
            found = self._configs[key] = (fa.kernel_config, tuple(
                fa.config_args(fa.kernel_config(kernel, head_dim, self.device, element_size, max_seqlen, self.tuned))
                for kernel in ("fwd", "dq", "dkdv")))
        return found[1]

    def describe(self, head_dim: int, element_size: int = 2) -> str:
        """The configurations for ``head_dim`` (short and long rows), for reports."""
        from fastsft.triton_kernels import flash_attention as fa

        parts = []
        for bucket, max_seqlen in (("short", 0), ("long", fa.LONG_SEQLEN + 1)):
            for kernel, args in zip(("fwd", "dq", "dkdv"), self.configs(head_dim, element_size, max_seqlen)):
                cfg = fa.config_of(args)
                tuned = fa.table_key(kernel, head_dim, element_size, max_seqlen) in self.tuned
                parts.append(f"{kernel}/{bucket} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} "
                             f"s{cfg['num_stages']}{' tma' if cfg['tma'] else ''}{' (tuned)' if tuned else ''}")
        return ", ".join(parts)


backends.register_launch(OP, KernelLaunch)


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale, window, softcap, launch):
    if q.dtype not in _KERNEL_DTYPES:
        raise backends.Unsupported(f"{OP}: the triton backend takes {_KERNEL_DTYPES}, got {q.dtype}; "
                                   "use backend='reference'")
    if q.shape[-1] > _MAX_KERNEL_HEAD_DIM:
        raise backends.Unsupported(f"{OP}: the triton backend takes head dims up to {_MAX_KERNEL_HEAD_DIM}, got "
                                   f"{q.shape[-1]}; use backend='reference'")
    from fastsft.triton_kernels import flash_attention as fa

    reason = fa.unsupported_reason(cu_seqlens.shape[0] - 1, max_seqlen, q.shape[-1], q.device, q.element_size(),
                                   launch.tuned)
    if reason is not None:  # checked before the forward: the backward launches the same grids and cannot fall back
        raise backends.Unsupported(f"{OP}: the triton backend cannot launch {reason}")
    configs = launch.configs(q.shape[-1], q.element_size(), max_seqlen)
    return _FlashAttnVarlen.apply(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, int(window or 0),
                                  float(softcap or 0.0), configs)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap, configs):
        from fastsft.triton_kernels.flash_attention import flash_attn_varlen_fwd

        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        fwd_config, dq_config, dkdv_config = configs
        out, lse = flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap, fwd_config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, scale, causal, window, softcap, dq_config, dkdv_config)
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastsft.triton_kernels.flash_attention import flash_attn_varlen_bwd

        _no_double_backward()
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = flash_attn_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def _no_double_backward():
    """A backward pass with create_graph=True would return gradients without a graph of their own: second
    derivatives silently zero or missing. Raised instead; the reference backend has a double backward."""
    if torch.is_grad_enabled():
        raise RuntimeError("flash_attention_varlen: the fast backends have no double backward (create_graph=True); use "
                           "backend='reference'")
