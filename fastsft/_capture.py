"""Whether the code running now is being recorded into a graph that is replayed later without it.

Host-side caches that skip device work (the adapters' half-precision copies of :class:`fastsft.ops.lora.StepCasts`,
say) must not be used then: a replay would read a buffer that the cache later replaces, or skip a cast whose
source changed. And an error raised while capturing says what cannot be captured, not that a backend is broken.
``capturing(t)`` (``capturing_on(device)``) is True while a CUDA graph is being captured on the current stream, and inside
:func:`emulated` (the stand-in that :mod:`fastsft.captured_layers` uses on the CPU, in tests)."""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def capturing(t: torch.Tensor) -> bool:
    return capturing_on(t.device)


def capturing_on(device: torch.device) -> bool:
    if getattr(_state, "emulated", 0):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def emulated():
    """Code run inside is treated as captured (see the module docstring)."""
    _state.emulated = getattr(_state, "emulated", 0) + 1
    try:
        yield
    finally:
        _state.emulated -= 1
