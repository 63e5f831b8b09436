"""Whether the code running now is being recorded into a graph that is replayed later without it.

Host-side caches that skip device work (the adapters' half-precision copies of :class:`fastsft.ops.lora.StepCasts`,
say) must not be used then: a replay would read a buffer that the cache later replaces, or skip a cast whose
source changed. And an error raised while capturing says what cannot be captured, not that a backend is broken.
``capturing(t)`` (``capturing_on(device)``) is True while a CUDA graph is being captured on the current stream, and inside
:func:`emulated` (the stand-in that :mod:`fastsft.captured_layers` uses on the CPU, in tests).

:func:`output_unread` marks a recomputation whose result is never read, only backpropagated through (a captured
layer's backward graph): a patched MLP ending such a layer then computes its gradients alone
(``fastsft.ops.lora_mlp(compute_output=False)``)."""

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


def host_caches_off(t: torch.Tensor) -> bool:
    """Whether a host-side cache must not serve or keep anything now: while capturing (see the module docstring)
    and in the eager run that warms a graph up before its capture (:func:`warming_up`): what that run would cache,
    the graph makes for itself, so a cached copy would only be kept, and refreshed at every step, for nothing."""
    return capturing(t) or bool(getattr(_state, "warmup", 0))


@contextlib.contextmanager
def warming_up():
    """Code run inside is the eager run before a graph's capture (see :func:`host_caches_off`). Unlike a capture,
    a backend that fails to compile or launch here may still fall back."""
    _state.warmup = getattr(_state, "warmup", 0) + 1
    try:
        yield
    finally:
        _state.warmup -= 1


@contextlib.contextmanager
def emulated():
    """Code run inside is treated as captured (see the module docstring)."""
    _state.emulated = getattr(_state, "emulated", 0) + 1
    try:
        yield
    finally:
        _state.emulated -= 1


class UnreadOutput:
    """What :func:`output_unread` yields: the MLP's row tile for its gradients (``tile_tokens``), and ``used``,
    which the MLP sets when it took the shortcut."""

    def __init__(self, tile_tokens: int):
        self.tile_tokens, self.used = tile_tokens, False


@contextlib.contextmanager
def output_unread(tile_tokens: int):
    """Inside: the decoder layer being run is recomputed for its gradients only, and its MLP's result feeds nothing
    but the layer's output (see the module docstring). Yields an :class:`UnreadOutput`."""
    marks = _state.__dict__.setdefault("unread", [])
    mark = UnreadOutput(tile_tokens)
    marks.append(mark)
    try:
        yield mark
    finally:
        marks.pop()


def unread_output() -> UnreadOutput | None:
    """The innermost :func:`output_unread` around the code running now, or None."""
    marks = getattr(_state, "unread", None)
    return marks[-1] if marks else None
