"""Causal attention forward+backward, 32 query / 8 key/value heads of 128, bf16: one dense row and a packed row
(random lengths 100-2000); the providers of ``bench.bench_attention`` (fastsft's Triton kernel, SDPA with the
block-diagonal mask transformers builds, FlexAttention with a document mask, torch's ``varlen_attn``).
TFLOP/s counts only in-sequence causal pairs (``bench_attention.useful_flops``)."""

import pytest
import torch

from bench import bench_attention as attn
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="attention")
HEAD_DIM = 128


def _id(case):
    kind, tokens = case
    return f"{kind}-{timing.tokens_id(tokens)}"


@pytest.mark.parametrize("case", attn.cases(timing.quick()), ids=_id)
@pytest.mark.parametrize("provider", attn.PROVIDERS)
def test_attention(benchmark, device, provider, case):
    if provider == "varlen_attn":
        from fastsft.transformers_attention import _torch_varlen

        if _torch_varlen() is None:
            pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    kind, tokens = case
    lengths = [tokens] if kind == "dense" else attn.packed_lengths(tokens, seed=0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def make():
        q = torch.randn(tokens, attn.HQ, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, attn.HKV, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(tokens, attn.HKV, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
        return attn.MAKERS[provider](q, k, v, cu, lengths), q, k, v  # the call closes over its own q, k, v

    flop = attn.useful_flops(lengths, HEAD_DIM)[1]
    timing.measure(benchmark, lambda call, *qkv: call(), make, device, work={"flop": flop})
