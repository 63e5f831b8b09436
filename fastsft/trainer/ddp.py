"""DDP settings for training that updates only LoRA adapters."""

from __future__ import annotations


def lora_ddp_settings(kwargs_handlers: list, model, args) -> None:
    """Set the ``DistributedDataParallelKwargs`` among ``kwargs_handlers`` (accelerate's, as transformers builds
    them) for ``model`` when only its LoRA adapters train and ``args`` leaves the DDP settings unset.

    transformers asks DDP to search for unused parameters after every forward unless the model is a plain
    PreTrainedModel with checkpointing, so a PEFT model always pays that graph walk on the host. Every LoRA
    adapter weight takes part in every forward, so when they are all that trains and the user set nothing, DDP is
    told so, and two more per-step costs go: DDP copies each gradient into its all-reduce bucket (one copy launch
    per adapter matrix; ``gradient_as_bucket_view`` makes the gradients views of the buckets), and broadcasts the
    module buffers from rank 0 before every forward (a collective that makes the ranks wait for each other at
    each forward). The broadcast stays when the model has persistent buffers (running statistics and the like:
    state); the rotary tables of the supported families are not persistent, being computed from the config.
    """
    if args.ddp_find_unused_parameters is not None or not _trains_only_lora(model):
        return
    from accelerate.utils import DistributedDataParallelKwargs

    for handler in kwargs_handlers:
        if isinstance(handler, DistributedDataParallelKwargs):
            handler.find_unused_parameters = False
            handler.gradient_as_bucket_view = True
            if args.ddp_broadcast_buffers is None and not _has_persistent_buffers(model):
                handler.broadcast_buffers = False


def _trains_only_lora(model) -> bool:
    """Whether every trainable parameter is a LoRA adapter matrix (no modules_to_save, biases or embeddings)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return bool(trainable) and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def _has_persistent_buffers(model) -> bool:
    """Whether any module has a buffer that is part of its state (``register_buffer(..., persistent=True)``)."""
    return any(buf is not None and name not in m._non_persistent_buffers_set
               for m in model.modules() for name, buf in m._buffers.items())
