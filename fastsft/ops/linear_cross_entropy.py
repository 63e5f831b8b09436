"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` without the [tokens, vocab] logits.

How the fast backends work (``triton`` and ``cuda`` differ only in the row kernel):
- Tokens are taken a chunk at a time; the chunk's logits come from one cuBLAS GEMM into a reused buffer of at
  most ``_CHUNK_BYTES``.
- A row kernel (``fastsft.triton_kernels.cross_entropy`` or the compiled ``fastsft::cross_entropy_rows``) finds
  each row's log-sum-exp, loss, entropy and argmax, and overwrites the logits with d(loss)/d(logits).
- For ``mean``/``sum`` the gradients are finished in the forward pass (one more GEMM for the hidden states,
  one for the weight only if it requires grad), so the backward pass only scales them: 4·T·H·V FLOP in all
  for a frozen head. For ``reduction="none"`` the backward pass needs the per-token upstream gradient, so it
  recomputes the logits instead.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from fastsft.fakes import cross_entropy_rows_fake
from fastsft import _extension, backends
from fastsft.reference import linear_cross_entropy as reference

OP = "linear_cross_entropy"
_CHUNK_BYTES = 128 * 2**20  # logits buffer: 128 MiB keeps the extra memory at 16k x 128k-vocab under 0.25 GiB
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("mean", "sum", "none")


class TokenStats(NamedTuple):
    """Per-token statistics, without gradient, in the shape of ``labels``.

    ``logprobs``: log-probability of the label (0 where ignored); ``entropy``: entropy of the predicted
    distribution (every token, ignored ones too); ``is_argmax``: whether the label is the first argmax of the
    logits (False where ignored).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    is_argmax: torch.Tensor


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: int | torch.Tensor | None = None, softcap: float | None = None,
                         logit_scale: float | None = None, return_token_stats: bool = False,
                         chunk_size: int | None = None, backend: str = "auto"):
    """Cross-entropy of ``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` against ``labels``.

    Args:
        hidden: [..., H] hidden states (float16, bfloat16 or float32; float64 on the reference backend).
        weight: [V, H] output projection, same dtype and device as ``hidden``.
        labels: [...] target ids, already shifted; ``ignore_index`` marks tokens without a loss.
        bias: optional [V].
        reduction: ``"mean"`` (over labelled tokens, or ``/ num_items_in_batch`` when given, as transformers
            does under gradient accumulation: a whole number > 0, a Python number or a one-element tensor),
            ``"sum"`` or ``"none"`` (per token, shape of ``labels``).
        softcap: Gemma 2's final logit soft-capping; ``logit_scale``: Cohere/Granite's logit multiplier
            (applied before the softcap).
        return_token_stats: also return a :class:`TokenStats` (what TRL logs as ``entropy`` and
            ``mean_token_accuracy``).
        chunk_size: tokens per chunk on the fast backends (default: the most whose logits fit 128 MiB).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see :mod:`fastsft.backends`).

    Returns the loss in float32 (a scalar, or per token for ``"none"``), or ``(loss, TokenStats)``. When every
    label is ignored the loss is 0 and the gradients are zero. Gradients flow to ``hidden``, and to ``weight``
    and ``bias`` only when they require grad.
    """
    _check(hidden, weight, labels, bias, reduction, softcap, logit_scale, chunk_size, num_items_in_batch)
    labels = labels.to(torch.int64)
    _check_label_range(labels, weight.shape[0], ignore_index)
    shape = labels.shape
    loss, logprobs, entropy, is_argmax = backends.dispatch(
        OP, backend, hidden.device, hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
        bias=bias, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        softcap=softcap, logit_scale=logit_scale, want_stats=return_token_stats, chunk_size=chunk_size)
    if reduction == "none":
        loss = loss.reshape(shape)
    if not return_token_stats:
        return loss
    return loss, TokenStats(logprobs.reshape(shape), entropy.reshape(shape), is_argmax.reshape(shape))


# --- input checks ------------------------------------------------------------------------------------------

def _check(hidden, weight, labels, bias, reduction, softcap, logit_scale, chunk_size, num_items_in_batch):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: hidden and weight must share a floating dtype, got "
                        f"{hidden.dtype} and {weight.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be integer ids, got {labels.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [..., H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels must have shape {tuple(hidden.shape[:-1])} "
                         f"(hidden without its last dim), got {tuple(labels.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be [{weight.shape[0]}] of {weight.dtype}, got "
                         f"{tuple(bias.shape)} of {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"linear_cross_entropy: all tensors must be on one device, got {sorted(map(str, devices))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"linear_cross_entropy: softcap must be a positive number, got {softcap}")
    if logit_scale is not None and not (logit_scale != 0 and math.isfinite(logit_scale)):
        raise ValueError(f"linear_cross_entropy: logit_scale must be finite and non-zero, got {logit_scale}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError("linear_cross_entropy: num_items_in_batch only applies to reduction='mean'")
        _check_num_items(num_items_in_batch)
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (a vocabulary of 0): there is no label to score")


def _check_num_items(n):
    """The number of labelled tokens that ``mean`` divides by (transformers passes an int64 device tensor): a whole
    number >= 0, as a Python number or a one-element tensor. 0 is a real case (no labelled token in the whole
    accumulated batch, so none in this micro-batch either): the loss is then 0, as for a mean over no labelled
    token, where an unfused loss would divide 0 by 0. A CUDA tensor is checked by an asynchronous device assert (no
    host sync); tensors are not checked while compiling."""
    name = "linear_cross_entropy: num_items_in_batch"
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"{name} must be a number or a one-element real tensor, got {n.dtype} of shape "
                            f"{tuple(n.shape)}")
        if torch.compiler.is_compiling():
            return
        if n.device.type != "cpu":
            ok = n >= 0
            if n.is_floating_point():
                ok = ok & torch.isfinite(n) & (n == n.round())
            torch._assert_async(ok.reshape(()), f"{name} must be a whole number >= 0")
            return
        value = n.item()
    elif isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(n).__name__}")
    else:
        value = n
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError(f"{name} must be a whole number >= 0 (the count of labelled tokens), got {value}")


def as_device_scalar(n, device: torch.device) -> torch.Tensor:
    """``n`` (a number or a one-element tensor) as a float32 scalar on ``device``, without a host sync: a Python
    number is written by a fill on the device, not copied from host memory."""
    if isinstance(n, torch.Tensor):
        return n.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(n), device=device, dtype=torch.float32)


def _check_label_range(labels, vocab, ignore_index):
    """An id past the vocabulary would read out of bounds in a kernel. On the CPU a plain check; on a GPU an
    asynchronous device assert, queued before the kernels (no host sync). Skipped while compiling."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"linear_cross_entropy: a label is outside the vocabulary [0, {vocab}) and "
                                        f"is not ignore_index ({ignore_index})")
        return
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"linear_cross_entropy: label {first} is outside the vocabulary [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")


# --- reference backend ---------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(hidden, weight, labels, *, bias, ignore_index, reduction, num_items_in_batch, softcap,
                       logit_scale, want_stats, chunk_size):
    del want_stats, chunk_size  # the reference always has its stats and never chunks
    loss, logprobs, entropy, is_argmax = reference.linear_cross_entropy(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, softcap=softcap, logit_scale=logit_scale)
    loss = loss.float() if loss.dtype != torch.float64 else loss
    return loss, logprobs, entropy, is_argmax


# --- chunked backends (triton, cuda) -------------------------------------------------------------------------

def _row_kernel(backend: str):
    """The row kernel op of a chunked backend."""
    if backend == "triton":
        from fastsft.triton_kernels.cross_entropy import cross_entropy_rows

        return cross_entropy_rows
    return torch.ops.fastsft.cross_entropy_rows


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(hidden, weight, labels, **kw):
    return _chunked("triton", hidden, weight, labels, **kw)


@backends.register(OP, "cuda", available=backends.extension_available("cross_entropy_rows"))
def _cuda_backend(hidden, weight, labels, **kw):
    return _chunked("cuda", hidden, weight, labels, **kw)


def default_chunk_size(tokens: int, vocab: int, element_size: int, weight_grad_bytes: int = 0) -> int:
    """Largest power of two of tokens whose logits fit the chunk budget (at least 16, at most 4096).

    The budget is ``_CHUNK_BYTES``, or a quarter of the float32 weight gradient when the weight trains: each
    chunk then reads and writes that whole accumulator, so fewer, larger chunks are much faster, and the
    accumulator already dwarfs the buffer."""
    budget = max(_CHUNK_BYTES, weight_grad_bytes // 4)
    rows = max(1, budget // (vocab * element_size))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(tokens, max(16, min(rows, 4096))))


def _chunked(backend, hidden, weight, labels, *, bias, ignore_index, reduction, num_items_in_batch, softcap,
             logit_scale, want_stats, chunk_size):
    if hidden.dtype not in _KERNEL_DTYPES:
        raise backends.Unsupported(f"linear_cross_entropy: the fast backends take {_KERNEL_DTYPES}, got {hidden.dtype}; "
                        "use backend='reference' for float64")
    if num_items_in_batch is not None:
        denom = as_device_scalar(num_items_in_batch, hidden.device)
    elif reduction == "mean":
        denom = (labels != ignore_index).sum().to(torch.float32)
    else:
        denom = torch.ones((), device=hidden.device, dtype=torch.float32)
    weight_grad_bytes = 4 * weight.numel() if weight.requires_grad and torch.is_grad_enabled() else 0
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.element_size(),
                                             weight_grad_bytes)
    settings = _Settings(backend, ignore_index, reduction, float(softcap or 0.0), float(logit_scale or 1.0),
                         chunk, want_stats)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, denom.clamp(min=1), settings)


class _Settings(NamedTuple):
    backend: str  # "triton" or "cuda": whose row kernel runs
    ignore_index: int
    reduction: str
    softcap: float
    scale: float
    chunk: int
    want_stats: bool


def _accumulate_weight_grad(grad_weight, grad_logits, hidden_chunk):
    """grad_weight (float32) += grad_logits.T @ hidden_chunk, without a [V, H] temporary where possible."""
    if grad_logits.dtype == torch.float32 or grad_logits.device.type != "cuda":
        grad_weight.addmm_(grad_logits.t().float(), hidden_chunk.float())
    else:
        torch.addmm(grad_weight, grad_logits.t(), hidden_chunk, out_dtype=torch.float32, out=grad_weight)


def _run_chunks(s: _Settings, hidden, weight, bias, labels, grad_scale, *, grad_hidden: bool, grad_weight: bool,
                grad_bias: bool):
    """One pass over the token chunks. Returns per-token (loss, entropy, argmax) and the requested gradients
    of ``sum(grad_scale * token_loss)`` (``grad_scale``: float32, one value or one per token)."""
    T, V = hidden.shape[0], weight.shape[0]
    compute_grad = grad_hidden or grad_weight or grad_bias
    losses, entropies, argmaxes = [], [], []
    gh = hidden.new_empty(hidden.shape) if grad_hidden else None  # contiguous, whatever hidden's strides
    gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if grad_weight else None
    gb = torch.zeros(V, device=weight.device, dtype=torch.float32) if grad_bias else None
    buf = hidden.new_empty(min(s.chunk, T), V)
    wt = weight.t()
    rows = _row_kernel(s.backend)
    for start in range(0, T, s.chunk):
        end = min(start + s.chunk, T)
        h, z = hidden[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h, wt, out=z)
        else:
            torch.addmm(bias, h, wt, out=z)
        g_scale = grad_scale if grad_scale.numel() == 1 else grad_scale[start:end]
        loss, _, entropy, argmax = rows(z, labels[start:end], g_scale, s.scale, s.softcap, s.ignore_index,
                                        compute_grad, s.want_stats)
        losses.append(loss)
        entropies.append(entropy)
        argmaxes.append(argmax)
        if not compute_grad:
            continue
        if gh is not None:
            torch.mm(z, weight, out=gh[start:end])
        if gw is not None:
            _accumulate_weight_grad(gw, z, h)
        if gb is not None:
            gb += z.float().sum(0)
    cat = (lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0]) if T else (lambda xs: hidden.new_empty(0))
    return cat(losses), (cat(entropies) if s.want_stats else None), cat(argmaxes), gh, gw, gb


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denom, s: _Settings):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        fused = s.reduction != "none"  # scalar loss: finish the gradients now, scale them in backward
        token_loss, entropy, argmax, gh, gw, gb = _run_chunks(
            s, hidden, weight, bias, labels, (1.0 / denom).reshape(1), grad_hidden=need_h and fused,
            grad_weight=need_w and fused, grad_bias=need_b and fused)
        valid = labels != s.ignore_index
        if s.reduction == "none":
            loss = token_loss
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            loss = token_loss.sum() / denom  # denom is 1 for "sum"
            ctx.save_for_backward(gh, gw, gb)
        ctx.settings, ctx.need = s, (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if s.want_stats:
            stats = (-token_loss, entropy, (argmax == labels) & valid)
        else:
            stats = (token_loss.new_empty(0), token_loss.new_empty(0), valid.new_empty(0))
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        _no_double_backward()
        s, (need_h, need_w, need_b) = ctx.settings, ctx.need
        if s.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, _, _, gh, gw, gb = _run_chunks(s, hidden, weight, bias, labels, grad_loss.float().contiguous(),
                                              grad_hidden=need_h, grad_weight=need_w, grad_bias=need_b)
            factor = None
        else:
            gh, gw, gb = ctx.saved_tensors  # gradients of loss; the upstream gradient is a device scalar
            factor = grad_loss.float()
        h_dtype, w_dtype = ctx.dtypes
        return (_finish(gh, factor, h_dtype), _finish(gw, factor, w_dtype), _finish(gb, factor, w_dtype),
                None, None, None)


def _finish(grad, factor, dtype, part_elements=1 << 24):
    """``(grad * factor).to(dtype)`` with the product in float32 (a bf16 factor would round it by up to 0.4%),
    in place and a part at a time so no full float32 copy of a low-precision gradient is made."""
    if grad is None:
        return None
    if factor is not None:
        if grad.dtype == torch.float32:
            grad.mul_(factor)
        else:
            for part in grad.view(-1).split(part_elements):
                part.copy_(part.float().mul_(factor))
    return grad.to(dtype)


if _extension.load():
    torch.library.register_fake("fastsft::cross_entropy_rows")(cross_entropy_rows_fake)


def _no_double_backward():
    """A backward pass with create_graph=True would return gradients without a graph of their own: second
    derivatives silently zero or missing. Raised instead; the reference backend has a double backward."""
    if torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy: the fast backends have no double backward (create_graph=True); use "
                           "backend='reference'")
