"""NF4 dequantization to bf16 at Llama-3-8B weight shapes (blocksize 64, with and without double quantization):
bitsandbytes against fastsft's backends, as ``bench.bench_nf4`` (which also checks them bit-exact). The ring
rotates distinct quantized weights: one 14336x4096 weight is 29 MiB, less than an H200's L2."""

from types import SimpleNamespace

import pytest
import torch

from bench import bench_nf4
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="nf4")
CASES = timing.preset([((14336, 4096), True)], [(s, n) for s in bench_nf4.SHAPES for n in (True, False)])


def _id(case):
    (rows, cols), nested = case
    return f"{rows}x{cols}-{'double' if nested else 'single'}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("provider", bench_nf4.PROVIDERS)
def test_nf4(benchmark, device, provider, case):
    pytest.importorskip("bitsandbytes")
    timing.skip_unavailable("dequantize_nf4", provider, device)
    import bitsandbytes.functional as F

    from fastsft import ops

    shape, nested = case
    work = {}

    def make():
        packed, state = bench_nf4.quantized(shape, nested)
        work["bytes"] = bench_nf4.min_bytes(packed, state)
        if provider == "bitsandbytes":
            return packed, state
        kwargs = ops.from_bnb(SimpleNamespace(data=packed, quant_state=state, device=packed.device))
        return kwargs, torch.empty(shape, device=device, dtype=torch.bfloat16)  # preallocated, as the LoRA ops do

    if provider == "bitsandbytes":
        step = F.dequantize_4bit
    else:
        backend = provider.removeprefix("fastsft-")

        def step(kwargs, out):
            ops.dequantize_nf4(**kwargs, out=out, backend=backend)

    timing.run(benchmark, step, timing.Ring.build(make, device), work=work, device=device)
