"""Where the peak goes: one provider's training run under the CUDA allocator's history, the live blocks at the
highest point of allocated memory summed by category.

    python -m bench.memory_breakdown --model llama-8b --packing --batch 2 --providers fastsft,fastsft-offload

The run is ``bench.bench_sft``'s (same model, data, LoRA and SFTConfig), each provider in a process of its own, with
``torch.cuda.memory._record_memory_history`` on from when the trainer is built to the end of training. Replaying
the recorded allocations and frees from the blocks live at the start gives the allocated bytes after every event;
at their maximum, each live block is put in one category, the first that fits:

- ``weights``, ``adapters``, ``optimizer state``: blocks holding the model's frozen parameters and buffers, its
  trainable parameters, the optimizer's state (by address, from the trainer after the run);
- ``captured layers``: allocated by :mod:`fastsft.captured_layers` (its static buffers, and what its graphs hold);
- ``offloaded checkpointing``: the device copies of :mod:`fastsft.offload_checkpointing`;
- ``loss``: allocated under the fused linear cross-entropy (its logits chunks, the hidden states' gradient);
- ``checkpointed layer inputs`` / ``recomputed layer``: under ``torch.utils.checkpoint``'s forward / its recompute;
- ``autograd (gradients, backward temporaries)``: allocated with no Python frame on the stack, by autograd's
  engine thread;
- ``before training``: blocks live when the recording began that are none of the above;
- else ``other (FILE)``, by the innermost frame's file.

CUDA graphs replay in private pools, whose blocks the allocator counts as allocated only while a tensor holds
them: the pools' reserved size is reported beside the peak (``graph pools``), and ``reserved`` is the allocator's
peak reservation (the footprint on the card).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

from bench import bench_sft, harness

GIB = 1 << 30
HISTORY_ENTRIES = 2_000_000
CATEGORY_FILES = (  # (category, what a frame's filename contains), checked in order
    ("captured layers", "fastsft/captured_layers.py"),
    ("offloaded checkpointing", "fastsft/offload_checkpointing.py"),
    ("loss", "linear_cross_entropy"),
    ("loss", "fastsft/patching/lm_head.py"),
)


def _checkpoint_category(frames: list[dict]) -> str | None:
    names = [(f.get("filename", ""), f.get("name", "")) for f in frames]
    if not any(file.endswith("torch/utils/checkpoint.py") for file, _ in names):
        return None
    recompute = any(name in ("recompute_fn", "unpack_hook", "_run_fn_with_dynamo_disabled") or "recompute" in name
                    for _, name in names)
    return "recomputed layer" if recompute else "checkpointed layer inputs"


def categorize(frames: list[dict], addr: int, known: dict[int, str]) -> str:
    """The category of a block allocated at ``addr`` with the Python ``frames`` (innermost first)."""
    if addr in known:
        return known[addr]
    if frames is None:
        return "before training"
    files = [f.get("filename", "") for f in frames]
    for category, part in CATEGORY_FILES:
        if any(part in file for file in files):
            return category
    if category := _checkpoint_category(frames):
        return category
    python = [f for f in files if f.endswith(".py")]
    if not python:
        return "autograd (gradients, backward temporaries)"
    return f"other ({os.path.basename(python[0])})"


def live_blocks(snapshot: dict, device: int = 0) -> dict[int, tuple[int, list]]:
    """The blocks allocated when ``snapshot`` was taken (addr -> (size, frames)), from its segments."""
    live = {}
    for segment in snapshot.get("segments", []):
        if segment.get("device", device) != device:
            continue
        addr = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                live[addr] = (block["size"], None)  # None: allocated before the recording
            addr += block["size"]
    return live


def peak_blocks(events: list[dict], start: dict[int, tuple[int, list]] | None = None
                ) -> tuple[int, dict[int, tuple[int, list]]]:
    """Replay allocator trace ``events`` from the live blocks ``start`` (addr -> (size, frames)): the highest
    allocated total and the live blocks then. A block counts from its ``alloc`` to its ``free_completed`` (a freed
    block whose stream work is still pending stays allocated, as in the allocator's own statistics)."""
    live: dict[int, tuple[int, list]] = dict(start or {})
    total = peak = sum(size for size, _ in live.values())
    at_peak: dict[int, tuple[int, list]] = dict(live)
    for e in events:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    return peak, at_peak


def breakdown(snapshot: dict, known: dict[int, str], device: int = 0, start: dict | None = None) -> dict:
    """GiB by category at the peak of ``snapshot``'s trace of ``device`` (replayed from the live blocks
    ``start``), with the graph pools' reserved size."""
    peak, blocks = peak_blocks(snapshot["device_traces"][device], start)
    sums: dict[str, int] = collections.Counter()
    for addr, (size, frames) in blocks.items():
        sums[categorize(frames, addr, known)] += size
    pools = sum(s["total_size"] for s in snapshot.get("segments", [])
                if s.get("device", device) == device and tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
    return {"peak_GiB": peak / GIB, "graph_pools_GiB": pools / GIB,
            "categories_GiB": {k: round(v / GIB, 4) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])}}


def known_blocks(trainer) -> dict[int, str]:
    """Addresses of the blocks of the model's weights and adapters and of the optimizer's state (gradients are
    freed by the end of the run: autograd's, by frame)."""
    from fastsft.memory import persistent_tensors

    known: dict[int, str] = {}
    for category, t in persistent_tensors(trainer.model, trainer.optimizer):
        if t.is_cuda and category != "gradients":
            known.setdefault(t.untyped_storage().data_ptr(), category.replace("_", " "))
    return known


def run_one(provider: str, a: argparse.Namespace) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as out:
        trainer = bench_sft.make_trainer(provider, a, out, [])
        # recorded from here: the peak of the training, not of building the model; what lives already is the start
        torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
        start = live_blocks(torch.cuda.memory._snapshot(), torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    row = {"provider": provider, "model": a.model, "packing": a.packing, "qlora": a.qlora, "batch": a.batch,
           "max_length": a.max_length, "peak_allocated_GiB": torch.cuda.max_memory_allocated() / GIB,
           "peak_reserved_GiB": torch.cuda.max_memory_reserved() / GIB,
           **breakdown(snapshot, known_blocks(trainer), torch.cuda.current_device(), start)}
    if getattr(trainer, "memory_report", None) is not None:
        row["trainer_report"] = trainer.memory_report.as_dict()
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = bench_sft.build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(providers="fastsft", warmup=2, steps=2)
    return parser


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.single:
        a.result_json.write_text(json.dumps(run_one(a.single, a)))
        return 0
    providers = a.providers.split(",")
    if bad := [p for p in providers if p not in (*bench_sft.FASTSFT_PROVIDERS, "trl", "trl-liger")]:
        raise SystemExit(f"--providers: {', '.join(bad)} cannot be recorded here (fastsft's and TRL's only)")
    name = a.name or f"memory_{a.model}{'_qlora' if a.qlora else ''}_b{a.batch}_{a.max_length}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.qlora:
            bench_sft._in_child(f"from bench.bench_sft import save_random_checkpoint; "
                                f"save_random_checkpoint({a.model!r}, {tmp!r})")
        for provider in providers:
            extra = ["--checkpoint", tmp] if a.qlora else []
            rows.append(bench_sft.run_child(provider, argv, extra, module="bench.memory_breakdown"))
    harness.write(rows, a.out, name, ["provider", "model", "qlora", "batch", "max_length", "peak_allocated_GiB",
                                      "peak_reserved_GiB", "graph_pools_GiB", "error"],
                  f"memory at the peak: {a.model}{', QLoRA' if a.qlora else ''}, batch {a.batch}, max_length "
                  f"{a.max_length}, packing {a.packing}")
    with open(a.out / f"{name}.md", "a") as f:
        f.write("\n" + category_table(rows))
    return 0


def category_table(rows: list[dict]) -> str:
    """A markdown table: a row per category, a column per provider, GiB at each provider's peak."""
    rows = [r for r in rows if "categories_GiB" in r]
    categories = list(dict.fromkeys(c for r in rows for c in r["categories_GiB"]))
    lines = ["| GiB at the peak | " + " | ".join(r["provider"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for c in [*categories, "peak (allocated)", "graph pools (reserved)"]:
        values = [r["categories_GiB"].get(c) if c in categories else
                  r["peak_GiB"] if c.startswith("peak") else r["graph_pools_GiB"] for r in rows]
        lines.append(f"| {c} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
