"""Two reads of the device that transformers' training loop makes after every micro-batch's backward, made without
waiting for the GPU.

Each read (``bool(tensor)``, ``.item()``) waits until every kernel queued so far has run, so the host cannot queue the
optimizer step while the backward still runs, and the GPU then idles while the host catches up. transformers makes
three per micro-batch: the NaN/inf test of the loss (``logging_nan_inf_filter``: ``isnan(loss) or isinf(loss)``, two
reads) and the token count (``include_num_input_tokens_seen``: ``.item()`` of the batch's count). Here the filter is
computed on the device with the same arithmetic, and the count is kept on the device until something reads it: at
each log, save and evaluation, and at the end of training.
"""

from __future__ import annotations

import copy

import torch
from transformers import TrainerCallback


class LossFilter:
    """transformers' ``logging_nan_inf_filter`` on the device: a micro-batch loss that is NaN or inf counts as the
    average of the losses since the last log, as transformers replaces it (``tr_loss / (1 + global_step -
    last logged step)``, added to ``tr_loss``). The trainer's own filter is then turned off (``args`` is the
    trainer's copy), so the loop adds the value returned here as it is."""

    def __init__(self, trainer):
        self.active = bool(trainer.args.logging_nan_inf_filter)
        if self.active:
            trainer.args = copy.copy(trainer.args)  # the caller's config object is left as it was
            trainer.args.logging_nan_inf_filter = False

    def __call__(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        if not self.active or not isinstance(loss, torch.Tensor):
            return loss
        total = getattr(trainer, "_tr_loss", None)
        if not isinstance(total, torch.Tensor) or total.device != loss.device:
            # a transformers release that keeps the running loss elsewhere: its own filter again, from this step on
            self.active, trainer.args.logging_nan_inf_filter = False, True
            return loss
        steps = 1 + trainer.state.global_step - trainer._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, total / steps)


class DeferredTokenCount:
    """``state.num_input_tokens_seen`` counted on the device and brought up to date when it is read: at each log
    (:meth:`resolve` from the trainer's ``log``), and by :class:`TokenCountCallback` before a save or evaluation
    and at the end of training. Between those, a callback reading ``state.num_input_tokens_seen`` sees the count
    of the last log. One process only: several processes sum their counts with a collective, as transformers
    does."""

    def __init__(self):
        self.pending = None

    def add(self, trainer, inputs) -> bool:
        """Count ``inputs`` as transformers would; False when transformers' own count must run instead."""
        args = trainer.args
        if args.include_num_input_tokens_seen == "no":
            return True
        if args.world_size > 1:
            return False
        main = getattr(trainer.model, "main_input_name", "input_ids")
        if main not in inputs:
            return False  # transformers warns about it
        if args.include_num_input_tokens_seen == "non_padding":
            pad = getattr(trainer.processing_class, "pad_token_id", None)
            if "attention_mask" in inputs:
                count = inputs["attention_mask"].sum()
            elif pad is not None:
                count = (inputs[main] != pad).sum()
            else:
                return False
        else:
            count = inputs[main].numel()
        self.pending = count if self.pending is None else self.pending + count
        return True

    def resolve(self, trainer) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            trainer.state.num_input_tokens_seen += int(pending)


class TokenCountCallback(TrainerCallback):
    """Brings the deferred count up to date where the state is read: before a step's save or evaluation (after
    transformers' flow callback has decided them) and at the end of training. It runs right after that flow
    callback, so callbacks after it see a current count on those steps."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer._token_count.resolve(self.trainer)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._token_count.resolve(self.trainer)
