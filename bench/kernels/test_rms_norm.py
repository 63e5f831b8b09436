"""RMSNorm, forward+backward, Llama-3-8B hidden size (4096), bf16, frozen weight; the providers and inputs of
``bench.bench_norm_rope_act``. GB/s counts the bytes the op must move at least."""

import pytest

from bench import bench_norm_rope_act as nra
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="rms_norm")
TOKENS = timing.preset([16384], [8192, 16384])


@pytest.mark.parametrize("tokens", TOKENS, ids=timing.tokens_id)
@pytest.mark.parametrize("provider", nra.PROVIDERS)
def test_rms_norm(benchmark, device, provider, tokens):
    timing.skip_unavailable("rms_norm", provider, device)
    timing.measure_norm_rope_act(benchmark, "rms_norm", provider, tokens, device)
