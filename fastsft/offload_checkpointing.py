"""Offloaded gradient checkpointing: non-reentrant checkpointing whose saved layer inputs wait in pinned CPU memory.

Plain checkpointing keeps one tensor per decoder layer on the GPU between forward and backward: the layer's input
hidden states (``batch x sequence x hidden``, 64 MiB per layer at 8B shapes and 8k tokens). Here that tensor is
copied to pinned host memory on a side CUDA stream during the forward (overlapping the layer's compute) and its
GPU memory is released as soon as the copy is done. Backward runs the layers in reverse: when layer ``i``'s input
comes back, the copy back of layer ``i-1``'s input starts on the side stream, so it overlaps layer ``i``'s
recompute and backward; the compute stream waits on an event before using it.

It is ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with a ``saved_tensors_hooks`` pair around it.
Checkpoint saves the region's positional tensor arguments through whatever hooks are active (everything inside
the region goes through checkpoint's own hooks), so exactly the layer inputs pass through ours: the recompute, RNG
handling, keyword arguments and gradients are torch's, and gradients are bit-identical to plain non-reentrant
checkpointing. transformers passes a decoder layer's hidden states positionally and everything else (position
embeddings, masks) in a closure, which stays on the device.

On the CPU there is nothing to offload: the tensor is kept as it is, but the same pack/prefetch/restore bookkeeping
runs, so CPU tests exercise it. ``transformers``' own ``gradient_checkpointing_enable(offload=True)`` copies
synchronously on the compute stream and fetches nothing ahead; this module replaces it when both are asked for.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["OffloadedCheckpoint", "enable_offloaded_checkpointing", "disable_offloaded_checkpointing",
           "offload_on_enable"]

# Tensors smaller than this stay where they are: below ~1 MiB a copy costs launch latency and frees next to nothing
# (a decoder layer's input is batch x tokens x hidden, 16 MiB for one 2k-token row at hidden 4096 in bf16).
DEFAULT_MIN_BYTES = 1 << 20
# Marks our wrappers of the models' checkpointing-enable methods (set on the wrapper function)
_WRAPPER_ATTR = "_fastsft_offloader"


class _Offloaded:
    """One saved layer input: its host copy, and (while prefetched) its device copy with the event that says the
    copy back is done. ``previous`` is the input saved just before this one, the next to be needed in backward."""

    def __init__(self, tensor: torch.Tensor, index: int, previous: weakref.ref | None, stream):
        self.index = index
        self.device = tensor.device
        self.previous = previous
        self._stream = stream
        self._device_copy = None
        self._ready = None
        if stream is None:  # a CPU tensor: it already lives in host memory
            self.host = tensor
            return
        compute = torch.cuda.current_stream(self.device)
        stream.wait_stream(compute)  # the input is written by kernels queued on the compute stream
        with torch.cuda.stream(stream):
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        # The caller drops its reference when the layer returns; this keeps the allocator from handing the memory
        # to anyone else before the side stream's copy has read it, without keeping the tensor alive in Python.
        tensor.record_stream(stream)

    def prefetch(self) -> None:
        """Start the copy back to the device on the side stream (no-op when it is already there)."""
        if self._device_copy is not None:
            return
        if self._stream is None:
            self._device_copy = self.host
            return
        compute = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, which frees it after use; the side stream waits for the compute work
        # queued so far, since that work may still read the memory this block last held.
        self._device_copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            self._device_copy.copy_(self.host, non_blocking=True)
            self._ready = self._stream.record_event()
        # should it be freed unused (its graph dropped before backward), not before the copy into it is done
        self._device_copy.record_stream(self._stream)

    def restore(self) -> torch.Tensor:
        """The tensor on its device, for the recompute; the device copy is then the caller's alone."""
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
        tensor, self._device_copy, self._ready = self._device_copy, None, None
        return tensor


class OffloadedCheckpoint:
    """A drop-in for ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)`` that offloads
    the saved floating-point positional tensors of at least ``min_bytes`` (default :data:`DEFAULT_MIN_BYTES`) to
    pinned CPU memory and prefetches them back in reverse order during backward. Smaller, non-floating or
    non-contiguous tensors stay where they are. ``stats`` counts offloaded, prefetched-ahead and restored tensors.

    One instance serves all layers of a model: it links each saved input to the one saved before it, which is
    what backward needs next."""

    def __init__(self, min_bytes: int | None = None):
        self.min_bytes = DEFAULT_MIN_BYTES if min_bytes is None else min_bytes
        self.stats = {"offloaded": 0, "prefetched": 0, "restored": 0}
        self._last: weakref.ref | None = None  # weak: an input's host copy lives only as long as the graph needs it
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, function, *args, use_reentrant: bool | None = None, **kwargs):
        if use_reentrant:
            raise ValueError("offloaded checkpointing is non-reentrant: use_reentrant=True is not supported")
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def _pack(self, tensor: torch.Tensor):
        if (not tensor.is_floating_point() or not tensor.is_contiguous()
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        stream = None
        if tensor.device.type == "cuda":
            stream = self._streams.get(tensor.device)
            if stream is None:
                stream = self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        item = _Offloaded(tensor, self.stats["offloaded"], self._last, stream)
        self._last = weakref.ref(item)
        self.stats["offloaded"] += 1
        return item

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        tensor = saved.restore()
        self.stats["restored"] += 1
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and previous._device_copy is None:
            previous.prefetch()
            self.stats["prefetched"] += 1
        return tensor


# transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`; the old name stays as
# a deprecated alias that calls the new one (through the instance, so a wrapper of the new name sees both calls).
_ENABLE_METHODS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def _enable_targets(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(object, method name) pairs to wrap: ``model`` and, for a PEFT model, the transformers model inside (a call of
    the deprecated name on the PEFT model reaches that model's own method), each under its current name."""
    objects = [model]
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if base is not model:
        objects.append(base)
    return [(obj, next(name for name in _ENABLE_METHODS if hasattr(obj, name))) for obj in objects
            if any(hasattr(obj, name) for name in _ENABLE_METHODS)]


def offload_on_enable(model: torch.nn.Module, *, min_bytes: int | None = None) -> OffloadedCheckpoint:
    """Make ``model``'s gradient checkpointing offloaded: layers checkpointing now switch, and every later
    ``model.gradient_checkpointing_enable(...)`` or ``activation_checkpointing_enable(...)`` (a ``Trainer``'s in
    ``train()``, say) installs offloading right after transformers' own setup. Calling it again replaces the
    previous offloader. Returns the offloader."""
    offloader = OffloadedCheckpoint(min_bytes)
    for obj, name in _enable_targets(model):
        _wrap_enable(obj, name, offloader)
    _install(model, offloader)
    return offloader


def _wrap_enable(obj: torch.nn.Module, name: str, offloader: OffloadedCheckpoint) -> None:
    original = getattr(obj, name)
    original = getattr(original, "_fastsft_original", original)

    def enable(*args, **kwargs):
        result = original(*args, **kwargs)
        _install(obj, offloader)
        return result

    setattr(enable, _WRAPPER_ATTR, offloader)
    enable._fastsft_original = original
    setattr(obj, name, enable)


def enable_offloaded_checkpointing(model: torch.nn.Module, gradient_checkpointing_kwargs: dict | None = None, *,
                                   min_bytes: int | None = None) -> OffloadedCheckpoint:
    """Turn on gradient checkpointing with offloaded layer inputs on a transformers model (or a PEFT model wrapping
    one); it stays offloaded through later ``gradient_checkpointing_enable`` calls until
    :func:`disable_offloaded_checkpointing`. ``gradient_checkpointing_kwargs`` go to transformers as usual
    (``use_reentrant=True`` is refused). Returns the offloader (its ``stats`` count the tensors moved)."""
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    _check_non_reentrant(kwargs)
    offloader = offload_on_enable(model, min_bytes=min_bytes)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return offloader


def disable_offloaded_checkpointing(model: torch.nn.Module) -> None:
    """Back to plain non-reentrant checkpointing (still on if it was on) and ``model``'s own
    ``gradient_checkpointing_enable``."""
    # the wrapped model inside first: a PEFT model's attribute lookup falls through to it
    objects = [obj for obj, _ in _enable_targets(model) if obj is not model] + [model]
    for obj in objects:
        for name in _ENABLE_METHODS:
            wrapper = obj.__dict__.get(name)
            if wrapper is not None and hasattr(wrapper, _WRAPPER_ATTR):
                delattr(obj, name)
                if getattr(obj, name) != wrapper._fastsft_original:  # it wrapped an instance attribute
                    setattr(obj, name, wrapper._fastsft_original)
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, functools.partial) and isinstance(func.func, OffloadedCheckpoint):
            module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, **func.keywords)


def _install(model: torch.nn.Module, offloader: OffloadedCheckpoint) -> None:
    """Put ``offloader`` in place of the checkpointing function transformers set on each layer, keeping the
    keyword arguments it was given (``context_fn``, ``preserve_rng_state``, ...)."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is None:
            continue
        # fastsft's captured layers wrap the function transformers set, keeping it as `inner`: offload that one
        wrapper = func if isinstance(getattr(func, "inner", None), functools.partial) else None
        if wrapper is not None:
            func = wrapper.inner
        if not isinstance(func, functools.partial):
            raise TypeError(f"offloaded checkpointing: {type(module).__name__} checkpoints with {func!r}, not "
                            f"transformers' functools.partial(checkpoint, ...); cannot offload it")
        keywords = dict(func.keywords)
        _check_non_reentrant(keywords)
        keywords.pop("use_reentrant", None)
        offloaded = functools.partial(offloader, **keywords)
        if wrapper is not None:
            wrapper.inner = offloaded
        else:
            module._gradient_checkpointing_func = offloaded


def _check_non_reentrant(kwargs: dict) -> None:
    if kwargs.get("use_reentrant"):
        raise ValueError("offloaded gradient checkpointing needs non-reentrant checkpointing: drop use_reentrant=True "
                         "from gradient_checkpointing_kwargs (PEFT with DeepSpeed ZeRO-3 forces it; offloading is "
                         "not available there)")
