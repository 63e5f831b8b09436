"""Benchmark: packed (varlen) causal attention, forward and forward+backward, every provider in one run.

Providers: ``fastsft_triton`` (fastsft.ops.flash_attention_varlen, backend="triton"), ``sdpa`` (torch SDPA: one
dense causal row, or a block-diagonal causal mask for packed rows, K/V repeated as transformers does),
``flex`` (FlexAttention with a document mask, compiled once outside the timed region) and ``varlen_attn``
(``torch.nn.attention.varlen.varlen_attn`` where the installed torch has it).

Cases: 32 query / 8 KV heads, head dims 128 and 64, bfloat16; dense causal 1k/4k/8k/16k tokens and packed
8k/16k tokens (random lengths 100-2000, fixed seed). Times are medians of ``triton.testing.do_bench``
(CUDA events, warm-up). "Useful TFLOP/s" counts only in-sequence causal pairs: forward 4·D FLOP per pair and
head, backward 2.5x the forward. Each provider runs in its own try/except; a failure is recorded as its error.

    python bench/bench_attention.py --out bench/results/attention.json [--quick]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("fastsft_triton", "sdpa", "flex", "varlen_attn")
HQ, HKV = 32, 8


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true",
                   help="only the 8k-token cases at head dim 128 (under a minute on an H100)")
    p.add_argument("--head-dims", default=None, help="comma-separated head dims (default 128,64; 128 with --quick)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--rep", type=int, default=100, help="do_bench target time per measurement in ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-table", action="store_true",
                   help="store the measured attention backend order for this card in fastsft/card_table.json")
    return p.parse_args(argv)


# bench provider -> attention backend of fastsft.transformers_attention (flex has no counterpart there)
_INTEGRATION_NAMES = {"fastsft_triton": "triton", "varlen_attn": "torch_varlen", "sdpa": "sdpa"}


def write_attention_table(rows, gpu):
    """Order the attention backends of patched models by forward+backward time at head dim 128 and the largest
    measured size of each case, into the card table (where it differs from the default order). SDPA counts only
    for dense rows: on packed rows it would need the mask."""
    from fastsft import card_table, transformers_attention

    entry = {}
    for kind in ("dense", "packed"):
        ok = [r for r in rows if r["kind"] == kind and r["head_dim"] == 128 and "fwd_bwd_ms" in r
              and r["provider"] in _INTEGRATION_NAMES and not (kind == "packed" and r["provider"] == "sdpa")]
        if not ok:
            continue
        largest = max(r["tokens"] for r in ok)
        ranked = sorted((r for r in ok if r["tokens"] == largest), key=lambda r: r["fwd_bwd_ms"])
        entry[kind] = [_INTEGRATION_NAMES[r["provider"]] for r in ranked] + ["reference"]
    defaults = {case: list(order) for case, order in transformers_attention.DEFAULT_ORDER.items()}
    defaults["packed"] = [b for b in defaults["packed"] if b != "sdpa"]
    path = card_table.update(gpu, "attention", entry, defaults)
    print(f"attention backend order for {gpu}: {entry} (stored in {path} where it differs from {defaults})")


def packed_lengths(total, seed, lo=100, hi=2000):
    import random

    rng = random.Random(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, rng.randint(lo, hi))
        lengths.append(n)
        left -= n
    return lengths


def cases(quick):
    tokens_dense = (8192,) if quick else (1024, 4096, 8192, 16384)
    tokens_packed = (8192,) if quick else (8192, 16384)
    return [("dense", t) for t in tokens_dense] + [("packed", t) for t in tokens_packed]


def useful_flops(lengths, d, heads=HQ):
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    fwd = 4.0 * d * pairs * heads
    return fwd, fwd * 3.5  # forward, forward + backward (backward = 2.5x forward)


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001 - not in a checkout
        return None


# --- providers: each returns a zero-argument callable computing the output (with grad enabled) ------------

def make_fastsft(q, k, v, cu, lengths):
    from fastsft.ops import flash_attention_varlen

    max_len = max(lengths)
    return lambda: flash_attention_varlen(q, k, v, cu, max_len, backend="triton")


def make_sdpa(q, k, v, cu, lengths):
    import torch
    import torch.nn.functional as F

    T, group = q.shape[0], q.shape[1] // k.shape[1]
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    if len(lengths) == 1:
        return lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))
    idx = torch.arange(T, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
    mask = mask[None, None]

    def run():  # as transformers' sdpa path: repeat K/V, boolean mask
        kr, vr = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(qb, kr, vr, attn_mask=mask)

    return run


_flex_compiled = None


def make_flex(q, k, v, cu, lengths):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    if _flex_compiled is None:
        # one compiled graph per shape and head dim: past dynamo's default recompile limit (8) flex would fall
        # back to eager, which materializes the scores (a 16k row needs 32 GiB)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, T, T, device=q.device)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return lambda: _flex_compiled(qb, kb, vb, block_mask=block_mask, enable_gqa=True)


def make_varlen_attn(q, k, v, cu, lengths):
    from fastsft.transformers_attention import torch_varlen_call

    max_len = max(lengths)
    return lambda: torch_varlen_call(q, k, v, cu, max_len)


MAKERS = {"fastsft_triton": make_fastsft, "sdpa": make_sdpa, "flex": make_flex, "varlen_attn": make_varlen_attn}


def time_provider(fn, q, k, v, rep):
    import torch
    from triton.testing import do_bench

    out = fn()  # warm-up / compile, outside the timed region
    dout = torch.randn_like(out)
    out.backward(dout)
    del out

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        fn().backward(dout)

    fwd()  # a no-grad call may compile again (flex)
    torch.cuda.synchronize()

    t_fwd = do_bench(fwd, warmup=25, rep=rep, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=rep, return_mode="median")
    return t_fwd, t_fb


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    dtype = getattr(torch, args.dtype)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        print(f"bench_attention: unknown providers {sorted(unknown)}", file=sys.stderr)
        return 2
    head_dims = [int(d) for d in (args.head_dims or ("128" if args.quick else "128,64")).split(",") if d]
    device = torch.device("cuda")
    rows = []
    started = time.time()
    for d in head_dims:
        for kind, tokens in cases(args.quick):
            lengths = [tokens] if kind == "dense" else packed_lengths(tokens, args.seed)
            cu_list = [0]
            for n in lengths:
                cu_list.append(cu_list[-1] + n)
            cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
            gen = torch.Generator(device=device).manual_seed(args.seed)
            q = torch.randn(tokens, HQ, d, device=device, dtype=dtype, generator=gen).requires_grad_()
            k = torch.randn(tokens, HKV, d, device=device, dtype=dtype, generator=gen).requires_grad_()
            v = torch.randn(tokens, HKV, d, device=device, dtype=dtype, generator=gen).requires_grad_()
            flops_fwd, flops_fb = useful_flops(lengths, d)
            for provider in providers:
                row = {"provider": provider, "kind": kind, "tokens": tokens, "num_seqs": len(lengths),
                       "head_dim": d, "hq": HQ, "hkv": HKV, "dtype": args.dtype}
                try:
                    fn = MAKERS[provider](q, k, v, cu, lengths)
                    t_fwd, t_fb = time_provider(fn, q, k, v, args.rep)
                    row.update(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, fwd_tflops=flops_fwd / t_fwd / 1e9,
                               fwd_bwd_tflops=flops_fb / t_fb / 1e9)
                except Exception as exc:  # noqa: BLE001 - one provider's failure must not stop the others
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                finally:
                    q.grad = k.grad = v.grad = None
                    torch.cuda.empty_cache()
                rows.append(row)
                if "error" in row:
                    print(f"{kind:6s} {tokens:6d} d={d:3d} {provider:15s} ERROR {row['error'][:120]}", flush=True)
                else:
                    print(f"{kind:6s} {tokens:6d} d={d:3d} {provider:15s} fwd {row['fwd_ms']:8.3f} ms "
                          f"{row['fwd_tflops']:6.1f} TF/s | fwd+bwd {row['fwd_bwd_ms']:8.3f} ms "
                          f"{row['fwd_bwd_tflops']:6.1f} TF/s", flush=True)
            del q, k, v
    result = {
        "benchmark": "attention",
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "quick": args.quick,
        "seconds": round(time.time() - started, 1),
        "flop_convention": "useful: in-sequence causal pairs; fwd 4*D per pair per head, bwd 2.5x fwd",
        "rows": rows,
    }
    if args.out is not None:
        from bench import harness

        meta = {k: v for k, v in result.items() if k != "rows"}
        harness.write(rows, args.out.parent, args.out.stem,
                      ["provider", "kind", "tokens", "num_seqs", "head_dim", "fwd_ms", "fwd_tflops", "fwd_bwd_ms",
                       "fwd_bwd_tflops", "error"],
                      "Attention forward and forward+backward (32 q / 8 kv heads, causal; useful TFLOP/s)", extra=meta)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if args.write_table:
        write_attention_table(rows, result["gpu"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
