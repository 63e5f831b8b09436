"""Training callbacks that ``fastsft.SFTTrainer`` adds on its own.

:class:`ThroughputCallback` adds ``tokens_per_second`` and ``peak_memory_gb`` to every training log, so whatever
``report_to`` names (TensorBoard, Weights & Biases, ...) records them next to the loss and learning rate.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers import TrainerCallback

__all__ = ["ThroughputCallback", "peak_memory_gb"]


def peak_memory_gb() -> float:
    """Peak memory in GiB: the CUDA caching allocator's peak allocation on the current GPU, or the process's peak
    resident set size when training on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputCallback(TrainerCallback):
    """Adds to each training log (the ones with ``loss``):

    - ``tokens_per_second``: training tokens (TRL's ``num_tokens``, the non-padding tokens; otherwise
      ``num_input_tokens_seen``) since the previous log, over the wall time since then, on this process;
    - ``peak_memory_gb``: :func:`peak_memory_gb`, since training started (the CUDA peak is reset at train begin).

    It must run before the reporting callbacks (``fastsft.SFTTrainer`` puts it first): it writes into the logs
    dict they receive, and into the matching ``state.log_history`` entry.
    """

    def __init__(self):
        self._last_time = None
        self._last_tokens = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._last_time, self._last_tokens = time.perf_counter(), None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last_time is None:
            return
        now = time.perf_counter()
        tokens = logs.get("num_tokens")
        if tokens is None and state.num_input_tokens_seen:
            tokens = state.num_input_tokens_seen
        extra = {"peak_memory_gb": round(peak_memory_gb(), 4)}
        if tokens is not None:
            # TRL's num_tokens is a running total: the first log counts from zero
            seen = tokens - (self._last_tokens or 0)
            elapsed = now - self._last_time
            if elapsed > 0:
                extra["tokens_per_second"] = round(seen / elapsed, 2)
            self._last_tokens = tokens
        self._last_time = now
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(extra)
