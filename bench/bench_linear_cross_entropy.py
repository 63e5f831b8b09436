"""Linear cross-entropy, forward+backward, every provider in one run on one GPU.

    python -m bench.bench_linear_cross_entropy --out bench/results [--quick] [--write-table]

Providers: PyTorch eager (``lm_head`` + ``F.cross_entropy`` in float32, as transformers does),
``torch.compile`` of the same, Liger-Kernel's fused linear cross-entropy, TRL 1.16's chunked log-prob kernel,
and fastsft's ``triton`` and ``cuda`` backends. Llama-3-8B head (hidden 4096, vocab 128,256), bf16. Frozen
weight (the LoRA case: gradient of the hidden states only) and trainable weight. Rows record the median time,
p20/p80, the peak memory above the inputs, and the matmul floor 4·T·H·V (6·T·H·V when the weight trains) at
the bf16 matmul rate measured in the same run. ``--write-table`` stores fastsft's backend order for this card
in fastsft's per-card table (``fastsft/card_table.json``, where it differs from the default; faster first).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness

HIDDEN, VOCAB = 4096, 128_256


def eager_loss(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)


_compiled = None


def compiled_loss(h, w, y):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_loss, dynamic=False)
    return _compiled(h, w, y)


def liger_loss(h, w, y):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(w, h, y)


def trl_loss(h, w, y):
    from trl.kernels import ChunkedLogProbFunction

    mask = y != -100
    log_probs = ChunkedLogProbFunction.apply(h, w, None, y.clamp(min=0), 1.0, 32768, None, 1.0, ("log_probs",))[0]
    return -(log_probs * mask).sum() / mask.sum().clamp(min=1)


def fastsft_loss(backend):
    from fastsft.ops import linear_cross_entropy

    return lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend)


PROVIDERS = {
    "pytorch-eager": eager_loss,
    "torch-compile": compiled_loss,
    "liger": liger_loss,
    "trl-chunked": trl_loss,
    "fastsft-triton": fastsft_loss("triton"),
    "fastsft-cuda": fastsft_loss("cuda"),
}


def matmul_tflops() -> float:
    """The card's bf16 matmul rate, measured now (8192^3)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = harness.time_ms(lambda: a @ b, rep_ms=300)["ms"]
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def measure(provider: str, tokens: int, trainable: bool, tflops: float) -> dict:
    row = {"provider": provider, "tokens": tokens, "weight": "trainable" if trainable else "frozen"}
    fn = PROVIDERS[provider]
    torch.manual_seed(0)
    h = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5).requires_grad_(trainable)
    y = torch.randint(0, VOCAB, (tokens,), device="cuda")
    y[torch.rand(tokens, device="cuda") < 0.1] = -100
    leaves = [h, w] if trainable else [h]

    def step():
        fn(h, w, y).backward()

    try:
        step()  # compile / autotune / warm caches
        torch.cuda.synchronize()
        row["peak_extra_GiB"] = harness.peak_extra_bytes(step) / 2**30
        row.update(harness.time_ms(step, grad_to_none=leaves, rep_ms=800))
        flop = (6 if trainable else 4) * tokens * HIDDEN * VOCAB
        row["floor_ms"] = flop / (tflops * 1e12) * 1e3
        row["vs_floor"] = row["ms"] / row["floor_ms"]
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # one provider failing must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        for t in leaves:
            t.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def breakdown(tokens: int = 16384) -> list[dict]:
    """Where fastsft's time goes at the 8B head: each chunk's two GEMMs and row kernel alone, and the whole op
    at several chunk sizes (time against peak memory)."""
    from fastsft.ops import linear_cross_entropy
    from fastsft.triton_kernels.cross_entropy import cross_entropy_rows as triton_rows

    rows = []
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
    for chunk in (256, 512, 1024, 2048):
        h = torch.randn(chunk, HIDDEN, device="cuda", dtype=torch.bfloat16)
        z = torch.empty(chunk, VOCAB, device="cuda", dtype=torch.bfloat16)
        gh = torch.empty_like(h)
        y = torch.randint(0, VOCAB, (chunk,), device="cuda")
        one = torch.ones(1, device="cuda")
        torch.mm(h, w.t(), out=z)
        parts = {
            "gemm logits": (lambda: torch.mm(h, w.t(), out=z), 2 * chunk * HIDDEN * VOCAB, 0),
            "gemm grad hidden": (lambda: torch.mm(z, w, out=gh), 2 * chunk * HIDDEN * VOCAB, 0),
            "rows triton": (lambda: triton_rows(z, y, one, 1.0, 0.0, -100, True, False), 0, 3 * z.numel() * 2),
            "rows cuda": (lambda: torch.ops.fastsft.cross_entropy_rows(z, y, one, 1.0, 0.0, -100, True, False),
                          0, 3 * z.numel() * 2),
        }
        for name, (fn, flop, nbytes) in parts.items():
            t = harness.time_ms(fn, rep_ms=300)["ms"]
            row = {"part": name, "chunk": chunk, "ms": t, "x_chunks_ms": t * tokens / chunk}
            if flop:
                row["TFLOP/s"] = flop / (t * 1e-3) / 1e12
            if nbytes:
                row["GB/s"] = nbytes / (t * 1e-3) / 1e9
            rows.append(row)
            print(row, flush=True)
    hid = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, VOCAB, (tokens,), device="cuda")
    for backend in ("cuda", "triton"):
        for chunk in (256, 512, 1024, 2048):
            def step():
                linear_cross_entropy(hid, w, y, backend=backend, chunk_size=chunk).backward()
            step()
            row = {"part": f"whole op {backend}", "chunk": chunk, "tokens": tokens,
                   "peak_extra_GiB": harness.peak_extra_bytes(step) / 2**30}
            row.update(harness.time_ms(step, grad_to_none=[hid], rep_ms=600))
            rows.append(row)
            print(row, flush=True)
    return rows


def write_backend_table(rows: list[dict]) -> None:
    """Order fastsft's backends for this card by their median time at the largest frozen-weight size."""
    ours = [r for r in rows if r["provider"].startswith("fastsft-") and r["weight"] == "frozen" and "ms" in r]
    if not ours:
        return
    largest = max(r["tokens"] for r in ours)
    ranked = sorted((r for r in ours if r["tokens"] == largest), key=lambda r: r["ms"])
    order = [r["provider"].removeprefix("fastsft-") for r in ranked] + ["reference"]
    harness.write_backend_order(torch.cuda.get_device_name(), {"linear_cross_entropy": order})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", default="4096,16384,32768", help="comma-separated token counts")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="16k tokens only, frozen and trainable")
    parser.add_argument("--write-table", action="store_true", help="store fastsft's backend order for this card")
    parser.add_argument("--breakdown", action="store_true", help="only the per-part and chunk-size breakdown")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear_cross_entropy needs a CUDA GPU")
    if args.breakdown:
        harness.write(breakdown(), args.out, "linear_cross_entropy_breakdown",
                      ["part", "chunk", "tokens", "ms", "x_chunks_ms", "TFLOP/s", "GB/s", "peak_extra_GiB"],
                      "Linear cross-entropy: where the time goes (Llama-3-8B head, bf16, frozen weight)")
        return
    tokens = [16384] if args.quick else [int(t) for t in args.tokens.split(",")]
    tflops = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for trainable in (False, True):
        for t in tokens:
            for provider in args.providers.split(","):
                rows.append(measure(provider, t, trainable, tflops) | {"matmul_tflops": tflops})
    harness.write(rows, args.out, "linear_cross_entropy",
                  ["provider", "weight", "tokens", "ms", "ms_p20", "ms_p80", "peak_extra_GiB", "floor_ms",
                   "vs_floor", "error"],
                  "Linear cross-entropy, forward+backward (Llama-3-8B head, bf16)")
    if args.write_table:
        write_backend_table(rows)


if __name__ == "__main__":
    main()
