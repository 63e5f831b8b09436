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

import logging

import torch
import trl
from trl import SFTConfig

from fastsft import patching

__all__ = ["SFTConfig", "SFTTrainer"]

logger = logging.getLogger(__name__)

# The function TRL's `add_fused_lm_head` installs as `model.forward` (checked so we only ever remove TRL's own)
_TRL_FUSED_FORWARD_QUALNAME = "add_fused_lm_head.<locals>._fused_forward"


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` that patches the model with :func:`fastsft.patch` (a model object, a PEFT model, or a
    path/hub id that TRL loads). ``patch``: ``True`` (default switches), ``False`` (plain TRL), or a dict of
    :func:`fastsft.patch` keyword arguments. The report is ``trainer.patch_report`` (None when not patched)."""

    def __init__(self, model, *args, patch: bool | dict = True, **kwargs):
        if not isinstance(patch, (bool, dict)):
            raise TypeError(f"SFTTrainer(patch=...) takes a bool or a dict of fastsft.patch options, got "
                            f"{type(patch).__name__}")
        switches = patch if isinstance(patch, dict) else {}
        self.patch_report: patching.PatchReport | None = None
        # A model object is patched before TRL sees it (so a bad backend fails before any work); TRL then wraps
        # the patched forward with its head, which is dropped again below.
        if patch is not False and not isinstance(model, str) and patching.is_supported(model):
            self.patch_report = patching.patch(model, **switches)
        super().__init__(model, *args, **kwargs)
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
        """TRL's entropy, mean_token_accuracy and num_tokens bookkeeping, verbatim in effect."""
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            # Padding-free batches carry position_ids instead of an attention mask
            if "attention_mask" in inputs:
                num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local_num_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                num_tokens_in_batch = self.accelerator.gather_for_metrics(local_num_tokens).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _remove_trl_fused_head(causal_lm) -> None:
    """Delete TRL's fused-head forward if it is the instance's forward; any other instance forward (accelerate's
    wrappers, say) is kept, and fastsft's patch calls it as the original forward."""
    forward = causal_lm.__dict__.get("forward")
    qualname = getattr(getattr(forward, "__func__", None), "__qualname__", "")
    if qualname.endswith(_TRL_FUSED_FORWARD_QUALNAME):
        del causal_lm.forward
