"""``PatchReport``: what ``fastsft.patch`` did to a model, for logs and for tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PatchReport:
    """``patched``: kernel switch name -> the backend it runs on ``device`` (the LM head's), with what was patched.
    ``skipped``: switch name -> why it was left alone. ``supported``: False when the architecture is not in the
    family table (nothing was patched). ``plan``: what the patched model runs (:class:`fastsft.patching.plan.Plan`:
    every op's backend and fallbacks, the attention backends per case, the attention kernels' launch
    configuration); a model moved to another device type resolves the same requests there on first use.
    """

    model_class: str
    model_type: str
    supported: bool
    device: str = "cpu"
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    plan: Any = None

    def __str__(self) -> str:
        head = f"fastsft patch report for {self.model_class} (model_type={self.model_type!r})"
        if not self.supported:
            return f"{head}: unsupported architecture, left unpatched"
        rows = [(name, "patched", f"backend {detail} on {self.device}" if " " not in detail else detail)
                for name, detail in self.patched.items()]
        rows += [(name, "skipped", reason) for name, reason in self.skipped.items()]
        width = max((len(name) for name, _, _ in rows), default=0)
        lines = [head] + [f"  {name:<{width}}  {status:<7}  {detail}" for name, status, detail in rows]
        if self.plan is not None:
            lines += [str(self.plan)]
        return "\n".join(lines)
