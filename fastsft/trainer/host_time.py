"""Host work that transformers repeats at every micro-batch with nothing changed, done once or skipped.

A training step's host work runs while the GPU waits for the step's first kernels. transformers walks the whole
module tree twice per micro-batch although the answers do not change within a ``train()`` call: ``model.train()``
at the top of ``training_step``, and the parameter count in ``floating_point_ops``. At the Llama-8B LoRA shape
(about 2,600 modules) each walk takes about 10 ms of host time (``model.train()``: 7-14 ms on a 2-core machine).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import torch


class ParameterCount:
    """The non-embedding parameter count of transformers' ``floating_point_ops`` (6 x input tokens x that count,
    for ``total_flos``), counted once per model instead of on every micro-batch (a walk over every module and
    parameter). :meth:`clear` at each ``train()`` call: the model may have changed since the last one."""

    def __init__(self):
        self._counted = None  # (model, count)

    def clear(self) -> None:
        self._counted = None

    def __call__(self, model) -> int:
        if self._counted is None or self._counted[0] is not model:
            self._counted = (model, model.num_parameters(exclude_embeddings=True))
        return self._counted[1]


@functools.lru_cache(maxsize=None)
def _plain_train(cls) -> bool:
    """Whether ``cls.train`` only sets ``training`` on the tree when the mode does not change."""
    from transformers import PreTrainedModel

    # PreTrainedModel's re-installs kernels, but only on a mode change
    return cls.train in (torch.nn.Module.train, PreTrainedModel.train)


def _all_in_training_mode(model) -> bool:
    """Every module in training mode, none with a train() of its own (a walk over ``_modules``, without
    nn.Module's generators: ~1 ms for 2,665 modules where ``model.train()`` takes 7-14)."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module is None:
            continue
        if module.training is not True or not _plain_train(type(module)):
            return False
        stack.extend(module._modules.values())
    return True


@contextlib.contextmanager
def train_call_skipped_if_noop(model):
    """Within the block, the first ``model.train()`` returns at once when it would change nothing (every module
    training already, none with a train() of its own); any other call (``train(False)``, ``eval()``, a second
    call) runs as usual."""
    if "train" in model.__dict__ or not _all_in_training_mode(model):
        yield
        return

    def train(mode: bool = True):
        del model.__dict__["train"]
        return model if mode is True else model.train(mode)

    model.__dict__["train"] = train
    try:
        yield
    finally:
        model.__dict__.pop("train", None)


def non_blocking_batches(args):
    """``args`` with accelerate's batch transfers non-blocking (``accelerator_config.non_blocking``) where the data
    loader pins its batches (``dataloader_pin_memory``, on by default): a blocking copy waits for every kernel
    queued before it, so each step's batch would stall the host until the previous step has finished on the GPU.
    From pinned memory the copy is safe without the wait (the pinned block is not reused before the copy is
    done). A copy of ``args`` when it changes; the caller's object is left as it was."""
    config = getattr(args, "accelerator_config", None)
    if args is None or config is None or not args.dataloader_pin_memory or config.non_blocking:
        return args
    args = copy.copy(args)
    args.accelerator_config = dataclasses.replace(config, non_blocking=True)
    return args
