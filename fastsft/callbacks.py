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


# what transformers adds to every training log when it counts input tokens: a rate and runtime since training began
_CUMULATIVE_SPEED = ("train_tokens_per_second", "train_runtime")


class ThroughputCallback(TrainerCallback):
    """Adds to each training log (the ones with ``loss``):

    - ``tokens_per_second``: training tokens (TRL's ``num_tokens``, the non-padding tokens; otherwise
      ``num_input_tokens_seen``) since the previous log, over the wall time since then, on this process;
    - ``peak_memory_gb``: :func:`peak_memory_gb`, since training started (the CUDA peak is reset at train begin).

    transformers' ``train_tokens_per_second`` and ``train_runtime`` (since the start of training, on every log when
    ``include_num_input_tokens_seen`` is set) are taken out of those logs, so one tokens/s shows per line; the
    final training summary keeps its own.

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
        entry = state.log_history[-1] if state.log_history else None
        ours = entry is not None and entry.get("step") == state.global_step and entry.get("loss") == logs["loss"]
        if ours:
            entry.update(extra)
        if "tokens_per_second" in extra:
            # transformers' own rate since the start of training (include_num_input_tokens_seen) would be a second,
            # different tokens/s on every line: the rate since the last log is the one shown
            for target in (logs, entry) if ours else (logs,):
                for key in _CUMULATIVE_SPEED:
                    target.pop(key, None)
