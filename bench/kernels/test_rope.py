"""RoPE on q and k, forward+backward, Llama-3-8B heads (32 query, 8 key/value, 128 wide) as transformers lays
them out, bf16; the providers and inputs of ``bench.bench_norm_rope_act``."""

import pytest

from bench import bench_norm_rope_act as nra
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="rope")
TOKENS = timing.preset([16384], [8192, 16384])


@pytest.mark.parametrize("tokens", TOKENS, ids=timing.tokens_id)
@pytest.mark.parametrize("provider", nra.PROVIDERS)
def test_rope(benchmark, device, provider, tokens):
    timing.skip_unavailable("rope", provider, device)
    timing.measure_norm_rope_act(benchmark, "rope", provider, tokens, device)
