"""``fastsft train [CONFIG.yaml] [flags]``: the SFT recipe (load, patch, LoRA, fastsft.SFTTrainer, save).

The YAML file has the keys of ``TrainSettings`` (flags with the same names override it); ``sft:`` holds any
extra ``SFTConfig`` arguments. Example::

    model: ./my-llama            # directory (or hub id where reachable)
    dataset: ./chat.jsonl        # JSON/JSONL with a "messages", "text" or "prompt"/"completion" column
    output_dir: ./out
    max_steps: 200
    lora: {r: 16, lora_alpha: 32}
    sft: {assistant_only_loss: true, bf16: true}
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger("fastsft")


@dataclass
class TrainSettings:
    model: str | None = None
    dataset: str | None = None
    output_dir: str = "fastsft-output"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 1024
    dtype: str = "auto"
    load_in_4bit: bool = False
    lora: dict = field(default_factory=dict)  # peft.LoraConfig arguments; {} = fastsft's defaults
    patch: bool = True
    seed: int = 42
    sft: dict = field(default_factory=dict)  # any other SFTConfig arguments


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak allocated CUDA memory, or this process's peak resident set size on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s (from TRL's ``num_tokens``) and peak memory to every log line, and keeps the losses."""

    def __init__(self):
        self.losses: list[float] = []
        self._start = self._tokens = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.losses.append(float(logs["loss"]))
        elapsed = time.perf_counter() - self._start
        tokens = float(logs.get("num_tokens", 0))
        memory = peak_memory_bytes(args.device) / 2**30
        logger.info("step %d: loss %.4f, %.0f tokens/s, peak memory %.2f GiB", state.global_step, logs["loss"],
                    tokens / elapsed if elapsed > 0 else 0.0, memory)


def load_settings(config_path: str | None, overrides: dict) -> TrainSettings:
    values = {}
    if config_path is not None:
        import yaml

        values = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: expected a mapping of settings at the top level")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)} (put other SFTConfig "
                         f"arguments under 'sft:')")
    settings = TrainSettings(**values)
    if not settings.model or not settings.dataset:
        raise ValueError("fastsft train needs a model and a dataset (in the YAML file or as --model/--dataset)")
    return settings


def load_dataset_file(path: str):
    from datasets import load_dataset

    if not Path(path).exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    return load_dataset("json", data_files=path, split="train")


def run(settings: TrainSettings) -> dict:
    import fastsft

    model, tokenizer = fastsft.load(settings.model, dtype=settings.dtype, load_in_4bit=settings.load_in_4bit,
                                    max_seq_length=settings.max_seq_length, lora=settings.lora, patch=settings.patch)
    args = fastsft.SFTConfig(
        output_dir=settings.output_dir, max_steps=settings.max_steps, num_train_epochs=settings.num_train_epochs,
        learning_rate=settings.learning_rate, per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, max_length=settings.max_seq_length,
        seed=settings.seed, logging_steps=1, save_strategy="no", report_to="none", **settings.sft)
    throughput = ThroughputCallback()
    trainer = fastsft.SFTTrainer(model=model, args=args, train_dataset=load_dataset_file(settings.dataset),
                                 processing_class=tokenizer, callbacks=[throughput], patch=settings.patch)
    if trainer.patch_report is not None:
        logger.info("%s", trainer.patch_report)
    result = trainer.train()
    trainer.save_model(settings.output_dir)  # a PEFT model saves its adapter only
    tokenizer.save_pretrained(settings.output_dir)
    logger.info("saved to %s", settings.output_dir)
    return {"losses": throughput.losses, "train_runtime": result.metrics["train_runtime"],
            "peak_memory_bytes": peak_memory_bytes(args.device)}


def main(args) -> int:
    overrides = {name: getattr(args, name, None) for name in
                 ("model", "dataset", "output_dir", "max_steps", "learning_rate", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_seq_length", "dtype", "seed")}
    if args.load_in_4bit:
        overrides["load_in_4bit"] = True
    if args.no_patch:
        overrides["patch"] = False
    run(load_settings(args.config, overrides))
    return 0
