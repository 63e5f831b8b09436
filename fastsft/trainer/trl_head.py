"""fastsft's patched forward in place of the fused LM head that TRL installs.

TRL 1.16 installs its own fused LM head (a chunked log-prob kernel) as the causal LM's instance ``forward`` in
``SFTTrainer.__init__``. Left there, it would stack with fastsft's fused head, so after TRL's ``__init__``:

- a model TRL loaded from a path or hub id: TRL's forward is deleted and the model patched now (PEFT has wrapped
  it already);
- a model object, patched before TRL saw it: TRL's forward replaced fastsft's, which is put back
  (:func:`fastsft.patching.reclaim_forward`); TRL wrapped the model with PEFT after the patch, so the LoRA layers
  exist only now and the module patches are applied to them (:func:`fastsft.patching.refresh`).

fastsft's patched forward speaks TRL's ``fused_lm_head=True`` protocol, so every TRL loss path still works on it.
"""

from __future__ import annotations

import logging

from fastsft import patching

logger = logging.getLogger(__name__)

# The function TRL's `add_fused_lm_head` installs as `model.forward` (checked so only TRL's own is ever removed)
_TRL_FUSED_FORWARD_QUALNAME = "add_fused_lm_head.<locals>._fused_forward"


def install_after_trl(causal_lm, report: patching.PatchReport | None, switches: dict) -> patching.PatchReport:
    """Put fastsft's patched forward and module patches on ``causal_lm`` after ``trl.SFTTrainer.__init__``.
    ``report``: that of the patch made before TRL saw the model, or None (TRL loaded it). ``switches``: the
    :func:`fastsft.patch` keyword arguments. Returns the model's report now (logged at INFO when patched); an
    architecture fastsft does not support keeps TRL's head (:func:`fastsft.patch` warns)."""
    if report is None:
        if not patching.is_supported(causal_lm):
            return patching.patch(causal_lm, **switches)  # warns; TRL's fused head stays
        _remove_trl_fused_head(causal_lm)
        report = patching.patch(causal_lm, **switches)
    else:
        patching.reclaim_forward(causal_lm)
        report = patching.refresh(causal_lm) or report
    logger.info("%s", report)
    return report


def _remove_trl_fused_head(causal_lm) -> None:
    """Delete TRL's fused-head forward if it is the instance's forward; any other instance forward (accelerate's
    wrappers, say) is kept, and fastsft's patch calls it as the original forward."""
    forward = causal_lm.__dict__.get("forward")
    qualname = getattr(getattr(forward, "__func__", None), "__qualname__", "")
    if qualname.endswith(_TRL_FUSED_FORWARD_QUALNAME):
        del causal_lm.forward
