"""The plan of a patched model: every op resolved once, when the model is patched, for the model's device.

:func:`resolve_plan` asks :func:`fastsft.backends.resolve` for each op (the backend that runs, its fallbacks in
``auto``, the launch configuration) and :func:`fastsft.transformers_attention.resolve` for the attention; the
patched modules keep the plan and pass it to the ops as their ``backend``, so a step runs the resolved functions
without selecting anything again. ``str(plan)`` (part of the ``PatchReport``) says what runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastsft import backends, ops as _ops  # noqa: F401 (the ops register their backends on import)

OPS = ("linear_cross_entropy", "flash_attention_varlen", "rms_norm", "rope", "gated_activation", "lora",
       "dequantize_nf4")


class Plan(Mapping):
    """Op name -> :class:`fastsft.backends.Resolved` for one device, and ``attention``: the attention plan (None
    when attention is not patched). A mapping, so that it can be passed as any op's ``backend``."""

    def __init__(self, device: torch.device, resolved: dict, attention=None, head_dim: int | None = None,
                 element_size: int = 2):
        self.device, self._resolved, self.attention = device, dict(resolved), attention
        self.head_dim, self.element_size = head_dim, element_size

    def __getitem__(self, op: str):
        return self._resolved[op]

    def __iter__(self):
        return iter(self._resolved)

    def __len__(self) -> int:
        return len(self._resolved)

    def lines(self) -> list[str]:
        rows = []
        for op, resolved in self._resolved.items():
            how = "asked for" if resolved.explicit else "auto: " + " > ".join(resolved.candidates)
            rows.append(f"{op}: {resolved.backend} ({how})")
        if self.attention is not None:
            rows.append(f"attention: {self.attention}")
            kernel = self.attention.kernel
            if kernel.backend == "triton" and kernel.launch is not None and self.head_dim and self.device.type == "cuda":
                rows.append(f"attention kernels (head dim {self.head_dim}): "
                            f"{kernel.launch.describe(self.head_dim, self.element_size)}")
        return rows

    def __str__(self) -> str:
        return "\n".join([f"plan on {self.device}:"] + [f"  {row}" for row in self.lines()])


def resolve_plan(device: torch.device, backend: str = "auto", *, asked=OPS, attention: bool = False,
                 head_dim: int | None = None, element_size: int = 2) -> Plan:
    """Resolve every op for ``device``. The ops in ``asked`` take ``backend`` as ``fastsft.patch`` applies it (an
    explicit backend where the op has it, raising if it cannot run; ``auto`` where the op has none); the others
    resolve ``auto`` (they run only inside another op's fallback, e.g. the gated activation of an MLP)."""
    resolved = {op: backends.resolve(op, backends.for_model(op, backend) if op in asked else "auto", device)
                for op in OPS}
    attention_plan = None
    if attention:
        from fastsft import transformers_attention

        attention_plan = transformers_attention.resolve(device, backend)
    return Plan(device, resolved, attention_plan, head_dim, element_size)
