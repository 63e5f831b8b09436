"""SwiGLU and GeGLU (tanh), forward+backward, Llama-3-8B intermediate size (14336), bf16; the providers and inputs
of ``bench.bench_norm_rope_act`` (fastsft has no cuda kernel for these: that provider skips)."""

import pytest

from bench import bench_norm_rope_act as nra
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="gated_activation")
TOKENS = timing.preset([16384], [8192, 16384])


@pytest.mark.parametrize("tokens", TOKENS, ids=timing.tokens_id)
@pytest.mark.parametrize("provider", nra.PROVIDERS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_activation(benchmark, device, activation, provider, tokens):
    timing.skip_unavailable("gated_activation", provider, device)
    timing.measure_norm_rope_act(benchmark, activation, provider, tokens, device)
