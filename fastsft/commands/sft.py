"""``fastsft sft``: ``trl sft`` as TRL users know it (its script arguments, ``SFTConfig``, ``ModelConfig``, dataset
mixtures, and flat YAML configs through ``--config``), trained by :class:`fastsft.SFTTrainer`, plus fastsft's own
options (``--fastsft_*``). Every ``trl sft`` flag and config file works unchanged::

    fastsft sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name ./chat.jsonl --use_peft --lora_r 16 \\
        --packing --output_dir out
    fastsft sft --config sft.yaml --fastsft_disable rope

Datasets (``--dataset_name``): a JSON/JSONL/Parquet/CSV file (or a glob of them), a dataset folder, a name that
``datasets`` finds in its local cache, ``demo`` (the built-in chat data), or ``--datasets`` mixtures as in TRL. The
model: a folder, a hub id where reachable, or ``demo`` (the built-in small model, random init). On a machine without
a GPU the run is on the CPU (``use_cpu``, no bf16) unless the flags or the config say otherwise. At the end the
adapter (or model) is saved in ``--output_dir`` with a plot of the losses, ``loss.png``.
"""

from __future__ import annotations

import glob
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastsft.cli import UsageError
from fastsft.commands import plots

logger = logging.getLogger("fastsft")

DEMO = "demo"
KERNELS = ("fused_cross_entropy", "attention", "rms_norm", "lora", "gated_activation", "rope")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class FastsftArguments:
    """fastsft's options of ``fastsft sft`` (the rest are TRL's)."""

    fastsft_patch: bool = field(default=True, metadata={"help": "patch the model with fastsft's kernels; false: "
                                                                "stock TRL behaviour"})
    fastsft_disable: str = field(default="", metadata={"help": f"comma-separated kernels left off: "
                                                               f"{', '.join(KERNELS)}"})
    fastsft_backend: str = field(default="auto", metadata={"help": "auto, cuda, triton or reference"})
    fastsft_capture_layers: bool = field(default=True, metadata={"help": "run the checkpointed decoder layers of "
                                                                         "packed steps as CUDA graphs"})
    fastsft_offload: bool = field(default=False, metadata={"help": "offloaded gradient checkpointing (the layer "
                                                                   "inputs wait in CPU memory) also where the "
                                                                   "layers are not captured"})
    fastsft_plot: bool = field(default=True, metadata={"help": "write loss.png into the output folder"})


def make_parser():
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from fastsft.trainer import SFTConfig

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, FastsftArguments),
                     prog="fastsft sft")


def parse(argv: list[str]):
    """``(script_args, training_args, model_args, dataset_args, fastsft_args)`` of ``argv``; on a machine without an
    accelerator the CPU settings are added unless given."""
    argv = list(argv)
    asks_help = "-h" in argv or "--help" in argv
    if not asks_help and not _has_accelerator() and not _sets_any(argv, ("use_cpu", "bf16", "fp16")):
        argv += ["--use_cpu", "true", "--bf16", "false"]
        logger.info("no GPU here: training on the CPU (use_cpu=True, bf16=False)")
    try:
        return make_parser().parse_args_and_config(args=argv)
    except (ValueError, TypeError, OSError) as exc:  # TRL's config checks, SFTConfig's value checks, a missing file
        raise UsageError(" ".join(str(exc).split())) from None


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _sets_any(argv: list[str], names) -> bool:
    """Whether the flags or the ``--config`` file give any of ``names``."""
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        path = Path(argv[argv.index("--config") + 1])
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        given |= set(config) if isinstance(config, dict) else set()
    return bool(given & set(names))


def load_datasets(script_args, dataset_args):
    """The ``DatasetDict`` of the run (see the module docstring for what ``--dataset_name`` may be)."""
    from datasets import DatasetDict, load_dataset

    name = script_args.dataset_name
    if dataset_args.datasets:
        from trl import get_dataset

        return get_dataset(dataset_args)
    if not name:
        raise UsageError("give --dataset_name (a file, a folder, a cached dataset name, or 'demo') or --datasets")
    try:
        if name == DEMO:
            from fastsft.demo_assets import DEMO_DATASET

            return load_dataset("json", data_files=str(DEMO_DATASET))
        files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
        suffixes = {Path(f).suffix.lower() for f in files}
        if files and all(Path(f).is_file() for f in files) and len(suffixes) == 1 and suffixes <= set(_FILE_BUILDERS):
            return load_dataset(_FILE_BUILDERS[suffixes.pop()], data_files=files)
        if Path(name).suffix.lower() in _FILE_BUILDERS:
            raise UsageError(f"dataset file {name} does not exist")
        dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    except UsageError:
        raise
    except Exception as exc:  # datasets' own errors: not found offline, unreadable files
        cause = exc.__cause__ or exc
        raise UsageError(f"cannot load dataset {name}: {' '.join(str(cause).split())}") from None
    return dataset if isinstance(dataset, DatasetDict) or hasattr(dataset, "keys") else DatasetDict(train=dataset)


def _split(datasets, split: str, what: str):
    if split not in datasets:
        raise UsageError(f"the dataset has no {what} split {split!r} (it has {', '.join(datasets)}): name another with "
                         f"--dataset_{'train' if what == 'training' else 'test'}_split")
    return datasets[split]


def patch_options(fastsft_args) -> bool | dict:
    if not fastsft_args.fastsft_patch:
        return False
    off = [name.strip() for name in fastsft_args.fastsft_disable.split(",") if name.strip()]
    if unknown := sorted(set(off) - set(KERNELS)):
        raise UsageError(f"--fastsft_disable: unknown kernel {', '.join(unknown)} (known: {', '.join(KERNELS)})")
    return {**{name: False for name in off}, "backend": fastsft_args.fastsft_backend}


def run(script_args, training_args, model_args, dataset_args, fastsft_args):
    import fastsft
    from trl import get_peft_config, get_quantization_config

    patch = patch_options(fastsft_args)  # its mistakes before any loading
    datasets = load_datasets(script_args, dataset_args)
    train_dataset = _split(datasets, script_args.dataset_train_split, "training")
    eval_dataset = (_split(datasets, script_args.dataset_test_split, "evaluation")
                    if training_args.eval_strategy != "no" else None)
    if fastsft_args.fastsft_offload:
        training_args.gradient_checkpointing, training_args.gradient_checkpointing_offload = True, True
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    elif isinstance(resume, str) and not Path(resume).is_dir():
        raise UsageError(f"checkpoint folder {resume} does not exist")
    with tempfile.TemporaryDirectory(prefix="fastsft-demo-model-") as folder:
        model = _model(model_args, training_args, folder)
        try:
            trainer = fastsft.SFTTrainer(
                model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args),
                patch=patch, capture_layers=fastsft_args.fastsft_capture_layers)
        except OSError as exc:  # transformers' word for "no such model here or on the hub"
            raise UsageError(f"cannot load model {model_args.model_name_or_path}: {' '.join(str(exc).split())}") \
                from None
        if model_args.model_name_or_path == DEMO:  # named as a model made from a config, not by the deleted folder
            inner = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
            inner.name_or_path = inner.config._name_or_path = ""
            for config in getattr(trainer.model, "peft_config", {}).values():
                config.base_model_name_or_path = None
    if trainer.patch_report is not None:
        logger.info("%s", trainer.patch_report)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    logger.info("saved to %s", training_args.output_dir)
    if fastsft_args.fastsft_plot:
        path = plots.loss_plot(trainer.state.log_history, Path(training_args.output_dir) / "loss.png",
                           title=f"{model_args.model_name_or_path} on {script_args.dataset_name or 'a mixture'}")
        if path is not None:
            logger.info("loss curve: %s", path)
    return trainer


def _model(model_args, training_args, folder: str):
    """What the trainer gets as its model: the name (TRL loads it with ``model_init_kwargs``), or for ``demo``
    the built-in model saved into ``folder``."""
    if not model_args.model_name_or_path:
        raise UsageError("give --model_name_or_path (a folder, a hub id, or 'demo')")
    # as trl sft sets them (TRL 1.16 keeps trust_remote_code in SFTConfig)
    trust = getattr(training_args, "trust_remote_code", getattr(model_args, "trust_remote_code", False))
    init = dict(revision=model_args.model_revision, trust_remote_code=trust,
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**init, **(training_args.model_init_kwargs or {})}
    if model_args.model_name_or_path == DEMO:
        from fastsft.demo_assets import demo_model, demo_tokenizer

        demo_model(seed=training_args.seed).save_pretrained(folder)
        demo_tokenizer().save_pretrained(folder)
        return folder
    path = Path(model_args.model_name_or_path).expanduser()
    return str(path) if path.exists() else model_args.model_name_or_path


def main(argv: list[str]) -> int:
    run(*parse(argv))
    return 0
