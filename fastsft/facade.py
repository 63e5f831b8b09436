"""``fastsft.FastLanguageModel``: the Unsloth-style loader, so classic notebooks run with one import changed.

::

    from fastsft import FastLanguageModel           # was: from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained("path/to/model", max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth")

Built on :func:`fastsft.load` (loading, kernels) and PEFT (the adapter). Arguments that would change what is
trained and that fastsft does not implement raise an error that names them instead of being ignored.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["FastLanguageModel", "is_bfloat16_supported"]

# Unsloth's default target list: every projection of the decoder blocks
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# from_pretrained keywords that notebooks pass with their "off" value; accepted only with exactly that value
_ACCEPTED_IF = {"load_in_8bit": False, "full_finetuning": False, "fast_inference": False, "fix_tokenizer": True,
                "use_exact_model_name": False, "load_in_16bit": False, "float8_kv_cache": False}
_DEVICE_MAPS = (None, "sequential", "auto")


def is_bfloat16_supported() -> bool:
    """Whether the current CUDA device computes in bfloat16 (False without a GPU), as notebooks use it for
    ``bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()``."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class FastLanguageModel:
    """Unsloth's ``FastLanguageModel`` entry points on top of :func:`fastsft.load` and PEFT."""

    @staticmethod
    def from_pretrained(model_name: str = "unsloth/Llama-3.2-1B-Instruct", max_seq_length: int | None = 2048,
                        dtype=None, load_in_4bit: bool = False, token: str | None = None,
                        device_map="sequential", trust_remote_code: bool = False, **kwargs):
        """Load ``(model, tokenizer)`` with fastsft's kernels patched in.

        Args:
            model_name: a local directory, or a hub id where the hub is reachable.
            max_seq_length: sets ``tokenizer.model_max_length`` and ``model.max_seq_length`` (positions and
                RoPE scaling are not changed).
            dtype: ``None`` picks bfloat16 on GPUs that support it, float16 on other GPUs and float32 on the CPU;
                otherwise a ``torch.dtype``, its name, or ``"auto"`` (the checkpoint's).
            load_in_4bit: NF4 QLoRA weights (needs bitsandbytes and a GPU).
            token: a hub token, used for this call only.
            device_map: ``"sequential"``, ``"auto"`` or ``None``: the model is loaded whole and the trainer puts it
                on its device; device maps that split the model are not supported.
            trust_remote_code: must be False (only transformers' own architectures are loaded and patched).
        """
        from fastsft.loading import load

        _reject_kwargs("FastLanguageModel.from_pretrained", kwargs, _ACCEPTED_IF)
        if trust_remote_code:
            raise ValueError("FastLanguageModel.from_pretrained(trust_remote_code=True) is not supported: fastsft "
                             "loads transformers' own architectures only")
        if not (device_map in _DEVICE_MAPS or device_map == {"": 0}):
            raise ValueError(f"FastLanguageModel.from_pretrained(device_map={device_map!r}) is not supported: use "
                             f"'sequential', 'auto' or None (the model is loaded whole; the trainer places it)")
        with _hub_token(token):
            model, tokenizer = load(model_name, dtype=_default_dtype() if dtype is None else dtype,
                                    load_in_4bit=load_in_4bit, max_seq_length=max_seq_length)
        model.max_seq_length = max_seq_length
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       bias: str = "none", layers_to_transform=None, layers_pattern=None,
                       use_gradient_checkpointing: bool | str = True, random_state: int = 3407,
                       max_seq_length: int | None = None, use_rslora: bool = False, modules_to_save=None,
                       init_lora_weights=True, loftq_config=None, **kwargs):
        """Wrap ``model`` with a LoRA adapter (``peft.get_peft_model``) and set up gradient checkpointing.

        ``use_gradient_checkpointing``: ``True`` (transformers' checkpointing), ``"unsloth"`` (non-reentrant
        checkpointing here; activations stay on the GPU), ``"offload"`` (non-reentrant, each decoder layer's input
        kept in pinned CPU memory until its backward: :func:`fastsft.enable_offloaded_checkpointing`), ``False``.
        ``random_state`` seeds the adapter's initialization. Other keywords must be ``peft.LoraConfig`` fields
        (``use_dora``, ``rank_pattern``, ...); anything else raises a ``TypeError`` naming it.
        """
        from dataclasses import fields

        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise ValueError("FastLanguageModel.get_peft_model: the model already has a PEFT adapter")
        if loftq_config not in (None, {}):
            raise NotImplementedError("FastLanguageModel.get_peft_model(loftq_config=...) is not supported; pass "
                                      "loftq_config=None")
        lora_fields = {f.name for f in fields(LoraConfig)} - {"task_type", "peft_type", "target_modules", "r"}
        _reject_kwargs("FastLanguageModel.get_peft_model", {k: v for k, v in kwargs.items() if k not in lora_fields})
        if use_gradient_checkpointing not in (True, False, "unsloth", "offload"):
            raise ValueError(f"use_gradient_checkpointing must be True, False, 'unsloth' or 'offload', got "
                             f"{use_gradient_checkpointing!r}")
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        config = LoraConfig(r=r, target_modules=DEFAULT_TARGET_MODULES if target_modules is None else target_modules,
                            lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                            use_rslora=use_rslora, modules_to_save=modules_to_save,
                            init_lora_weights=init_lora_weights, task_type="CAUSAL_LM", **kwargs)
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if use_gradient_checkpointing == "offload":
            from fastsft.offload_checkpointing import enable_offloaded_checkpointing

            enable_offloaded_checkpointing(model)  # stays offloaded when a trainer enables checkpointing again
            model.config.use_cache = False
        elif use_gradient_checkpointing:
            reentrant = use_gradient_checkpointing is True
            kwargs = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns there)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
            if reentrant:  # reentrant checkpointing only backpropagates into inputs that require grad
                model.enable_input_require_grads()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            peft_model = get_peft_model(model, config)
        peft_model.max_seq_length = getattr(model, "max_seq_length", None)
        peft_model.fastsft_patch_report = getattr(model, "fastsft_patch_report", None)
        return peft_model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        """Training mode (dropout on); with ``use_gradient_checkpointing=False`` checkpointing is switched off."""
        model.train()
        if not use_gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return model

    @staticmethod
    def for_inference(model):
        """Evaluation mode (dropout off) with the KV cache on, for ``model.generate``."""
        model.eval()
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = True
        return model


def _default_dtype():
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _reject_kwargs(where: str, kwargs: dict, accepted_if: dict | None = None) -> None:
    accepted_if = accepted_if or {}
    bad = {k: v for k, v in kwargs.items() if not (k in accepted_if and v == accepted_if[k])}
    if bad:
        names = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise TypeError(f"{where}: unsupported argument(s) {names} (fastsft implements only the arguments in "
                        f"its signature)")


@contextlib.contextmanager
def _hub_token(token):
    if token is None:
        yield
        return
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous
