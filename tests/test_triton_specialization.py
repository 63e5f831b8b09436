"""Sizes that change with every batch (the packed token count, the sequence length) do not make Triton compile a
new variant of a kernel: a variant first met mid-training stalls that step for seconds (Triton specializes integer
arguments on divisibility by 16 unless told not to)."""

import pytest
import torch

from fastsft.ops import flash_attention_varlen, rms_norm, rope
from fastsft.triton_kernels import flash_attention, rms_norm as rms_norm_kernels, rope as rope_kernels

pytestmark = pytest.mark.gpu

KERNELS = [flash_attention._flash_fwd_kernel, flash_attention._bwd_dq_kernel, flash_attention._bwd_dkdv_kernel,
           rms_norm_kernels._rms_norm_backward_kernel, rope_kernels._rope_kernel]


def compiled_variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())  # (kernel cache, ...) per device


def packed_step(total: int) -> None:
    """Attention, RoPE and RMSNorm forward and backward over ``total`` tokens in two packed sequences."""
    torch.manual_seed(total)
    dev, dt = torch.device("cuda"), torch.bfloat16
    first = total // 3
    cu = torch.tensor([0, first, total], dtype=torch.int32, device=dev)
    q = torch.randn(total, 4, 64, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(total, 2, 64, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(total, 2, 64, device=dev, dtype=dt, requires_grad=True)
    flash_attention_varlen(q, k, v, cu, total - first, backend="triton").sum().backward()
    qr = torch.randn(1, 4, total, 64, device=dev, dtype=dt, requires_grad=True)
    kr = torch.randn(1, 2, total, 64, device=dev, dtype=dt, requires_grad=True)
    angle = torch.rand(1, total, 32, device=dev)
    angle = torch.cat((angle, angle), dim=-1)
    oq, ok = rope(qr, kr, angle.cos().to(dt), angle.sin().to(dt), backend="triton")
    (oq.sum() + ok.sum()).backward()
    x = torch.randn(total, 256, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(256, device=dev, dtype=dt, requires_grad=True)
    rms_norm(x, w, 1e-6, backend="triton").sum().backward()
    torch.cuda.synchronize()


def test_one_compiled_variant_serves_every_token_count():
    packed_step(64)  # divisible by 16: the variant Triton would specialize
    variants = [compiled_variants(kernel) for kernel in KERNELS]
    assert all(n >= 1 for n in variants), variants  # each kernel ran
    for total in (63, 65, 97, 128, 1000):
        packed_step(total)
    assert [compiled_variants(kernel) for kernel in KERNELS] == variants
