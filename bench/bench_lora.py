"""LoRA projections, forward+backward: the gated MLP block and the attention projections (QKV + O), every provider
in one run on one GPU.

    python -m bench.bench_lora --out bench/results [--quick]

Llama-3.1-8B shapes in bf16 (hidden 4096, intermediate 14336, 32 query and 8 key/value heads of 128), 8k tokens,
LoRA r=16, alpha=32 on every projection, frozen base weights. Providers, all on the same weights:
- ``no-adapter``: the block without adapters (frozen ``nn.Linear``s, transformers' math) — the floor;
- ``peft``: PEFT's LoRA ``Linear`` layers (``peft.inject_adapter_in_model``), transformers' math;
- ``fastsft-linear``: each PEFT layer through ``fastsft.patching.lora.fused_lora_forward`` (one projection at a
  time), the activation through ``fastsft.ops.swiglu``;
- ``fastsft``: ``fastsft.ops.lora_mlp`` / ``lora_qkv`` + ``lora_linear`` (the O projection).
Rows: median time with p20/p80, speed-up over PEFT, overhead over ``no-adapter``, the bytes the autograd graph
keeps for backward (weights and adapters excluded) and the peak memory of one forward+backward above the inputs.
Targets: the MLP block >= 1.4x faster than PEFT, and <= 10% over ``no-adapter``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness

PROVIDERS = ("no-adapter", "peft", "fastsft-linear", "fastsft")
BLOCKS = ("mlp", "attn_proj")
COLUMNS = ["block", "provider", "tokens", "ms", "ms_p20", "ms_p80", "speedup_vs_peft", "overhead_vs_no_adapter",
           "saved_for_backward_mib", "peak_extra_mib"]


@dataclass(frozen=True)
class Config:
    tokens: int = 8192
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    r: int = 16
    alpha: int = 32
    dtype: torch.dtype = torch.bfloat16


class _Mlp(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = torch.nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = torch.nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = torch.nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):  # transformers' LlamaMLP
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _AttnProj(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.q_proj = torch.nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x, attn_out):  # the projections only: attention itself is another benchmark's
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(attn_out)


def _build(c: Config, device):
    """(plain block, PEFT block) sharing base weights; base frozen, adapters trainable with non-zero B."""
    from peft import LoraConfig, inject_adapter_in_model

    blocks = {}
    for name, cls in (("mlp", _Mlp), ("attn_proj", _AttnProj)):
        plain = cls(c).to(device=device, dtype=c.dtype).requires_grad_(False)
        lora = cls(c).to(device=device, dtype=c.dtype)
        lora.load_state_dict(plain.state_dict())
        targets = [n for n, m in lora.named_modules() if isinstance(m, torch.nn.Linear)]
        lora = inject_adapter_in_model(LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=0.0,
                                                  init_lora_weights=False, target_modules=targets), lora)
        for n, p in lora.named_parameters():
            p.requires_grad_("lora_" in n)
        lora.to(device=device, dtype=c.dtype)
        blocks[name] = (plain, lora)
    return blocks


def _providers(block: str, plain, lora, activation="swiglu"):
    """provider -> function(inputs) returning the block's outputs (a tuple)."""
    from fastsft.ops import lora_linear, lora_mlp, lora_qkv, swiglu
    from fastsft.patching.lora import fused_lora_forward, lora_parts

    def fused(m, x):
        out = fused_lora_forward(m, x)
        if out is None:
            raise RuntimeError(f"fastsft: {type(m).__name__} not eligible: the benchmark would measure PEFT")
        return out

    if block == "mlp":
        names = ("gate_proj", "up_proj", "down_proj")

        def fastsft_mlp(x):
            parts = [lora_parts(getattr(lora, n), x.dtype) for n in names]
            return (lora_mlp(x, *(p[0] for p in parts), parts[0][1], activation),)

        return {
            "no-adapter": lambda x: (plain(x),),
            "peft": lambda x: (lora(x),),
            "fastsft-linear": lambda x: (fused(lora.down_proj, swiglu(fused(lora.gate_proj, x),
                                                                      fused(lora.up_proj, x))),),
            "fastsft": fastsft_mlp,
        }
    names = ("q_proj", "k_proj", "v_proj")

    def fastsft_attn(x, attn_out):
        parts = [lora_parts(getattr(lora, n), x.dtype) for n in names]
        (w, a, b), s = lora_parts(lora.o_proj, x.dtype)
        return (*lora_qkv(x, *(p[0] for p in parts), parts[0][1]), lora_linear(attn_out, w, a, b, s))

    return {
        "no-adapter": lambda x, attn_out: plain(x, attn_out),
        "peft": lambda x, attn_out: lora(x, attn_out),
        "fastsft-linear": lambda x, attn_out: tuple(fused(getattr(lora, n), t) for n, t in
                                                    zip(names + ("o_proj",), (x, x, x, attn_out))),
        "fastsft": fastsft_attn,
    }


def saved_bytes(fn, exclude) -> int:
    """Bytes of the tensors the autograd graph keeps during ``fn()`` (each storage once), ``exclude``'s not counted:
    what stays allocated between forward and backward because of this block."""
    kept = []
    skip = {t.data_ptr() for t in exclude}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    seen, total = set(), 0
    for t in kept:
        ptr = t.untyped_storage().data_ptr()
        if t.data_ptr() not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    del out, kept
    return total


def run(c: Config, quick: bool) -> list[dict]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    blocks = _build(c, device)
    rows = []
    for block in BLOCKS:
        plain, lora = blocks[block]
        params = list(plain.parameters()) + list(lora.parameters())
        x = torch.randn(c.tokens, c.hidden, device=device, dtype=c.dtype, requires_grad=True)
        inputs = [x]
        if block == "attn_proj":
            inputs.append(torch.randn(c.tokens, c.heads * c.head_dim, device=device, dtype=c.dtype,
                                      requires_grad=True))
        adapters = [p for p in lora.parameters() if p.requires_grad]
        block_rows = {}
        for provider, fn in _providers(block, plain, lora).items():
            outs = fn(*inputs)
            upstream = [torch.randn_like(o) for o in outs]
            del outs

            def step(fn=fn, upstream=upstream):
                torch.autograd.backward(fn(*inputs), upstream)

            grads = inputs + (adapters if provider != "no-adapter" else [])
            timing = harness.time_ms(step, grad_to_none=grads, warmup_ms=25 if quick else 100,
                                     rep_ms=100 if quick else 500)
            for t in grads:
                t.grad = None
            row = {"block": block, "provider": provider, "tokens": c.tokens, **timing,
                   "saved_for_backward_mib": saved_bytes(lambda fn=fn: fn(*inputs), params + inputs) / 2**20,
                   "peak_extra_mib": harness.peak_extra_bytes(step) / 2**20}
            for t in grads:
                t.grad = None
            block_rows[provider] = row
        for row in block_rows.values():
            row["speedup_vs_peft"] = block_rows["peft"]["ms"] / row["ms"]
            row["overhead_vs_no_adapter"] = row["ms"] / block_rows["no-adapter"]["ms"] - 1
        rows += block_rows.values()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for lora.json/.md")
    parser.add_argument("--quick", action="store_true", help="2k tokens and short timing (a smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 8192)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    tokens = args.tokens or (2048 if args.quick else 8192)
    c = Config(tokens=tokens)
    rows = run(c, args.quick)
    mlp = {r["provider"]: r for r in rows if r["block"] == "mlp"}
    targets = {"mlp_speedup_vs_peft": mlp["fastsft"]["speedup_vs_peft"], "mlp_speedup_target": 1.4,
               "mlp_overhead_vs_no_adapter": mlp["fastsft"]["overhead_vs_no_adapter"], "mlp_overhead_target": 0.10}
    targets["met"] = (targets["mlp_speedup_vs_peft"] >= 1.4 and targets["mlp_overhead_vs_no_adapter"] <= 0.10)
    config = harness.config_dict(c)
    harness.write(rows, args.out, "lora", COLUMNS, "LoRA projections, forward+backward (Llama-3.1-8B shapes)",
                  extra={"config": config, "targets": targets})
    print((args.out / "lora.md").read_text())
    print(targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
