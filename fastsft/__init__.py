"""fastsft: kernel-first speedups for LoRA/QLoRA supervised fine-tuning.

``fastsft.ops`` holds the kernels (each with reference, Triton and compiled backends); the training-side API
(``patch``, ``load``, ``SFTTrainer``) is imported lazily so that ``import fastsft`` needs neither transformers
nor TRL.
"""

from __future__ import annotations

import importlib

from fastsft import backends, ops

__version__ = "0.1.0"

# name -> module that defines it, imported on first use
_LAZY = {
    "patch": "fastsft.patching",
    "unpatch": "fastsft.patching",
    "PatchReport": "fastsft.patching",
    "load": "fastsft.loading",
    "SFTTrainer": "fastsft.trainer",
    "SFTConfig": "fastsft.trainer",
    "FastLanguageModel": "fastsft.facade",
    "is_bfloat16_supported": "fastsft.facade",
    "enable_offloaded_checkpointing": "fastsft.offload_checkpointing",
    "disable_offloaded_checkpointing": "fastsft.offload_checkpointing",
    "enable_captured_layers": "fastsft.captured_layers",
    "memory_breakdown": "fastsft.memory",
    "disable_captured_layers": "fastsft.captured_layers",
    "enable_tiled_mlp": "fastsft.tiled_mlp",
    "disable_tiled_mlp": "fastsft.tiled_mlp",
}

__all__ = ["__version__", "backends", "ops", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
