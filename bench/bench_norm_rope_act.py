"""RMSNorm, RoPE, SwiGLU and GeGLU, forward+backward, every provider in one run on one GPU.

    python -m bench.bench_norm_rope_act --out bench/results [--quick] [--write-table]

Providers: PyTorch eager (transformers' math), ``torch.compile`` of the same, Liger-Kernel
(``LigerRMSNormFunction``, ``LigerRopeFunction``, ``LigerSiLUMulFunction``, ``LigerGELUMulFunction``), and
fastsft's ``triton`` and ``cuda`` backends. Llama-3-8B shapes in bf16 (hidden 4096, intermediate 14336, 32 query
and 8 key/value heads of 128) at 8k and 16k tokens; the norm weight frozen (the LoRA case). Rows record the
median time, p20/p80, the peak memory above the inputs, the bytes each op must move at least (forward:
read inputs, write outputs; backward: read the upstream gradient and the saved inputs, write the gradients),
and GB/s as a fraction of the card's device-to-device copy bandwidth measured in the same run. ``ms`` is timed
from an idle device (``triton.testing.do_bench``), so the host's time to launch the step counts where it is
longer than the kernels'; ``device_ms`` (and ``device_GB/s``, ``device_of_copy_bw``) times the step with its
launches queued behind a spinning kernel (:func:`bench.harness.device_time_ms`): the kernels alone
(``device_covered`` False means the queue ran dry, so that figure still holds launch gaps).
``--write-table`` stores fastsft's backend order for this card in ``fastsft/card_table.json`` (where it differs
from the default).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
EPS = 1e-5
OPS = ("rms_norm", "rope", "swiglu", "geglu")
PROVIDERS = ("pytorch-eager", "torch-compile", "liger", "fastsft-triton", "fastsft-cuda")
_compiled: dict = {}


# --- eager definitions (transformers' math) --------------------------------------------------------------------

def eager_rms_norm(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def eager_swiglu(g, u):
    return F.silu(g) * u


def eager_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


EAGER = {"rms_norm": eager_rms_norm, "rope": eager_rope, "swiglu": eager_swiglu, "geglu": eager_geglu}


def provider_fn(op: str, provider: str):
    """The callable for (op, provider); raises if the provider lacks the op or cannot be imported."""
    if provider == "pytorch-eager":
        return EAGER[op]
    if provider == "torch-compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(EAGER[op], dynamic=False)
        return _compiled[op]
    if provider == "liger":
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        if op == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction

            return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        from liger_kernel.ops.geglu import LigerGELUMulFunction  # the tanh approximation

        return LigerGELUMulFunction.apply
    backend = provider.removeprefix("fastsft-")
    from fastsft import ops

    if op == "rms_norm":
        return lambda x, w: ops.rms_norm(x, w, EPS, backend=backend)
    if op == "rope":
        return lambda q, k, cos, sin: ops.rope(q, k, cos, sin, backend=backend)
    if backend == "cuda":
        raise NotImplementedError(f"fastsft has no cuda kernel for {op} (Triton only)")
    if op == "swiglu":
        return lambda g, u: ops.swiglu(g, u, backend=backend)
    return lambda g, u: ops.geglu(g, u, "tanh", backend=backend)


def inputs(op: str, tokens: int):
    """(args, leaves needing grad, minimum bytes moved by forward+backward)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    if op == "rms_norm":
        x = torch.randn(tokens, HIDDEN, **bf16, requires_grad=True)
        w = torch.randn(HIDDEN, **bf16) * 0.1 + 1
        return (x, w), [x], 2 * x.numel() * (2 + 3)  # fwd: x -> y; bwd: dy, x -> dx
    if op == "rope":
        # as transformers leaves them: [B, S, H, D] projections viewed as [B, H, S, D]
        q = torch.randn(1, tokens, HEADS, HEAD_DIM, **bf16).transpose(1, 2).requires_grad_()
        k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, **bf16).transpose(1, 2).requires_grad_()
        angle = torch.rand(1, tokens, HEAD_DIM // 2, device="cuda") * 6.28
        angle = torch.cat((angle, angle), -1)
        cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
        qk = q.numel() + k.numel()
        return (q, k, cos, sin), [q, k], 2 * (4 * qk + 4 * cos.numel())  # each pass: q, k in and out, cos, sin
    g = torch.randn(tokens, INTERMEDIATE, **bf16, requires_grad=True)
    u = torch.randn(tokens, INTERMEDIATE, **bf16, requires_grad=True)
    return (g, u), [g, u], 2 * g.numel() * (3 + 5)  # fwd: g, u -> y; bwd: dy, g, u -> dg, du


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: (read + write) bytes per second."""
    src = torch.empty(2**30, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = harness.time_ms(lambda: dst.copy_(src), rep_ms=300)["ms"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / (ms * 1e-3) / 1e9


def measure(op: str, provider: str, tokens: int, copy_gbs: float) -> dict:
    row = {"op": op, "provider": provider, "tokens": tokens}
    torch.manual_seed(0)
    args, leaves, nbytes = inputs(op, tokens)
    try:
        fn = provider_fn(op, provider)
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        upstream = [torch.randn_like(o) for o in outs]
        del out, outs

        def step():
            res = fn(*args)
            torch.autograd.backward(res if isinstance(res, tuple) else (res,), upstream)

        step()  # compile / autotune / warm caches
        torch.cuda.synchronize()
        row["peak_extra_GiB"] = harness.peak_extra_bytes(step) / 2**30
        row.update(harness.time_ms(step, grad_to_none=leaves, rep_ms=500))
        row["min_GB"] = nbytes / 1e9
        row["GB/s"] = nbytes / (row["ms"] * 1e-3) / 1e9
        row["of_copy_bw"] = row["GB/s"] / copy_gbs
        # the same with the launches queued ahead: the kernels' bandwidth, without the host's launch time
        try:
            row.update(harness.device_time_ms(step, grad_to_none=leaves))
            row["device_GB/s"] = nbytes / (row["device_ms"] * 1e-3) / 1e9
            row["device_of_copy_bw"] = row["device_GB/s"] / copy_gbs
        except Exception as exc:  # the idle-start figures above still stand
            row["device_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # one provider failing (or missing) must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        for t in leaves:
            t.grad = None
        del args, leaves
        gc.collect()
        torch.cuda.empty_cache()
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


_TABLE_OP = {"rms_norm": "rms_norm", "rope": "rope", "swiglu": "gated_activation"}


def write_backend_table(rows: list[dict]) -> None:
    """Order fastsft's backends for this card by their median time at the largest token count."""
    orders = {}
    for op, table_op in _TABLE_OP.items():
        ours = [r for r in rows if r["op"] == op and r["provider"].startswith("fastsft-") and "ms" in r]
        if not ours:
            continue
        largest = max(r["tokens"] for r in ours)
        ranked = sorted((r for r in ours if r["tokens"] == largest), key=lambda r: r["ms"])
        orders[table_op] = [r["provider"].removeprefix("fastsft-") for r in ranked] + ["reference"]
    harness.write_backend_order(torch.cuda.get_device_name(), orders)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", default="8192,16384", help="comma-separated token counts")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="16k tokens only")
    parser.add_argument("--write-table", action="store_true", help="store fastsft's backend order for this card")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm_rope_act needs a CUDA GPU")
    tokens = [16384] if args.quick else [int(t) for t in args.tokens.split(",")]
    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for op in args.ops.split(","):
        for t in tokens:
            for provider in args.providers.split(","):
                rows.append(measure(op, provider, t, copy_gbs) | {"copy_GB/s": copy_gbs})
    harness.write(rows, args.out, "norm_rope_act",
                  ["op", "provider", "tokens", "ms", "ms_p20", "ms_p80", "GB/s", "of_copy_bw", "device_ms",
                   "device_of_copy_bw", "device_covered", "peak_extra_GiB", "error"],
                  "RMSNorm, RoPE, SwiGLU, GeGLU (tanh): forward+backward, Llama-3-8B shapes, bf16")
    if args.write_table:
        write_backend_table(rows)


if __name__ == "__main__":
    main()
