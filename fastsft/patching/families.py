"""Which model families fastsft can patch, and what each kernel needs to know about them.

One small declarative entry per ``config.model_type``. Adding a family that computes its logits as
``lm_head(hidden)`` (then an optional scale and soft-cap) is one line here plus a case in ``tests/test_patching.py``;
families whose head does anything else must not be listed, since the fused loss would silently differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How a causal-LM family turns its last hidden state into logits.

    ``softcap_attr``: config attribute holding the final logit soft-cap (Gemma 2/3), ``None`` when the family
    has none. ``logit_scale_attr``: config attribute of a logit multiplier applied before the soft-cap (Cohere),
    or of a divisor when ``logit_scale_divides`` (Granite's ``logits_scaling``). ``norm_offset``: 1 for Gemma's
    RMSNorm (``* (1 + w)``), 0 for the others (``* w``).
    """

    model_type: str
    softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    logit_scale_divides: bool = False
    norm_offset: float = 0.0

    def softcap(self, config) -> float | None:
        value = getattr(config, self.softcap_attr, None) if self.softcap_attr else None
        return float(value) if value else None  # None or 0 both mean "no soft-cap" in transformers

    def logit_scale(self, config) -> float | None:
        value = getattr(config, self.logit_scale_attr, None) if self.logit_scale_attr else None
        if value is None or value == 1:
            return None
        return 1.0 / value if self.logit_scale_divides else float(value)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2"),
    Family("qwen3"),
    Family("gemma", norm_offset=1.0),
    Family("gemma2", softcap_attr="final_logit_softcapping", norm_offset=1.0),
    Family("gemma3_text", softcap_attr="final_logit_softcapping", norm_offset=1.0),
    Family("cohere", logit_scale_attr="logit_scale"),
    Family("granite", logit_scale_attr="logits_scaling", logit_scale_divides=True),
)}
