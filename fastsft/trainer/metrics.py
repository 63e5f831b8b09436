"""TRL's per-token training metrics (entropy, mean_token_accuracy, num_tokens) without a host-device
synchronization per micro-batch."""

from __future__ import annotations

import torch


class TokenMetrics:
    """TRL's entropy, mean_token_accuracy and num_tokens bookkeeping, with the same values. TRL gathers and reads
    them (``.item()``) between each micro-batch's forward and backward: four host-device synchronizations and,
    with several processes, four collectives that hold every rank at that point. In training, the micro-batch's
    sums stay on the device (:attr:`pending`) and are all read at the next log (:meth:`resolve`), in one gather
    per quantity.

    ``trainer`` is the ``trl.SFTTrainer`` whose ``accelerator``, ``_metrics``, ``_total_train_tokens`` and
    ``_tp_size`` TRL's own bookkeeping uses; the values go where TRL puts them.
    """

    def __init__(self):
        self.pending: list = []  # per training micro-batch: (valid labels, entropy sum, top-1 hits, tokens, cut)

    def record(self, trainer, mode: str, inputs: dict, outputs) -> None:
        """One forward's metrics: kept on the device in training, logged at once (as TRL does) in evaluation."""
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local_tokens = inputs["position_ids"].size(1)  # an int: a tensor made from it now would synchronize
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            state = trainer.accelerator.gradient_state
            # what gather_for_metrics would keep of the gathered ranks at this micro-batch (the end of the data)
            keep = state.remainder if state.end_of_dataloader and state.remainder > 0 else None
            self.pending.append((outputs.label_mask.sum(), outputs.entropy.detach().sum(),
                                 outputs.is_top1.sum(), local_tokens, keep))
            return
        self.resolve(trainer)  # the eval entry reports the training tokens so far, as TRL's does
        accelerator = trainer.accelerator
        num_valid = accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        metrics = trainer._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        metrics["num_tokens"] = [trainer._total_train_tokens]

    def resolve(self, trainer) -> None:
        """The pending training micro-batches' metrics into ``trainer._metrics["train"]``, as TRL computes them per
        micro-batch: each quantity of all of them gathered at once, then per micro-batch the ranks' sum (cut as
        ``gather_for_metrics`` cuts at the end of the data), the ratios in the device's arithmetic, the tokens."""
        pending = self.pending
        if not pending:
            return
        accelerator = trainer.accelerator
        device = pending[0][0].device
        # gather_for_metrics' cut applies to a gather over several processes only (one process: nothing to cut)
        keeps = [keep if accelerator.num_processes > 1 else None for *_, keep in pending]
        sums = []
        for i in range(4):  # valid labels, entropy sum, top-1 hits, input tokens: each [ranks, micro-batches]
            values = [p[i] for p in pending]
            if all(isinstance(v, int) for v in values):  # padding-free token counts: host numbers
                # on one process they stay on the host (a copy to the device and back would wait for the GPU)
                local = torch.tensor(values, device=device if accelerator.num_processes > 1 else "cpu")
            else:
                local = torch.stack([torch.as_tensor(v, device=device) for v in values])
            per_rank = accelerator.gather(local).reshape(-1, len(pending))
            if any(keeps):
                sums.append(torch.stack([per_rank[:keep, j].sum() for j, keep in enumerate(keeps)]))
            else:
                sums.append(per_rank.sum(0))
        valid, entropy, correct, tokens = sums
        has = valid > 0
        # one read of the device for both (each read waits for the GPU)
        entropies, accuracies = torch.stack([torch.where(has, entropy / valid, 0.0),
                                             torch.where(has, correct / valid, 0.0)]).tolist()
        metrics = trainer._metrics["train"]
        metrics["entropy"].extend(entropies)
        metrics["mean_token_accuracy"].extend(accuracies)
        for n in tokens.tolist():
            trainer._total_train_tokens += n // trainer._tp_size
        metrics["num_tokens"] = [trainer._total_train_tokens]
        pending.clear()
