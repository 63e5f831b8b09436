"""Reference linear cross-entropy: materializes the logits, so only for checking and small problems."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def logits(hidden, weight, bias=None, softcap=None, logit_scale=None):
    """``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)``, in float32 or wider."""
    dtype = compute_dtype(hidden.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         num_items_in_batch=None, softcap=None, logit_scale=None):
    """Returns ``(loss, logprobs, entropy, is_argmax)``; the last three per token and without gradient.

    ``hidden`` [T, H], ``labels`` [T] (already shifted). Ignored tokens contribute 0 loss; ``mean`` divides by
    ``num_items_in_batch`` when given, else by the number of labelled tokens (at least 1, so all-ignored
    gives 0 rather than NaN).
    """
    z = logits(hidden, weight, bias, softcap, logit_scale)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(z, dim=-1)
    token_logprob = logp.gather(-1, safe_labels[:, None]).squeeze(-1) * valid
    token_loss = -token_logprob
    if reduction == "none":
        loss = token_loss
    elif reduction == "sum":
        loss = token_loss.sum()
    else:
        denom = valid.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = token_loss.sum() / denom.to(token_loss.device, token_loss.dtype).clamp(min=1)
    with torch.no_grad():
        probs = logp.exp()
        entropy = -(probs * logp).sum(-1)
        is_argmax = (z.argmax(-1) == labels) & valid
    return loss, token_logprob.detach(), entropy, is_argmax
