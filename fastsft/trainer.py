"""``fastsft.SFTTrainer``: TRL's ``SFTTrainer`` with fastsft's kernels patched into the model.

Change ``from trl import SFTTrainer, SFTConfig`` to ``from fastsft import SFTTrainer, SFTConfig``; everything
else is TRL's (dataset formatting, packing, ``assistant_only_loss``, evaluation, checkpoints, logging).

TRL 1.16 installs its own fused LM head on the model in ``SFTTrainer.__init__`` (a chunked log-prob kernel).
This trainer takes it off again and puts fastsft's patched forward in its place, so the two never stack. The
patched forward also speaks TRL's ``fused_lm_head=True`` protocol, so every TRL loss path still works; the
plain one (``loss_type="nll"``, no ``compute_loss_func``, no label smoothing) is short-cut to fastsft's fused
mean loss, whose gradients are finished in the forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import warnings

import torch
import trl

from fastsft import patching
from fastsft.callbacks import ThroughputCallback
from fastsft.offload_checkpointing import offload_on_enable

__all__ = ["SFTConfig", "SFTTrainer"]

logger = logging.getLogger(__name__)

# The function TRL's `add_fused_lm_head` installs as `model.forward` (checked so we only ever remove TRL's own)
_TRL_FUSED_FORWARD_QUALNAME = "add_fused_lm_head.<locals>._fused_forward"


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
    warnings.warn(message, FutureWarning, stacklevel=4)


def _map_config_kwargs(kwargs: dict, where: str) -> dict:
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
    """

    def __init__(self, *args, **kwargs):
        kwargs = _map_config_kwargs(kwargs, "SFTConfig")
        offload = _is_offload(kwargs.get("gradient_checkpointing"), kwargs.get("gradient_checkpointing_kwargs"),
                              "SFTConfig")
        if offload:
            kwargs["gradient_checkpointing"] = True
        super().__init__(*args, **kwargs)
        self.gradient_checkpointing_offload = offload


def _trains_only_lora(model) -> bool:
    """Whether every trainable parameter is a LoRA adapter matrix (no modules_to_save, biases or embeddings)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return bool(trainable) and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def _has_persistent_buffers(model) -> bool:
    """Whether any module has a buffer that is part of its state (``register_buffer(..., persistent=True)``)."""
    return any(buf is not None and name not in m._non_persistent_buffers_set
               for m in model.modules() for name, buf in m._buffers.items())


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


def _take_offload(args):
    """``(args, offload)``: whether ``args`` asks for offloaded checkpointing (a :class:`SFTConfig` that did, or
    the string ``"offload"`` on any config), with the string replaced by True in a copy for TRL."""
    if args is None:
        return args, False
    if getattr(args, "gradient_checkpointing_offload", False):
        _is_offload("offload", args.gradient_checkpointing_kwargs, "SFTTrainer: args")
        return args, True
    if not _is_offload(args.gradient_checkpointing, args.gradient_checkpointing_kwargs, "SFTTrainer: args"):
        return args, False
    args = copy.copy(args)  # the caller's config object is left as it was
    args.gradient_checkpointing = True
    return args, True


def _map_trainer_kwargs(model, args, kwargs: dict):
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
        if name not in old_names:  # old names warn once, in _map_config_kwargs
            _deprecated(f"SFTTrainer({name}=...) is deprecated: pass it in SFTConfig({name}=...)")
    moved = _map_config_kwargs(moved, "SFTTrainer")
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return SFTConfig(output_dir=f"{name.split('/')[-1]}-SFT", **moved), kwargs
    if not isinstance(args, trl.SFTConfig):  # a plain TrainingArguments, converted as TRL does
        return SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token, **moved}), kwargs
    args = copy.copy(args)  # the caller's config object is left as it was
    for name, value in moved.items():
        setattr(args, name, value)
    return args, kwargs


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` that patches the model with :func:`fastsft.patch` (a model object, a PEFT model, or a
    path/hub id that TRL loads). ``patch``: ``True`` (default switches), ``False`` (plain TRL), or a dict of
    :func:`fastsft.patch` keyword arguments. The report is ``trainer.patch_report`` (None when not patched).
    ``gradient_checkpointing="offload"`` in ``args`` offloads the checkpointed layer inputs to CPU memory."""

    def __init__(self, model, args=None, *positional, patch: bool | dict = True, **kwargs):
        args, kwargs = _map_trainer_kwargs(model, args, kwargs)
        args, offload = _take_offload(args)
        if not isinstance(patch, (bool, dict)):
            raise TypeError(f"SFTTrainer(patch=...) takes a bool or a dict of fastsft.patch options, got "
                            f"{type(patch).__name__}")
        switches = patch if isinstance(patch, dict) else {}
        self.patch_report: patching.PatchReport | None = None
        self._pending_token_stats: list = []  # training micro-batches' metric sums, read at the next log
        # A model object is patched before TRL sees it (so a bad backend fails before any work); TRL then wraps
        # the patched forward with its head, which is dropped again below.
        if patch is not False and not isinstance(model, str) and patching.is_supported(model):
            self.patch_report = patching.patch(model, **switches)
        super().__init__(model, args, *positional, **kwargs)
        # tokens/s and peak memory in every training log, ahead of the reporting callbacks that write the logs out
        self.callback_handler.callbacks.insert(0, ThroughputCallback())
        if offload:
            # transformers' Trainer enables checkpointing in train(), not here: the offloading is installed by that
            # call (and any later one)
            offload_on_enable(self.model)
        if patch is False:
            return
        causal_lm = patching.causal_lm_of(self.model)
        if self.patch_report is None:  # loaded from a path by TRL: patch now, if the architecture is supported
            if not patching.is_supported(causal_lm):
                self.patch_report = patching.patch(causal_lm, **switches)  # warns; TRL's fused head stays
                return
            _remove_trl_fused_head(causal_lm)
            self.patch_report = patching.patch(causal_lm, **switches)
        else:
            patching.reclaim_forward(causal_lm)
            # TRL wrapped the model with PEFT after it was patched: the LoRA layers exist only now
            self.patch_report = patching.refresh(causal_lm) or self.patch_report
        logger.info("%s", self.patch_report)

    def train(self, *args, **kwargs):
        self._parameter_count = None  # the model may have changed since the last call
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # transformers' training_step begins with model.train(): a recursive walk over every module (2,665 at the
        # Llama-8B LoRA shape: 7-14 ms of host time on the 2-core CI machine), each micro-batch, while the GPU waits
        # for the step's first kernels. When every module is training already and none has a train() of its own,
        # that call changes nothing: it is answered without the walk (the check takes 0.7-1 ms there).
        with _train_call_skipped_if_noop(model):
            return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        # transformers' formula (6 x input tokens x non-embedding parameters) for `total_flos`, but it counts the
        # parameters on every micro-batch: a walk over every module and parameter (about 10 ms at the 8B shape's
        # 2,600 modules, on the host while the GPU waits). They do not change within a train() call.
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        cached = getattr(self, "_parameter_count", None)
        if cached is None or cached[0] is not self.model:
            cached = self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * cached[1]

    def _build_accelerator_args(self, **kwargs):
        # transformers asks DDP to search for unused parameters after every forward unless the model is a plain
        # PreTrainedModel with checkpointing, so a PEFT model always pays that graph walk on the host. Every LoRA
        # adapter weight takes part in every forward, so when they are all that trains and the user set nothing,
        # DDP is told so, and two more per-step costs go: DDP copies each gradient into its all-reduce bucket (one
        # copy launch per adapter matrix; `gradient_as_bucket_view` makes the gradients views of the buckets), and
        # broadcasts the module buffers from rank 0 before every forward (a collective that makes the ranks wait
        # for each other at each forward). The broadcast stays when the model has persistent buffers (running
        # statistics and the like: state); the rotary tables of the supported families are not persistent, being
        # computed from the config.
        args = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_find_unused_parameters is None and _trains_only_lora(self.model):
            from accelerate.utils import DistributedDataParallelKwargs

            for handler in args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = False
                    handler.gradient_as_bucket_view = True
                    if self.args.ddp_broadcast_buffers is None and not _has_persistent_buffers(self.model):
                        handler.broadcast_buffers = False
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
        """TRL's entropy, mean_token_accuracy and num_tokens bookkeeping, with the same values. TRL gathers and reads
        them (``.item()``) between each micro-batch's forward and backward: four host-device synchronizations and,
        with several processes, four collectives that hold every rank at that point. In training, fastsft keeps the
        micro-batch's sums on the device and reads them all at the next :meth:`log`, in one gather per quantity."""
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local_tokens = inputs["position_ids"].size(1)  # an int: a tensor made from it now would synchronize
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            state = self.accelerator.gradient_state
            # what gather_for_metrics would keep of the gathered ranks at this micro-batch (the end of the data)
            keep = state.remainder if state.end_of_dataloader and state.remainder > 0 else None
            self._pending_token_stats.append((outputs.label_mask.sum(), outputs.entropy.detach().sum(),
                                              outputs.is_top1.sum(), local_tokens, keep))
            return
        self._resolve_token_stats()  # the eval entry reports the training tokens so far, as TRL's does
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _resolve_token_stats(self) -> None:
        """The deferred training micro-batches' metrics into ``self._metrics["train"]``, as TRL computes them per
        micro-batch: each quantity of all of them gathered at once, then per micro-batch the ranks' sum (cut as
        ``gather_for_metrics`` cuts at the end of the data), the ratios in the device's arithmetic, the tokens."""
        pending = self._pending_token_stats
        if not pending:
            return
        device = pending[0][0].device
        # gather_for_metrics' cut applies to a gather over several processes only (one process: nothing to cut)
        keeps = [keep if self.accelerator.num_processes > 1 else None for *_, keep in pending]
        sums = []
        for i in range(4):  # valid labels, entropy sum, top-1 hits, input tokens: each [ranks, micro-batches]
            values = [p[i] for p in pending]
            if all(isinstance(v, int) for v in values):  # padding-free token counts: one copy to the device
                local = torch.tensor(values, device=device)
            else:
                local = torch.stack([torch.as_tensor(v, device=device) for v in values])
            per_rank = self.accelerator.gather(local).reshape(-1, len(pending))
            if any(keeps):
                sums.append(torch.stack([per_rank[:keep, j].sum() for j, keep in enumerate(keeps)]))
            else:
                sums.append(per_rank.sum(0))
        valid, entropy, correct, tokens = sums
        has = valid > 0
        entropies = torch.where(has, entropy / valid, 0.0).tolist()
        accuracies = torch.where(has, correct / valid, 0.0).tolist()
        metrics = self._metrics["train"]
        metrics["entropy"].extend(entropies)
        metrics["mean_token_accuracy"].extend(accuracies)
        for n in tokens.tolist():
            self._total_train_tokens += n // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        pending.clear()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self._resolve_token_stats()
        super().log(logs, *args, **kwargs)


def _remove_trl_fused_head(causal_lm) -> None:
    """Delete TRL's fused-head forward if it is the instance's forward; any other instance forward (accelerate's
    wrappers, say) is kept, and fastsft's patch calls it as the original forward."""
    forward = causal_lm.__dict__.get("forward")
    qualname = getattr(getattr(forward, "__func__", None), "__qualname__", "")
    if qualname.endswith(_TRL_FUSED_FORWARD_QUALNAME):
        del causal_lm.forward


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
def _train_call_skipped_if_noop(model):
    """Within the block, the first ``model.train()`` returns at once when it would change nothing; any other
    call (``train(False)``, ``eval()``, a second call) runs as usual."""
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
