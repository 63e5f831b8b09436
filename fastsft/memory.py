"""Where a training run's device memory goes: the peak, and what of it the model and the optimizer hold.

:func:`memory_breakdown` counts the tensors that live through the whole run, by what they are (frozen weights,
trainable adapters, their gradients, the optimizer's state), each storage once (tied embeddings, views), on the
model's device; with CUDA it adds the allocator's peaks since the last reset: the rest of the peak is what the
step itself held at its highest point (checkpointed layer inputs, the recomputed layer, the loss's chunks, CUDA
graph pools), and what the allocator had reserved beyond the peak is slack (fragmentation and cached blocks).
Nothing here synchronizes with the device beyond reading the allocator's counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["MemoryBreakdown", "memory_breakdown", "persistent_tensors"]

GIB = 1 << 30


@dataclass
class MemoryBreakdown:
    """Bytes by category on ``device``; ``peak_allocated``/``peak_reserved`` are None off CUDA."""

    device: torch.device
    weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    peak_allocated: int | None = None
    peak_reserved: int | None = None

    @property
    def persistent(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer_state

    @property
    def step(self) -> int | None:
        """What the step held at the peak beyond the persistent tensors (None off CUDA)."""
        return None if self.peak_allocated is None else max(self.peak_allocated - self.persistent, 0)

    @property
    def slack(self) -> int | None:
        if self.peak_allocated is None or self.peak_reserved is None:
            return None
        return max(self.peak_reserved - self.peak_allocated, 0)

    def as_dict(self) -> dict[str, float | None]:
        """GiB by name, for logs and JSON."""
        values = {"weights": self.weights, "adapters": self.adapters, "gradients": self.gradients,
                  "optimizer_state": self.optimizer_state, "step_at_peak": self.step,
                  "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                  "allocator_slack": self.slack}
        return {k: None if v is None else round(v / GIB, 3) for k, v in values.items()}

    def summary(self) -> str:
        def gib(v):
            return f"{v / GIB:.2f}"

        parts = [f"weights {gib(self.weights)}", f"adapters {gib(self.adapters)}",
                 f"gradients {gib(self.gradients)}", f"optimizer state {gib(self.optimizer_state)}"]
        if self.peak_allocated is None:
            return f"memory on {self.device} (GiB): " + ", ".join(parts)
        return (f"peak memory on {self.device}: {gib(self.peak_allocated)} GiB allocated, "
                f"{gib(self.peak_reserved)} GiB reserved; of the peak (GiB): " + ", ".join(parts)
                + f", the step's activations and workspaces {gib(self.step)}; allocator slack {gib(self.slack)}")


def persistent_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(category, tensor)`` for what lives through a run: ``"adapters"`` (trainable parameters, first: a storage
    shared with a frozen tensor counts as an adapter's), ``"weights"`` (frozen parameters and buffers),
    ``"gradients"``, ``"optimizer_state"``. Shared storages come once per tensor; the caller counts each once."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"memory_breakdown: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not hasattr(optimizer, "state"):
        raise TypeError(f"memory_breakdown: optimizer must be a torch optimizer (with .state), got "
                        f"{type(optimizer).__name__}")
    params = list(model.parameters())
    yield from (("adapters", p) for p in params if p.requires_grad)
    yield from (("weights", p) for p in params if not p.requires_grad)
    yield from (("weights", b) for b in model.buffers())
    yield from (("gradients", p.grad) for p in params if p.grad is not None)
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (("optimizer_state", v) for v in state.values() if isinstance(v, torch.Tensor))


def memory_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     device: torch.device | str | None = None) -> MemoryBreakdown:
    """The persistent tensors of ``model`` (and ``optimizer``) on ``device`` (default: the device of the model's
    first parameter), and on CUDA the allocator's peaks since ``torch.cuda.reset_peak_memory_stats``."""
    tensors = list(persistent_tensors(model, optimizer))  # its argument checks first
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    report = MemoryBreakdown(device)
    seen = set()

    for category, t in tensors:
        if t.device != device and not _same_cuda(t.device, device):
            continue
        key = t.untyped_storage().data_ptr(), t.device
        if key not in seen:
            seen.add(key)
            setattr(report, category, getattr(report, category) + t.untyped_storage().nbytes())
    if device.type == "cuda" and torch.cuda.is_available():
        report.peak_allocated = torch.cuda.max_memory_allocated(device)
        report.peak_reserved = torch.cuda.max_memory_reserved(device)
    return report


def _same_cuda(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when 0 is the current one
    if a.type != "cuda" or b.type != "cuda":
        return False
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
