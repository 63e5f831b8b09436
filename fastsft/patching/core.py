"""``patch`` / ``unpatch``: install fastsft's kernels on one model instance, and take them off again.

Only the instance is changed (an instance attribute ``forward`` and the ``_fastsft_patch`` state), never the
class, so other models of the same class are untouched and ``unpatch`` restores the exact previous behaviour.
``train()``/``eval()``, gradient checkpointing (which wraps the decoder layers, not this forward) and
``save_pretrained`` (parameters only) do not see the patch.
"""

from __future__ import annotations

import types
import warnings

import torch

from fastsft import backends
from fastsft.ops.linear_cross_entropy import OP as LINEAR_CROSS_ENTROPY
from fastsft.patching.families import FAMILIES, KERNELS
from fastsft.patching.lm_head import STATE_ATTR, PatchState, make_forward
from fastsft.patching.report import PatchReport


def causal_lm_of(model) -> torch.nn.Module:
    """The transformers causal LM inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if _is_peft_model(model) else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"fastsft.patch expects a transformers PreTrainedModel (or a PEFT model wrapping one), got "
                        f"{type(model).__name__}")
    if inner.get_output_embeddings() is None or not hasattr(inner, "base_model"):
        raise TypeError(f"fastsft.patch expects a causal LM with an output embedding (lm_head); "
                        f"{type(inner).__name__} has none")
    return inner


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_patched(model) -> bool:
    return STATE_ATTR in causal_lm_of(model).__dict__


def is_supported(model) -> bool:
    return causal_lm_of(model).config.model_type in FAMILIES


def patch(model, *, fused_cross_entropy: bool = True, attention: bool = True, rms_norm: bool = True,
          rope: bool = True, lora: bool = True, backend: str = "auto") -> PatchReport:
    """Patch ``model`` (a transformers causal LM, plain or PEFT-wrapped) in place with every available kernel.

    Each keyword turns one kernel off when False. ``backend`` is passed to the ops (``"auto"``, ``"cuda"``,
    ``"triton"``, ``"reference"``); an explicit backend that cannot run on the model's device raises
    ``fastsft.backends.BackendUnavailable`` before anything is changed. Patching a patched model re-patches it
    with the new switches. An architecture missing from ``fastsft.patching.families.FAMILIES`` is left
    unpatched with a warning. Returns a :class:`PatchReport`.
    """
    causal_lm = causal_lm_of(model)
    switches = {"fused_cross_entropy": fused_cross_entropy, "attention": attention, "rms_norm": rms_norm,
                "rope": rope, "lora": lora}
    assert switches.keys() == KERNELS.keys(), "patch() switches and families.KERNELS must list the same kernels"
    config = causal_lm.config
    device = causal_lm.get_output_embeddings().weight.device
    report = PatchReport(type(causal_lm).__name__, config.model_type, supported=config.model_type in FAMILIES,
                         device=str(device))
    if not report.supported:
        warnings.warn(f"fastsft: {type(causal_lm).__name__} (model_type={config.model_type!r}) is not a supported "
                      f"architecture (supported: {', '.join(FAMILIES)}); the model is left unpatched",
                      UserWarning, stacklevel=2)
        return report
    family = FAMILIES[config.model_type]

    # Decide everything first (this is where a bad backend raises), then change the model in one step.
    for name, wanted in switches.items():
        if not wanted:
            report.skipped[name] = "turned off"
        elif KERNELS[name] is not None:
            report.skipped[name] = KERNELS[name]
        elif device.type == "meta":
            report.skipped[name] = "the model's weights are on the meta device"
        else:
            report.patched[name] = backends.chosen(LINEAR_CROSS_ENTROPY, device, backend)

    unpatch(causal_lm)
    if "fused_cross_entropy" in report.patched:
        state = PatchState(family=family, backend=backend, softcap=family.softcap(config),
                           logit_scale=family.logit_scale(config),
                           previous_forward=causal_lm.__dict__.get("forward"))
        state.installed_forward = types.MethodType(make_forward(type(causal_lm)), causal_lm)
        setattr(causal_lm, STATE_ATTR, state)
        causal_lm.forward = state.installed_forward
    return report


def unpatch(model) -> bool:
    """Undo :func:`patch` on ``model``. Returns whether it was patched.

    A forward that someone installed on top of fastsft's after patching (TRL's fused LM head, for one) is
    removed too, with a warning: it wraps the patched forward and would call it after the state is gone.
    """
    causal_lm = causal_lm_of(model)
    state: PatchState | None = causal_lm.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return False
    current = causal_lm.__dict__.get("forward")
    if current is not None and current != state.installed_forward:
        warnings.warn(f"fastsft.unpatch: {type(causal_lm).__name__}.forward was replaced after patching "
                      f"({getattr(current, '__qualname__', current)}); restoring the forward from before patching",
                      UserWarning, stacklevel=2)
    if state.previous_forward is None:
        causal_lm.__dict__.pop("forward", None)
    else:
        causal_lm.forward = state.previous_forward
    return True


def reclaim_forward(model) -> bool:
    """Put fastsft's patched forward back in place when another library replaced it after patching (without
    keeping the replacement around it). Returns whether anything changed. Used by ``fastsft.SFTTrainer`` after
    TRL installs its own fused LM head."""
    causal_lm = causal_lm_of(model)
    state: PatchState | None = causal_lm.__dict__.get(STATE_ATTR)
    if state is None or causal_lm.__dict__.get("forward") == state.installed_forward:
        return False
    causal_lm.forward = state.installed_forward
    return True
