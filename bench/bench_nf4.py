"""NF4 dequantization at Llama-3-8B shapes: fastsft's ``cuda`` and ``triton`` backends vs bitsandbytes, one run.

    python -m bench.bench_nf4 --out bench/results [--quick]

Weights 4096x4096 (q/o projections) and 14336x4096 (MLP), NF4 with blocksize 64, with and without double
quantization, dequantized to bfloat16. Providers: ``bitsandbytes`` (``functional.dequantize_4bit``, the same
packed weight and quant state), ``fastsft-cuda`` and ``fastsft-triton`` (``fastsft.ops.dequantize_nf4`` writing
into a preallocated buffer; bitsandbytes allocates its output) and ``fastsft-lora``
(``fastsft.ops.lora.Bnb4bitWeight.dequantize``: a fresh output each call on the ``auto`` backend, as the fused LoRA
ops run it). Every fastsft
result is first checked equal bit for bit to bitsandbytes'. Rows: median time, p20/p80, GB/s of the bytes that
must move (packed codes + absmax state read, bf16 weight written) and that as a fraction of the card's
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import harness

SHAPES = ((4096, 4096), (14336, 4096))
PROVIDERS = ("bitsandbytes", "fastsft-cuda", "fastsft-triton", "fastsft-lora")
BLOCKSIZE = 64


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = harness.time_ms(lambda: dst.copy_(src), rep_ms=300)["ms"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def quantized(shape, nested: bool):
    """A bitsandbytes NF4 weight: (packed, quant_state), quantized by bitsandbytes on the GPU."""
    import bitsandbytes.functional as F

    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
    return F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")


def min_bytes(packed, state) -> int:
    n = state.shape.numel()
    b = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size() + 2 * n
    if state.nested:
        b += state.state2.absmax.numel() * 4
    return b


def measure(provider: str, shape, nested: bool, copy_gbs: float) -> dict:
    import bitsandbytes.functional as F

    from fastsft import ops

    row = {"provider": provider, "shape": f"{shape[0]}x{shape[1]}", "double_quant": nested}
    packed, state = quantized(shape, nested)
    want = F.dequantize_4bit(packed, state)
    if provider == "bitsandbytes":
        fn = lambda: F.dequantize_4bit(packed, state)  # noqa: E731
    elif provider == "fastsft-lora":
        from fastsft.ops.lora import Bnb4bitWeight

        param = packed.clone()
        param.quant_state = state
        fn = Bnb4bitWeight(param).dequantize
        row["bit_exact"] = bool(torch.equal(fn(), want))
    else:
        kwargs = ops.from_bnb(type("P", (), {"data": packed, "quant_state": state, "device": packed.device})())
        buf = torch.empty_like(want)
        backend = provider.removeprefix("fastsft-")
        fn = lambda: ops.dequantize_nf4(**kwargs, out=buf, backend=backend)  # noqa: E731
        fn()
        row["bit_exact"] = bool(torch.equal(buf, want))
    try:
        row.update(harness.time_ms(fn, rep_ms=300))
    except Exception as exc:  # one provider failing must not lose the others' rows
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["GB/s"] = min_bytes(packed, state) / (row["ms"] * 1e-3) / 1e9
    row["of_copy_bw"] = row["GB/s"] / copy_gbs
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="14336x4096 with double quantization only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_nf4 needs a CUDA GPU")
    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    cases = [((14336, 4096), True)] if args.quick else [(s, n) for s in SHAPES for n in (True, False)]
    rows = []
    for shape, nested in cases:
        for provider in args.providers.split(","):
            row = measure(provider, shape, nested, copy_gbs) | {"copy_GB/s": copy_gbs}
            print(row, flush=True)
            rows.append(row)
    harness.write(rows, args.out, "nf4", ["shape", "double_quant", "provider", "ms", "ms_p20", "ms_p80", "GB/s",
                                          "of_copy_bw", "bit_exact", "error"],
                  "NF4 dequantization (bf16 out, blocksize 64)", extra={"blocksize": BLOCKSIZE})


if __name__ == "__main__":
    main()
