"""``fastsft.load``: a causal LM and its tokenizer, patched and optionally wrapped with LoRA, in one call."""

from __future__ import annotations

from pathlib import Path

import torch

from fastsft import patching

# PEFT's name for every linear layer except the output layer: all linear layers of the decoder blocks, with
# lm_head and the embeddings frozen (the usual LoRA/QLoRA recipe)
DEFAULT_LORA_TARGETS = "all-linear"
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}


def load(name_or_path: str | Path, *, dtype="auto", load_in_4bit: bool = False, max_seq_length: int | None = None,
         lora=None, patch: bool | dict = True):
    """Load ``(model, tokenizer)`` from a local directory (or a hub id where the hub is reachable).

    Args:
        dtype: ``"auto"`` (the checkpoint's dtype), a ``torch.dtype`` or its name (``"bfloat16"``).
        load_in_4bit: QLoRA-style NF4 weights with double quantization and bf16 compute (needs bitsandbytes).
        max_seq_length: sets ``tokenizer.model_max_length`` (the model's positions are not changed).
        lora: ``None`` (no adapter), a ``peft.LoraConfig``, or a dict of its arguments; a dict without
            ``target_modules`` targets every linear layer of the decoder blocks.
        patch: ``True`` (all kernels), ``False``, or a dict of :func:`fastsft.patch` keyword arguments.

    The model is patched before LoRA wraps it (patching acts on the inner causal LM either way); its report
    is ``model.fastsft_patch_report`` (None when ``patch=False``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"fastsft.load expects a directory or hub id, got {type(name_or_path).__name__}")
    if not isinstance(patch, (bool, dict)):
        raise TypeError(f"fastsft.load(patch=...) takes a bool or a dict, got {type(patch).__name__}")
    kwargs = {"dtype": _dtype(dtype)}
    if load_in_4bit:
        kwargs["quantization_config"] = _nf4_config()
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if max_seq_length is not None:
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
        tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; TRL does the same
    report = patching.patch(model, **(patch if isinstance(patch, dict) else {})) if patch is not False else None
    if lora is not None:
        model = _wrap_lora(model, lora, quantized=load_in_4bit)
    model.fastsft_patch_report = report
    return model, tokenizer


def _dtype(dtype):
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be 'auto', a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def _nf4_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("fastsft.load(load_in_4bit=True) needs the bitsandbytes package "
                          "(pip install bitsandbytes), which is not installed") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_config(lora):
    """A ``peft.LoraConfig`` from a LoraConfig or a dict (defaults: ``DEFAULT_LORA`` on ``DEFAULT_LORA_TARGETS``)."""
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if not isinstance(lora, dict):
        raise TypeError(f"lora= takes a peft.LoraConfig or a dict of its arguments, got {type(lora).__name__}")
    return LoraConfig(**{**DEFAULT_LORA, "target_modules": DEFAULT_LORA_TARGETS, **lora})


def _wrap_lora(model, lora, *, quantized: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, lora_config(lora))
