"""Offloaded gradient checkpointing: time and peak memory of one forward+backward of a LoRA decoder stack with no
checkpointing, plain (non-reentrant) checkpointing and offloaded checkpointing.

    python -m bench.bench_offload --out bench/results [--quick] [--model tiny]

Llama-3.1-8B decoder layers (hidden 4096, intermediate 14336, 32 query and 8 key/value heads of 128), random init,
bf16, SDPA attention, LoRA r=16, alpha 32 on q,k,v,o,gate,up,down with frozen base weights; transformers'
``LlamaModel`` without embedding lookup and LM head (random ``inputs_embeds`` in, a random upstream gradient on
the last hidden states), so the rows differ only in what the checkpointing does. ``--quick`` runs 8 of the 32
layers at 1 x 4096 tokens (under 3 minutes on one H200); the full run all 32 at 1 x 8192. ``--model tiny`` runs a
tiny stack on the CPU (wall-clock timing, no memory column) to check the script end to end.

Rows: median time with p20/p80, overhead over plain checkpointing (the target: offload <= 10% at 8B), peak
memory of one step above the weights and inputs, and the bytes of the layer inputs that offloading moves to the
host (``layer_inputs_GiB``): the memory it should save over plain checkpointing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import harness

MODES = ("none", "plain", "offload")
COLUMNS = ["model", "layers", "batch", "seq", "mode", "ms", "ms_p20", "ms_p80", "overhead_vs_plain",
           "peak_extra_GiB", "layer_inputs_GiB", "offloaded_per_step"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (hidden, intermediate, heads, kv heads, head dim, layers of the real model)
MODELS = {"llama-8b": (4096, 14336, 32, 8, 128, 32), "tiny": (64, 128, 4, 2, 16, 4)}


@dataclass(frozen=True)
class Config:
    model: str = "llama-8b"
    layers: int = 32
    batch: int = 1
    seq: int = 8192
    r: int = 16
    alpha: int = 32
    dtype: torch.dtype = torch.bfloat16


def build(c: Config, device: torch.device):
    """(PEFT-wrapped LlamaModel, its trainable adapter parameters): random base weights, non-zero LoRA B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    hidden, intermediate, heads, kv_heads, head_dim, _ = MODELS[c.model]
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=c.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=max(c.seq, 8192), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=c.dtype)
    model = get_peft_model(model, LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             init_lora_weights=False))
    model.to(device=device, dtype=c.dtype).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def set_mode(model, mode: str, min_bytes: int | None = None):
    """Switch the model's checkpointing; returns the offloader for ``"offload"``."""
    from fastsft.offload_checkpointing import disable_offloaded_checkpointing, enable_offloaded_checkpointing

    disable_offloaded_checkpointing(model)
    if mode == "none":
        model.gradient_checkpointing_disable()
    elif mode == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        return enable_offloaded_checkpointing(model, min_bytes=min_bytes)
    return None


def time_cpu_ms(fn, reps: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1]}


def run(c: Config, quick: bool, device: torch.device) -> list[dict]:
    model, adapters = build(c, device)
    hidden = MODELS[c.model][0]
    inputs = torch.randn(c.batch, c.seq, hidden, device=device, dtype=c.dtype)
    upstream = torch.randn_like(inputs)

    def step():
        for p in adapters:
            p.grad = None
        out = model(inputs_embeds=inputs).last_hidden_state
        out.backward(upstream)

    rows = {}
    for mode in MODES:
        # the tiny stack's inputs are below the default size threshold: offload them anyway, to run that path
        offloader = set_mode(model, mode, min_bytes=0 if c.model == "tiny" else None)
        if device.type == "cuda":
            timing = harness.time_ms(step, warmup_ms=500 if quick else 2000, rep_ms=2000 if quick else 10000)
            peak = harness.peak_extra_bytes(step) / 2**30
        else:
            timing, peak = time_cpu_ms(step, reps=3 if quick else 10), None
        per_step = None
        if offloader is not None:  # one more step, counted: the layer inputs that went through the offloader
            offloader.stats["offloaded"] = 0
            step()
            per_step = offloader.stats["offloaded"]
        for p in adapters:
            p.grad = None
        rows[mode] = {"model": c.model, "layers": f"{c.layers}/{MODELS[c.model][5]}", "batch": c.batch, "seq": c.seq,
                      "mode": mode, **timing, "peak_extra_GiB": peak,
                      "layer_inputs_GiB": c.layers * c.batch * c.seq * hidden * inputs.element_size() / 2**30,
                      "offloaded_per_step": per_step}
    for row in rows.values():
        row["overhead_vs_plain"] = row["ms"] / rows["plain"]["ms"] - 1
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for offload.json/.md")
    parser.add_argument("--quick", action="store_true", help="8 of the 32 layers, 1 x 4096 tokens, short timing")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-8b",
                        help="tiny: a tiny stack on the CPU, to check the script without a GPU")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all, 8 with --quick)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 8192, 4096 with --quick)")
    args = parser.parse_args(argv)
    if args.model == "tiny":
        device = torch.device("cpu")
        c = Config(model="tiny", layers=args.layers or MODELS["tiny"][5], batch=args.batch, seq=args.seq or 256,
                   dtype=torch.float32)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --model tiny to check the script on the CPU)")
        device = torch.device("cuda")
        c = Config(layers=args.layers or (8 if args.quick else MODELS["llama-8b"][5]), batch=args.batch,
                   seq=args.seq or (4096 if args.quick else 8192))
    rows = run(c, args.quick, device)
    offload = next(r for r in rows if r["mode"] == "offload")
    targets = {"offload_overhead_vs_plain": offload["overhead_vs_plain"], "offload_overhead_target": 0.10,
               "met": offload["overhead_vs_plain"] <= 0.10 if c.model == "llama-8b" else None,  # a target at 8B
               "note": f"{c.layers} of {MODELS[c.model][5]} layers" + (" (quick)" if args.quick else "")}
    config = harness.config_dict(c)
    name = "offload" if c.model == "llama-8b" else f"offload_{c.model}"
    harness.write(rows, args.out, name, COLUMNS,
                  f"Offloaded gradient checkpointing, LoRA forward+backward ({c.model} shapes, {targets['note']})",
                  extra={"config": config, "targets": targets})
    print((args.out / f"{name}.md").read_text())
    print(targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
