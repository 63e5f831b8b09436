"""Output shapes of fastsft's kernel ops: the fake implementations that ``torch.compile``, meta tensors and
fake-tensor tracing call instead of launching a kernel.

The compiled extension's ops (``fastsft::<name>``, registered by :mod:`fastsft.ops`) and the Triton ops
(``fastsft::<name>_triton``, in ``fastsft.triton_kernels``) of one kernel return the same shapes, so both register
the function here: this module sits below both and imports neither.
"""

from __future__ import annotations

import torch


def rms_norm_forward_fake(x, weight, residual, eps, offset):
    rows = x.shape[0]
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), s, x.new_empty(rows, dtype=torch.float32)


def rms_norm_backward_fake(grad_y, grad_sum, s, weight, rstd, offset, compute_weight_grad):
    return torch.empty_like(s), s.new_empty(s.shape[1] if compute_weight_grad else 0, dtype=torch.float32)


def gated_activation_forward_fake(gate, up, activation):
    return gate.new_empty(gate.shape)


def gated_activation_backward_fake(grad, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def rope_fake(q, k, cos, sin, inverse):
    """The compiled op's outputs: contiguous, in q's shape and dtype (the Triton op keeps the inputs' layout)."""
    return q.new_empty(q.shape), k.new_empty(k.shape)


def cross_entropy_rows_fake(logits, labels, grad_scale, scale, softcap, ignore_index, compute_grad,
                            compute_entropy):
    """Shapes and dtypes of the row kernels' outputs."""
    rows = logits.shape[0]
    loss = logits.new_empty(rows, dtype=torch.float32)
    return (loss, torch.empty_like(loss), logits.new_empty(rows if compute_entropy else 0, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.int64))


def dequantize_nf4_fake(packed, absmax, code, nested_absmax, nested_code, blocksize, nested_blocksize, offset, out):
    """The op only writes ``out``."""
    return None
