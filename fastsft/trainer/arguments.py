"""The older ``SFTConfig`` / ``SFTTrainer`` argument names mapped to those of TRL 1.16 and transformers 5, one
FutureWarning each, and ``gradient_checkpointing="offload"`` turned into what TRL and transformers understand."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import trl

# Old argument names -> TRL 1.16 / transformers 5 names (one FutureWarning each when used)
_RENAMED_CONFIG_ARGS = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy",
                        "push_to_hub_token": "hub_token", "per_gpu_train_batch_size": "per_device_train_batch_size",
                        "per_gpu_eval_batch_size": "per_device_eval_batch_size"}
# Old names that no longer have any effect: accepted with a warning that says so
_DROPPED_CONFIG_ARGS = {
    "overwrite_output_dir": "it had no effect in transformers.Trainer and was removed in transformers 5",
    "include_tokens_per_second": "fastsft.SFTTrainer always logs tokens_per_second",
    "dataset_batch_size": "it was removed from TRL; dataset preparation no longer uses it",
    "num_of_sequences": "it was removed from TRL; packing uses max_length",
    "chars_per_token": "it was removed from TRL; packing uses max_length",
}


def _deprecated(message: str) -> None:
    # stacklevel 4: past this function, the mapping function and the __init__ that called it
    warnings.warn(message, FutureWarning, stacklevel=4)


def map_config_kwargs(kwargs: dict, where: str) -> dict:
    """``kwargs`` with the old names of :data:`_RENAMED_CONFIG_ARGS` renamed and those of
    :data:`_DROPPED_CONFIG_ARGS` removed, one FutureWarning per old name."""
    kwargs = dict(kwargs)
    for old, new in _RENAMED_CONFIG_ARGS.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{where}: got both {old}= (the old name) and {new}=; pass only {new}=")
            _deprecated(f"{where}({old}=...) is deprecated: use {new}= (TRL 1.16 / transformers 5 name)")
            kwargs[new] = kwargs.pop(old)
    if "no_cuda" in kwargs:
        if "use_cpu" in kwargs:
            raise TypeError(f"{where}: got both no_cuda= (the old name) and use_cpu=; pass only use_cpu=")
        _deprecated(f"{where}(no_cuda=...) is deprecated: use use_cpu=")
        kwargs["use_cpu"] = kwargs.pop("no_cuda")
    for old, why in _DROPPED_CONFIG_ARGS.items():
        if old in kwargs:
            _deprecated(f"{where}({old}=...) is ignored: {why}")
            kwargs.pop(old)
    if "logging_dir" in kwargs:
        raise TypeError(f"{where}(logging_dir=...) was removed in transformers 5: set the TENSORBOARD_LOGGING_DIR "
                        f"environment variable instead (the default is <output_dir>/runs/...)")
    return kwargs


class SFTConfig(trl.SFTConfig):
    """``trl.SFTConfig`` (TRL 1.16) that also accepts the older argument names, with one FutureWarning each:
    ``max_seq_length`` (-> ``max_length``), ``evaluation_strategy`` (-> ``eval_strategy``), ``no_cuda``
    (-> ``use_cpu``), ``push_to_hub_token``, ``per_gpu_*_batch_size``; and ignores, with a warning, names that
    no longer do anything (``overwrite_output_dir``, ``include_tokens_per_second``, ``dataset_batch_size``, ...).

    ``gradient_checkpointing="offload"``: offloaded checkpointing (:mod:`fastsft.offload_checkpointing`). TRL and
    transformers see ``gradient_checkpointing=True``; ``gradient_checkpointing_offload`` is then True.
    ``gradient_checkpointing_offload``: True or False says it outright; None (the default) lets
    :class:`fastsft.SFTTrainer` decide: offloaded where the decoder layers are captured (packing), where it
    measured as fast, and on the device otherwise.
    """

    def __init__(self, *args, gradient_checkpointing_offload: bool | None = None, **kwargs):
        kwargs = map_config_kwargs(kwargs, "SFTConfig")
        if gradient_checkpointing_offload not in (None, True, False):
            raise TypeError(f"SFTConfig(gradient_checkpointing_offload=...) takes True, False or None, got "
                            f"{gradient_checkpointing_offload!r}")
        offload = _is_offload(kwargs.get("gradient_checkpointing"), kwargs.get("gradient_checkpointing_kwargs"),
                              "SFTConfig")
        if offload:
            if gradient_checkpointing_offload is False:
                raise ValueError("SFTConfig: gradient_checkpointing='offload' with gradient_checkpointing_offload="
                                 "False")
            kwargs["gradient_checkpointing"] = True
        super().__init__(*args, **kwargs)
        self.gradient_checkpointing_offload = True if offload else gradient_checkpointing_offload


def _is_offload(gradient_checkpointing, gradient_checkpointing_kwargs, where: str) -> bool:
    """Whether ``gradient_checkpointing`` asks for offloaded checkpointing; any other string is an error, as is
    offloading with reentrant checkpointing."""
    if not isinstance(gradient_checkpointing, str):
        return False
    if gradient_checkpointing != "offload":
        raise ValueError(f"{where}(gradient_checkpointing={gradient_checkpointing!r}): expected True, False or "
                         f"'offload'")
    if isinstance(gradient_checkpointing_kwargs, dict) and gradient_checkpointing_kwargs.get("use_reentrant"):
        raise ValueError(f"{where}(gradient_checkpointing='offload') needs non-reentrant checkpointing: drop "
                         f"use_reentrant=True from gradient_checkpointing_kwargs")
    return True


def take_offload(args):
    """``(args, offload)``: whether ``args`` asks for offloaded checkpointing (a :class:`SFTConfig` that did, or
    the string ``"offload"`` on any config: True), says no (``gradient_checkpointing_offload=False``: False) or
    leaves it to the trainer (None), with the string replaced by True in a copy for TRL."""
    if args is None:
        return args, None
    said = getattr(args, "gradient_checkpointing_offload", None)
    if said:
        _is_offload("offload", args.gradient_checkpointing_kwargs, "SFTTrainer: args")
        return args, True
    if not _is_offload(args.gradient_checkpointing, args.gradient_checkpointing_kwargs, "SFTTrainer: args"):
        return args, said
    args = copy.copy(args)  # the caller's config object is left as it was
    args.gradient_checkpointing = True
    return args, True


def map_trainer_kwargs(model, args, kwargs: dict):
    """Older ``SFTTrainer`` keyword arguments mapped to TRL 1.16: ``tokenizer=`` -> ``processing_class=``; config
    fields given to the trainer (``dataset_text_field``, ``max_seq_length``, ``packing``, ``dataset_num_proc``,
    ...) are moved into a copy of ``args``. One FutureWarning per old name. Returns ``(args, kwargs)``."""
    kwargs = dict(kwargs)
    if "tokenizer" in kwargs:
        if kwargs.get("processing_class") is not None:
            raise TypeError("SFTTrainer: got both tokenizer= (the old name) and processing_class=; pass only "
                            "processing_class=")
        _deprecated("SFTTrainer(tokenizer=...) is deprecated: use processing_class= (TRL 1.16 name)")
        kwargs["processing_class"] = kwargs.pop("tokenizer")
    config_names = {f.name for f in dataclasses.fields(trl.SFTConfig) if f.init}
    old_names = set(_RENAMED_CONFIG_ARGS) | set(_DROPPED_CONFIG_ARGS) | {"no_cuda", "logging_dir"}
    moved = {name: kwargs.pop(name) for name in list(kwargs) if name in config_names or name in old_names}
    if not moved:
        return args, kwargs
    for name in moved:
        if name not in old_names:  # old names warn once, in map_config_kwargs
            _deprecated(f"SFTTrainer({name}=...) is deprecated: pass it in SFTConfig({name}=...)")
    moved = map_config_kwargs(moved, "SFTTrainer")
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return SFTConfig(output_dir=f"{name.split('/')[-1]}-SFT", **moved), kwargs
    if not isinstance(args, trl.SFTConfig):  # a plain TrainingArguments, converted as TRL does
        return SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token, **moved}), kwargs
    args = copy.copy(args)  # the caller's config object is left as it was
    for name, value in moved.items():
        setattr(args, name, value)
    return args, kwargs
