"""``PatchReport``: what ``fastsft.patch`` did to a model, for logs and for tests."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PatchReport:
    """``patched``: kernel switch name -> backend chosen for ``device`` (the LM head's) at patch time, with what was
    patched (``auto`` re-picks per call, so a model moved to another device may run another backend). ``skipped``: switch name -> why it
    was left alone. ``supported``: False when the architecture is not in the family table (nothing was patched).
    """

    model_class: str
    model_type: str
    supported: bool
    device: str = "cpu"
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def any_patched(self) -> bool:
        return bool(self.patched)

    def __str__(self) -> str:
        head = f"fastsft patch report for {self.model_class} (model_type={self.model_type!r})"
        if not self.supported:
            return f"{head}: unsupported architecture, left unpatched"
        rows = [(name, "patched", f"backend {detail} on {self.device}" if " " not in detail else detail)
                for name, detail in self.patched.items()]
        rows += [(name, "skipped", reason) for name, reason in self.skipped.items()]
        width = max(len(name) for name, _, _ in rows)
        return "\n".join([head] + [f"  {name:<{width}}  {status:<7}  {detail}" for name, status, detail in rows])
