"""Linear cross-entropy, forward+backward, Llama-3-8B head (hidden 4096, vocab 128,256), bf16; the providers of
``bench.bench_linear_cross_entropy``. Frozen weight (LoRA: gradient of the hidden states only) and trainable."""

import pytest
import torch

from bench import bench_linear_cross_entropy as lce
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="linear_cross_entropy")
TOKENS = timing.preset([16384], [4096, 16384])
WEIGHTS = timing.preset(["frozen"], ["frozen", "trainable"])


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("tokens", TOKENS, ids=timing.tokens_id)
@pytest.mark.parametrize("provider", list(lce.PROVIDERS))
def test_linear_cross_entropy(benchmark, device, provider, tokens, weight):
    timing.skip_unavailable("linear_cross_entropy", provider, device)
    trainable = weight == "trainable"
    torch.manual_seed(0)
    w = (torch.randn(lce.VOCAB, lce.HIDDEN, device=device, dtype=torch.bfloat16) / lce.HIDDEN**0.5)
    w.requires_grad_(trainable)

    def make():
        h = torch.randn(tokens, lce.HIDDEN, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, lce.VOCAB, (tokens,), device=device)
        y[torch.rand(tokens, device=device) < 0.1] = -100
        return h, w, y

    flop = (6 if trainable else 4) * tokens * lce.HIDDEN * lce.VOCAB  # the matmuls; 6 when the weight trains
    timing.measure(benchmark, lce.PROVIDERS[provider], make, device, work={"flop": flop})
