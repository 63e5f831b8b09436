"""``fastsft demo``: the built-in Llama-architecture model (random init) trained on the built-in chat data, first
with ``fastsft.SFTTrainer`` (patched), then with stock ``trl.SFTTrainer`` for the same steps from the same seed;
prints both loss curves and the speedup. Runs on the GPU when there is one, else on the CPU (where fastsft's
compiled C++ or reference backends run the kernels)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from fastsft.commands import plots
from fastsft.commands.train import ThroughputCallback, peak_memory_bytes

logger = logging.getLogger("fastsft")


def _train_once(trainer_class, *, steps: int, device: str, output_dir: str, batch_size: int, seed: int,
                lora: bool, dataset_rows: int, **model_overrides) -> dict:
    from trl import SFTConfig

    from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
    from fastsft.loading import lora_config

    model = demo_model(seed=seed, **model_overrides)
    args = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=2e-3 if lora else 1e-3, lr_scheduler_type="constant", logging_steps=1,
                     save_strategy="no", report_to="none", seed=seed, max_length=256, assistant_only_loss=True,
                     use_cpu=device == "cpu", disable_tqdm=True, bf16=device == "cuda")
    throughput = ThroughputCallback()
    trainer = trainer_class(model=model, args=args, train_dataset=demo_dataset(dataset_rows),
                            processing_class=demo_tokenizer(), callbacks=[throughput],
                            peft_config=lora_config({"r": 16}) if lora else None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.log_history[-2].get("num_tokens", 0) if len(trainer.state.log_history) > 1 else 0
    return {"losses": throughput.losses, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "peak_memory_bytes": peak_memory_bytes(device) if device == "cuda" else None}


def run_demo(*, steps: int = 30, device: str | None = None, output_dir: str | None = None, batch_size: int = 8,
             seed: int = 0, lora: bool = False, dataset_rows: int | None = None, **model_overrides) -> dict:
    import trl

    import fastsft

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    if steps < 1:
        raise ValueError(f"--steps must be positive, got {steps}")
    rows = dataset_rows or steps * batch_size
    with tempfile.TemporaryDirectory() as scratch:
        out = output_dir or scratch
        common = dict(steps=steps, device=device, batch_size=batch_size, seed=seed, lora=lora, dataset_rows=rows,
                      **model_overrides)
        # Untimed warm-up: the first training loop of a process pays for lazy imports, thread pools and allocator
        # growth, which would otherwise all be charged to whichever run goes first
        _train_once(trl.SFTTrainer, **{**common, "steps": 1, "dataset_rows": batch_size},
                    output_dir=str(Path(out) / "warmup"))
        patched = _train_once(fastsft.SFTTrainer, output_dir=str(Path(out) / "patched"), **common)
        stock = _train_once(trl.SFTTrainer, output_dir=str(Path(out) / "stock"), **common)
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(), "steps": steps,
            "batch_size": batch_size, "lora": lora, "fastsft": patched, "trl": stock,
            "speedup": stock["seconds"] / patched["seconds"]}


def format_result(result: dict) -> str:
    lines = [f"fastsft demo on {result['device']}: {result['steps']} steps, batch {result['batch_size']}, "
             f"{'LoRA' if result['lora'] else 'full fine-tuning'}",
             f"{'step':>4}  {'fastsft loss':>12}  {'TRL loss':>10}"]
    for step, (a, b) in enumerate(zip(result["fastsft"]["losses"], result["trl"]["losses"]), start=1):
        lines.append(f"{step:>4}  {a:>12.4f}  {b:>10.4f}")
    for name in ("fastsft", "trl"):
        run = result[name]
        memory = "" if run["peak_memory_bytes"] is None else f", peak memory {run['peak_memory_bytes'] / 2**30:.2f} GiB"
        lines.append(f"{name:>7}: {run['seconds']:.2f} s, {run['tokens_per_second']:.0f} tokens/s{memory}")
    lines.append(f"speedup: {result['speedup']:.2f}x (fastsft vs stock TRL, whole training loop)")
    if result["device"] == "cpu":
        lines.append("(CPU timings of a model this small are dominated by framework overhead and noisy on a shared "
                     "machine; the kernels are built for GPUs)")
    return "\n".join(lines)


def plot_path(args) -> Path | None:
    """Where the demo's picture goes: ``--plot``, else beside ``--json`` or in ``--output-dir``, else
    ``fastsft-demo.png`` here; None with ``--no-plot``."""
    if args.no_plot:
        return None
    if args.plot:
        return Path(args.plot)
    if args.json:
        return Path(args.json).with_suffix(".png")
    return Path(args.output_dir or ".") / "fastsft-demo.png"


def main(args) -> int:
    result = run_demo(steps=args.steps, device=args.device, output_dir=args.output_dir, batch_size=args.batch_size,
                      lora=args.lora)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if (path := plot_path(args)) is not None and plots.demo_plot(result, path) is not None:
        print(f"plot: {path}")
    return 0
