"""``fastsft train [CONFIG.yaml] [flags]``: the SFT recipe (seed, load, patch, LoRA, fastsft.SFTTrainer, save).

A flat ``trl sft`` config (with ``model_name_or_path``) runs ``fastsft sft --config CONFIG.yaml``; the nested file
below is deprecated (a FutureWarning) and still read.

The YAML file has the keys of ``TrainSettings`` (flags with the same names override it); ``sft:`` holds any
other ``SFTConfig`` argument, and overrides fastsft's defaults for them (``logging_steps=1``, no checkpoints,
``report_to="none"``, and on a machine without a GPU ``use_cpu=True, bf16=False``). Example::

    model: ./my-llama            # directory (or hub id where reachable); "demo": the built-in small model
    dataset: ./chat.jsonl        # JSON/JSONL with a "messages", "text" or "prompt"/"completion" column; or "demo"
    output_dir: ./out
    max_steps: 200
    lora: {r: 16, lora_alpha: 32}
    sft: {assistant_only_loss: true, report_to: tensorboard, save_strategy: steps, save_steps: 50}
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import warnings
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from fastsft.cli import UsageError

logger = logging.getLogger("fastsft")

# The name that selects the built-in model (fastsft/data/demo_model, random init) or chat data
DEMO = "demo"
# SFTConfig arguments that TrainSettings sets from its own keys: given under sft: they would be set twice
_SET_AT_TOP_LEVEL = {"output_dir": "output_dir", "max_steps": "max_steps", "num_train_epochs": "num_train_epochs",
                     "learning_rate": "learning_rate", "per_device_train_batch_size": "per_device_train_batch_size",
                     "gradient_accumulation_steps": "gradient_accumulation_steps", "max_length": "max_seq_length",
                     "seed": "seed"}


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
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, or true: the last one in output_dir
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

        path = Path(config_path)
        if not path.is_file():
            raise UsageError(f"config file {config_path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{config_path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(values, dict):
            raise UsageError(f"{config_path}: expected a mapping of settings at the top level")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown training settings {unknown}; known: {sorted(known)} (put other SFTConfig "
                         f"arguments under 'sft:')")
    settings = TrainSettings(**values)
    if not settings.model or not settings.dataset:
        raise UsageError("fastsft train needs a model and a dataset (in the YAML file or as --model/--dataset)")
    if not isinstance(settings.sft, dict):
        raise UsageError(f"'sft:' takes a mapping of SFTConfig arguments, got {settings.sft!r}")
    if settings.lora is not None and not isinstance(settings.lora, dict):
        raise UsageError(f"'lora:' takes a mapping of LoraConfig arguments (or null for no adapter), got "
                         f"{settings.lora!r}")
    return settings


def sft_arguments(settings: TrainSettings) -> dict:
    """The ``SFTConfig`` arguments of a run: fastsft's defaults, overridden by the ``sft:`` entries, then the
    settings that TrainSettings holds itself. Unknown names and names set twice are a :class:`UsageError`."""
    from fastsft.trainer.arguments import SFTConfig, map_config_kwargs

    try:
        user = map_config_kwargs(settings.sft, "sft")  # the older names, as fastsft.SFTConfig takes them
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    unknown = sorted(set(user) - fields)
    if unknown:
        raise UsageError(f"unknown SFTConfig argument{'s' if len(unknown) > 1 else ''} under 'sft:': "
                         f"{', '.join(unknown)}")
    twice = sorted(set(user) & set(_SET_AT_TOP_LEVEL))
    if twice:
        raise UsageError("; ".join(f"'sft: {name}' is the top-level setting '{_SET_AT_TOP_LEVEL[name]}': set it "
                                   f"there (or by its flag)" for name in twice))
    defaults = {"logging_steps": 1, "report_to": "none"}
    # Checkpoints are opt-in (the adapter is saved at the end), unless the user asks for saving in any way
    if not any(name.startswith("save_") or name == "load_best_model_at_end" for name in user):
        defaults["save_strategy"] = "no"
    if not _has_accelerator():  # as `fastsft demo` does; TRL's default bf16=True needs a GPU
        defaults.update(use_cpu=True, bf16=False)
        logger.info("no GPU here: training on the CPU (use_cpu=%s, bf16=%s)", user.get("use_cpu", True),
                    user.get("bf16", False))
    return {**defaults, **user, "output_dir": settings.output_dir, "max_steps": settings.max_steps,
            "num_train_epochs": settings.num_train_epochs, "learning_rate": settings.learning_rate,
            "per_device_train_batch_size": settings.per_device_train_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "max_length": settings.max_seq_length, "seed": settings.seed}


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def resume_checkpoint(settings: TrainSettings):
    """What ``trainer.train(resume_from_checkpoint=...)`` gets: the setting, or the same key under ``sft:``."""
    top, sft = settings.resume_from_checkpoint, settings.sft.get("resume_from_checkpoint")
    if top is not None and sft is not None and top != sft:
        raise UsageError(f"resume_from_checkpoint is given twice, as {top!r} and as 'sft: {sft!r}'; give it once")
    value = top if top is not None else sft
    if isinstance(value, str) and value.lower() in ("true", "false"):  # from the flag
        value = value.lower() == "true"
    if isinstance(value, str) and not Path(value).is_dir():
        raise UsageError(f"checkpoint folder {value} does not exist")
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        if not Path(settings.output_dir).is_dir() or get_last_checkpoint(settings.output_dir) is None:
            raise UsageError(f"resume_from_checkpoint: there is no checkpoint in {settings.output_dir} to resume from")
    return value or None


def load_dataset_file(path: str):
    from datasets import load_dataset

    from fastsft.demo_assets import DEMO_DATASET

    if path == DEMO:
        path = str(DEMO_DATASET)
    if not Path(path).exists() and not glob.glob(path):
        raise UsageError(f"dataset file {path} does not exist")
    try:
        return load_dataset("json", data_files=path, split="train")
    except Exception as exc:  # datasets wraps JSON errors in its own types
        cause = exc.__cause__ or exc
        raise UsageError(f"dataset file {path} could not be read as JSON/JSONL: {' '.join(str(cause).split())}") \
            from None


def load_model(settings: TrainSettings):
    """``fastsft.load`` of the settings' model; ``demo`` builds the built-in one (random init from its seed)."""
    import fastsft
    from fastsft.demo_assets import DEMO_MODEL_DIR, demo_model, demo_tokenizer

    options = dict(dtype=settings.dtype, load_in_4bit=settings.load_in_4bit, max_seq_length=settings.max_seq_length,
                   lora=settings.lora, patch=settings.patch)
    if settings.model == DEMO:
        with tempfile.TemporaryDirectory(prefix="fastsft-demo-model-") as folder:  # the same path as a user's model
            demo_model(seed=settings.seed).save_pretrained(folder)
            demo_tokenizer().save_pretrained(folder)
            model, tokenizer = fastsft.load(folder, **options)
        # Named as any model made from a config is (PEFT records the name in the adapter), not by the deleted folder
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.name_or_path = inner.config._name_or_path = ""
        for config in getattr(model, "peft_config", {}).values():
            config.base_model_name_or_path = None
        return model, tokenizer
    path = Path(settings.model).expanduser()
    if not path.exists() and not _could_be_hub_id(settings.model):
        raise UsageError(f"model path {settings.model} does not exist")
    try:
        return fastsft.load(str(path) if path.exists() else settings.model, **options)
    except OSError as exc:  # transformers' word for "no such model here or on the hub", missing weights included
        hint = ""
        if path.exists() and path.resolve() == DEMO_MODEL_DIR.resolve():
            hint = f" (the shipped folder holds the config and tokenizer only: --model {DEMO} builds the model)"
        raise UsageError(f"cannot load model {settings.model}: {' '.join(str(exc).split())}{hint}") from None


def _could_be_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id ("name" or "namespace/name"), not that of a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def run(settings: TrainSettings) -> dict:
    import fastsft
    from transformers import set_seed

    arguments = sft_arguments(settings)
    resume = resume_checkpoint(settings)
    dataset = load_dataset_file(settings.dataset)
    try:
        args = fastsft.SFTConfig(**arguments)
    except (TypeError, ValueError) as exc:  # transformers' and TRL's checks of the values and their combinations
        raise UsageError(f"invalid SFTConfig settings: {' '.join(str(exc).split())}") from None
    set_seed(settings.seed)  # before any weight exists: the LoRA matrices are initialized while loading
    model, tokenizer = load_model(settings)
    throughput = ThroughputCallback()
    trainer = fastsft.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[throughput], patch=settings.patch)
    if trainer.patch_report is not None:
        logger.info("%s", trainer.patch_report)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(settings.output_dir)  # a PEFT model saves its adapter only
    tokenizer.save_pretrained(settings.output_dir)
    logger.info("saved to %s", settings.output_dir)
    return {"losses": throughput.losses, "train_runtime": result.metrics["train_runtime"],
            "peak_memory_bytes": peak_memory_bytes(args.device)}


def flat_config(config_path: str | None) -> bool:
    """Whether the YAML file is a flat ``trl sft`` config (``model_name_or_path``, ...), not the nested one of
    :class:`TrainSettings`."""
    if config_path is None or not Path(config_path).is_file():
        return False
    import yaml

    try:
        values = yaml.safe_load(Path(config_path).read_text())
    except yaml.YAMLError:
        return False  # load_settings says what is wrong with it
    return isinstance(values, dict) and "model_name_or_path" in values


def main(args) -> int:
    if flat_config(args.config):
        from fastsft.commands import sft

        given = [f"--{name.replace('_', '-')}" for name in ("model", "dataset", "output_dir", "max_steps")
                 if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"{args.config} is a flat trl sft config: give {', '.join(given)} as fastsft sft's "
                             f"flags (fastsft sft --config {args.config} --help lists them)")
        return sft.main(["--config", args.config])
    if args.config is not None:
        warnings.warn("fastsft train's nested YAML (model:, dataset:, lora:, sft:) is deprecated: write the flat "
                      "config of trl sft (model_name_or_path:, dataset_name:, use_peft:, lora_r:, ...) and run "
                      "fastsft sft --config FILE (fastsft train FILE runs it too)", FutureWarning, stacklevel=2)
    overrides = {name: getattr(args, name, None) for name in
                 ("model", "dataset", "output_dir", "max_steps", "learning_rate", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_seq_length", "dtype", "seed", "resume_from_checkpoint")}
    if args.load_in_4bit:
        overrides["load_in_4bit"] = True
    if args.no_patch:
        overrides["patch"] = False
    run(load_settings(args.config, overrides))
    return 0
