"""LoRA projections, forward+backward: the gated MLP block and the attention projections (QKV + O), Llama-3.1-8B
shapes, r=16 on every projection, frozen base weights, bf16; the blocks and providers of ``bench.bench_lora``
(no adapter, PEFT, fastsft one projection at a time, fastsft's fused block ops)."""

import functools

import pytest
import torch

from bench import bench_lora
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="lora")
TOKENS = timing.preset([8192], [8192, 16384])


@functools.cache
def blocks():
    """Built once for the module: both blocks, plain and with PEFT adapters, on the same weights."""
    torch.manual_seed(0)
    return bench_lora._build(bench_lora.Config(), torch.device("cuda"))


@pytest.mark.parametrize("tokens", TOKENS, ids=timing.tokens_id)
@pytest.mark.parametrize("provider", bench_lora.PROVIDERS)
@pytest.mark.parametrize("block", bench_lora.BLOCKS)
def test_lora(benchmark, device, block, provider, tokens):
    pytest.importorskip("peft")
    c = bench_lora.Config(tokens=tokens)
    plain, lora = blocks()[block]
    fn = bench_lora._providers(block, plain, lora)[provider]

    def make():
        x = torch.randn(tokens, c.hidden, device=device, dtype=c.dtype, requires_grad=True)
        if block == "mlp":
            return (x,)
        return x, torch.randn(tokens, c.heads * c.head_dim, device=device, dtype=c.dtype, requires_grad=True)

    adapters = [] if provider == "no-adapter" else [p for p in lora.parameters() if p.requires_grad]
    timing.measure(benchmark, fn, make, device, shared=adapters)
