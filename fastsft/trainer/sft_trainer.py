"""The :class:`SFTTrainer` class: TRL's trainer wired to fastsft's pieces, each in its own module of
:mod:`fastsft.trainer` (this one only hooks them into TRL's and transformers' methods)."""

from __future__ import annotations

import logging

import torch
import trl
from transformers.trainer_callback import DefaultFlowCallback

from fastsft import patching
from fastsft.captured_layers import enable_captured_layers
from fastsft.callbacks import ThroughputCallback
from fastsft.memory import MemoryBreakdown, memory_breakdown
from fastsft.offload_checkpointing import offload_on_enable
from fastsft.trainer.arguments import map_trainer_kwargs, take_offload
from fastsft.trainer.ddp import lora_ddp_settings
from fastsft.trainer.host_time import ParameterCount, non_blocking_batches, train_call_skipped_if_noop
from fastsft.trainer.metrics import TokenMetrics
from fastsft.trainer.syncs import DeferredTokenCount, LossFilter, TokenCountCallback
from fastsft.trainer.trl_head import install_after_trl

logger = logging.getLogger(__name__)


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` that patches the model with :func:`fastsft.patch` (a model object, a PEFT model, or a
    path/hub id that TRL loads). ``patch``: ``True`` (default switches), ``False`` (plain TRL), or a dict of
    :func:`fastsft.patch` keyword arguments. The report is ``trainer.patch_report`` (None when not patched).
    ``gradient_checkpointing="offload"`` in ``args`` offloads the checkpointed layer inputs to CPU memory, and
    ``gradient_checkpointing_offload=False`` keeps them on the device; by default they are offloaded when the
    layers are captured (below) and kept otherwise. ``trainer.offloaded_checkpointing`` says which.

    ``capture_layers``: with packing into padding-free batches and gradient checkpointing (TRL's defaults for
    ``packing=True``), the checkpointed decoder layers run as CUDA graphs, captured at the first step for the
    batch's token budget (``per_device_train_batch_size * max_length``) and replayed at every step
    (:mod:`fastsft.captured_layers`); ``False`` keeps them eager; a dict passes options to
    :func:`fastsft.enable_captured_layers`. The object is ``trainer.captured_layers`` (None when off).

    At the end of ``train()`` the peak memory and what of it the weights, adapters, gradients and optimizer state
    hold are logged and kept as ``trainer.memory_report`` (:func:`fastsft.memory.memory_breakdown`).

    transformers' NaN/inf loss filter and ``num_input_tokens_seen`` are computed without reading the device after
    each micro-batch (:mod:`fastsft.trainer.syncs`): the same logged values; ``args.logging_nan_inf_filter`` is
    off in the trainer's copy of ``args``, and the token count is current at each log, save and evaluation."""

    def __init__(self, model, args=None, *positional, patch: bool | dict = True, capture_layers: bool | dict = True,
                 **kwargs):
        args, kwargs = map_trainer_kwargs(model, args, kwargs)
        args, offload = take_offload(args)
        args = non_blocking_batches(args)
        if not isinstance(patch, (bool, dict)):
            raise TypeError(f"SFTTrainer(patch=...) takes a bool or a dict of fastsft.patch options, got "
                            f"{type(patch).__name__}")
        switches = patch if isinstance(patch, dict) else {}
        self.patch_report: patching.PatchReport | None = None
        self._token_metrics = TokenMetrics()  # training micro-batches' metric sums, read at the next log
        self._parameter_count = ParameterCount()
        # A model object is patched before TRL sees it (so a bad backend fails before any work); TRL then wraps
        # the patched forward with its head, which install_after_trl takes off again.
        if patch is not False and not isinstance(model, str) and patching.is_supported(model):
            self.patch_report = patching.patch(model, **switches)
        super().__init__(model, args, *positional, **kwargs)
        # tokens/s and peak memory in every training log, ahead of the reporting callbacks that write the logs out
        self.callback_handler.callbacks.insert(0, ThroughputCallback())
        # the loss filter and the token count on the device (fastsft.trainer.syncs); the count is brought up to
        # date right after transformers' flow callback decides a step's log, save or evaluation
        self._loss_filter, self._token_count = LossFilter(self), DeferredTokenCount()
        flow = next((i for i, c in enumerate(self.callback_handler.callbacks) if isinstance(c, DefaultFlowCallback)), 0)
        self.callback_handler.callbacks.insert(flow + 1, TokenCountCallback(self))
        if patch is not False:
            self.patch_report = install_after_trl(patching.causal_lm_of(self.model), self.patch_report, switches)
        captured = self._captures_layers(capture_layers)
        # by default the captured layers' inputs wait in host memory (as fast, less memory; docs/settings.md)
        self.offloaded_checkpointing = offload if offload is not None else captured
        if self.offloaded_checkpointing:
            # transformers' Trainer enables checkpointing in train(), not here: the offloading is installed by that
            # call (and any later one); before the capture, which wraps the checkpointing function it finds
            offload_on_enable(self.model)
        self.captured_layers = self._capture_layers(capture_layers) if captured else None
        self.memory_report: MemoryBreakdown | None = None  # set at the end of train()

    def _captures_layers(self, capture_layers: bool | dict) -> bool:
        if not isinstance(capture_layers, (bool, dict)):
            raise TypeError(f"SFTTrainer(capture_layers=...) takes a bool or a dict of enable_captured_layers "
                            f"options, got {type(capture_layers).__name__}")
        # rows that are not packed, or layers not checkpointed: nothing the graphs take
        return bool(capture_layers is not False and getattr(self, "padding_free", False)
                    and self.args.gradient_checkpointing)

    def _capture_layers(self, capture_layers: bool | dict):
        options = capture_layers if isinstance(capture_layers, dict) else {}
        length = self.args.max_length
        if length is not None:
            options = {"token_budget": self.args.per_device_train_batch_size * length, "max_length": length,
                       **options}
        return enable_captured_layers(self.model, **options)

    def train(self, *args, **kwargs):
        self._parameter_count.clear()  # the model may have changed since the last call
        result = super().train(*args, **kwargs)
        if self.captured_layers is not None:
            logger.info("fastsft %s", self.captured_layers.summary())
        # the peak since train() began (ThroughputCallback resets it) and what of it lives through the run
        self.memory_report = memory_breakdown(self.model, self.optimizer)
        logger.info("fastsft %s", self.memory_report.summary())
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        # transformers' training_step begins with model.train(), a walk over every module each micro-batch
        with train_call_skipped_if_noop(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        return self._loss_filter(self, loss)

    def _track_num_input_tokens(self, inputs):
        if not self._token_count.add(self, inputs):
            super()._track_num_input_tokens(inputs)

    def floating_point_ops(self, inputs) -> int:
        # transformers' formula (6 x input tokens x non-embedding parameters), the parameters counted once
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        return 6 * inputs[main_input].numel() * self._parameter_count(self.model)

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        lora_ddp_settings(args.get("kwargs_handlers", []), self.model, self.args)
        return args

    @property
    def _fastsft_loss_active(self) -> bool:
        return self.patch_report is not None and "fused_cross_entropy" in self.patch_report.patched

    def _can_take_fused_loss(self) -> bool:
        """Whether the loss is TRL's plain NLL, which fastsft's fused op computes directly."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        sequence_parallel = pc is not None and pc.sp_enabled
        return (self._fastsft_loss_active and self.args.loss_type == "nll" and self.compute_loss_func is None
                and self.label_smoother is None and not self.aux_loss_enabled and not sequence_parallel)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._can_take_fused_loss():
            # DFT, custom losses, label smoothing, MoE aux loss: TRL's code, on fastsft's `fused_lm_head` outputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, return_token_stats=True)
        loss = outputs.loss
        # From here on, as in trl.SFTTrainer.compute_loss (1.16): DDP averages gradients across ranks while
        # `num_items_in_batch` counts the tokens of all of them
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_token_metrics(mode, inputs, outputs)
        if return_outputs:
            # Logits for `compute_metrics` / `preprocess_logits_for_metrics`: the unpatched forward (no labels)
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode: str, inputs: dict, outputs) -> None:
        """TRL's token metrics of one forward; in training read at the next :meth:`log` (:class:`TokenMetrics`)."""
        self._token_metrics.record(self, mode, inputs, outputs)

    def _resolve_token_stats(self) -> None:
        self._token_metrics.resolve(self)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self._token_count.resolve(self)
        self._resolve_token_stats()
        super().log(logs, *args, **kwargs)
