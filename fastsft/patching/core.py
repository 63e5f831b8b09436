"""``patch`` / ``unpatch``: install fastsft's kernels on one model instance, and take them off again.

Only the instance is changed (an instance attribute ``forward`` and the ``_fastsft_patch`` state, a config copy of
its own where the attention implementation changes), never the class, so other models of the same class (or of the
same config object) are untouched and ``unpatch`` restores the exact previous behaviour. What to undo is kept on the
model and its modules, so ``unpatch`` acts on the model it is given, a deep copy included. Nothing outside the
model's own modules changes: RoPE and the fused q/k/v LoRA run in a patched attention forward on each attention
module (:mod:`fastsft.patching.attention_forward`).
``train()``/``eval()``, gradient checkpointing (which wraps the decoder layers, not this forward) and
``save_pretrained`` (parameters only) do not see the patch.
"""

from __future__ import annotations

import types
import warnings

import torch

from fastsft import backends
from fastsft.ops.linear_cross_entropy import OP as LINEAR_CROSS_ENTROPY
from fastsft.patching import attention as attention_patch, modules, rope as rope_patch
from fastsft.patching.families import FAMILIES
from fastsft.patching.lm_head import STATE_ATTR, PatchState, make_forward
from fastsft.patching.plan import resolve_plan
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


MODULES_ATTR = "_fastsft_module_patches"  # instance attribute: modules.ModulePatches
PLAN_ATTR = "_fastsft_plan"  # instance attribute: the patch's plan.Plan, which refresh() reuses


def is_patched(model) -> bool:
    """Whether any fastsft kernel is installed on the model now."""
    causal_lm = causal_lm_of(model)
    record = causal_lm.__dict__.get(MODULES_ATTR)
    return STATE_ATTR in causal_lm.__dict__ or bool(record and record.patched)


def is_supported(model) -> bool:
    return causal_lm_of(model).config.model_type in FAMILIES


def patch(model, *, fused_cross_entropy: bool = True, attention: bool = True, rms_norm: bool = True,
          lora: bool = True, gated_activation: bool = True, rope: bool = True,
          backend: str = "auto") -> PatchReport:
    """Patch ``model`` (a transformers causal LM, plain or PEFT-wrapped) in place with every available kernel.

    Each keyword turns one kernel off when False. ``backend`` is passed to the ops (``"auto"``, ``"cuda"``,
    ``"triton"``, ``"reference"``); an explicit backend that cannot run on the model's device raises
    ``fastsft.backends.BackendUnavailable`` before anything is changed. Every op is resolved here, once, for the
    model's device (the plan, shown in the report); the patched model runs it. Patching a patched model re-patches
    it with the new switches. An architecture missing from ``fastsft.patching.families.FAMILIES`` is left
    unpatched with a warning. Returns a :class:`PatchReport`.

    LoRA layers are patched where they exist: patch after ``get_peft_model``, or call :func:`refresh` after
    wrapping (``fastsft.SFTTrainer`` does).
    """
    causal_lm = causal_lm_of(model)
    switches = {"fused_cross_entropy": fused_cross_entropy, "attention": attention, "rms_norm": rms_norm,
                "lora": lora, "gated_activation": gated_activation, "rope": rope}
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
    wanted = {}
    for name, on in switches.items():
        if not on:
            report.skipped[name] = "turned off"
        elif device.type == "meta":
            report.skipped[name] = "the model's weights are on the meta device"
        else:
            wanted[name] = None  # its backend, from the plan below
    if kept_auto := backends.lacking([_OPS[name] for name in wanted], backend):
        warnings.warn(f"fastsft: backend={backend!r} applies to the ops that have it; {', '.join(kept_auto)} "
                      f"{'has' if len(kept_auto) == 1 else 'have'} none and keep 'auto'", UserWarning, stacklevel=2)
    if "attention" in wanted and (reason := attention_patch.attention_unsupported(config)):
        wanted.pop("attention")
        report.skipped["attention"] = reason
    plan = resolve_plan(device, backend, asked=[_OPS[name] for name in wanted], attention="attention" in wanted,
                        head_dim=_head_dim(config), element_size=causal_lm.get_output_embeddings().weight.element_size())
    for name in wanted:
        wanted[name] = plan[_OPS[name]].backend
    report.plan = plan
    if ("gated_activation" in wanted or "lora" in wanted) and modules.activation_of(config) is None:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        report.skipped["gated_activation"] = f"activation {act!r} has no fastsft kernel"
        wanted.pop("gated_activation", None)

    unpatch(causal_lm)
    setattr(causal_lm, PLAN_ATTR, plan)
    if "fused_cross_entropy" in wanted:
        state = PatchState(family=family, backend=plan[LINEAR_CROSS_ENTROPY],
                           softcap=family.softcap(config), logit_scale=family.logit_scale(config),
                           previous_forward=None)
        state.installed_forward = types.MethodType(make_forward(type(causal_lm)), causal_lm)
        # under an accelerate hook (dispatch_model, offload) the hook's own forward stays in front
        state.slot, state.previous_forward = modules.install_forward(causal_lm, state.installed_forward)
        setattr(causal_lm, STATE_ATTR, state)
        report.patched["fused_cross_entropy"] = wanted["fused_cross_entropy"]
    _patch_modules(causal_lm, family, wanted, backend, plan, report)
    return report


_OPS = {"fused_cross_entropy": LINEAR_CROSS_ENTROPY, "rms_norm": "rms_norm", "lora": "lora",
        "gated_activation": "gated_activation", "rope": "rope",
        "attention": "flash_attention_varlen"}  # kernel switch -> the op it runs


def _head_dim(config) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim


def _patch_modules(causal_lm, family, wanted: dict, backend: str, plan, report: PatchReport) -> None:
    """Attention, RoPE, norms, LoRA layers and MLPs, as they are in the model now, running ``plan``; what to undo
    is recorded on the instance and its modules."""
    record = modules.ModulePatches(dict(wanted), backend)
    # Kept even with nothing patched yet: refresh() retries (LoRA layers appear when PEFT wraps the model).
    setattr(causal_lm, MODULES_ATTR, record)

    def apply(name, fn):
        try:
            detail = fn()
        except LookupError as exc:  # nothing of that kind in the model (e.g. no LoRA layers yet), or none it takes
            report.skipped[name] = str(exc)
            return
        record.patched.append(name)
        report.patched[name] = f"{wanted[name]}: {detail}" if name != "attention" else detail

    if "attention" in wanted:
        apply("attention", lambda: attention_patch.patch_attention(causal_lm, record, plan.attention))
    if "rope" in wanted:
        apply("rope", lambda: rope_patch.patch_rope(causal_lm, plan["rope"], record))
    if "rms_norm" in wanted:
        apply("rms_norm", lambda: modules.patch_rms_norms(causal_lm, family.norm_offset, plan["rms_norm"]))
    if "lora" in wanted:
        apply("lora", lambda: modules.patch_lora(causal_lm, plan, record))
    activation = modules.activation_of(causal_lm.config)
    fuse_lora = "lora" in report.patched and modules.has_lora_mlps(causal_lm)
    if activation and (fuse_lora or "gated_activation" in wanted):
        # the whole plan: an MLP runs lora_mlp and the gated activation, each on its own resolved backend
        try:
            detail = modules.patch_mlps(causal_lm, activation, fuse_lora=fuse_lora,
                                        gated="gated_activation" in wanted, backend=plan)
        except LookupError as exc:
            report.skipped.setdefault("gated_activation", str(exc))
        else:
            record.patched.append("mlp")
            if "gated_activation" in wanted:
                report.patched["gated_activation"] = f"{wanted['gated_activation']}: {detail}"
            else:
                report.patched["lora"] += f"; {detail}"


def refresh(model) -> PatchReport | None:
    """Re-apply the module patches of a patched model to its current modules (after PEFT added LoRA layers).
    Returns the new report, or None when the model is not patched."""
    causal_lm = causal_lm_of(model)
    record = causal_lm.__dict__.pop(MODULES_ATTR, None)
    if record is None:
        return None
    modules.undo_module_patches(causal_lm, record)
    wanted, backend = record.wanted, record.backend
    config = causal_lm.config
    plan = causal_lm.__dict__[PLAN_ATTR]
    report = PatchReport(type(causal_lm).__name__, config.model_type, supported=True,
                         device=str(causal_lm.get_output_embeddings().weight.device), plan=plan)
    if STATE_ATTR in causal_lm.__dict__:
        report.patched["fused_cross_entropy"] = wanted["fused_cross_entropy"]
    _patch_modules(causal_lm, FAMILIES[config.model_type], wanted, backend, plan, report)
    return report


def unpatch(model) -> bool:
    """Undo :func:`patch` on ``model``. Returns whether it was patched.

    A forward that someone installed on top of fastsft's after patching (TRL's fused LM head, for one) is
    removed too, with a warning: it wraps the patched forward and would call it after the state is gone.
    """
    causal_lm = causal_lm_of(model)
    record = causal_lm.__dict__.pop(MODULES_ATTR, None)
    causal_lm.__dict__.pop(PLAN_ATTR, None)
    had_modules = bool(record and record.patched)
    if record is not None:
        modules.undo_module_patches(causal_lm, record)
    state: PatchState | None = causal_lm.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return had_modules
    current = causal_lm.__dict__.get(state.slot)
    if not modules.uninstall_forward(causal_lm, state.slot, state.previous_forward, state.installed_forward):
        warnings.warn(f"fastsft.unpatch: {type(causal_lm).__name__}.forward was replaced after patching "
                      f"({getattr(current, '__qualname__', current)}); restoring the forward from before patching",
                      UserWarning, stacklevel=2)
    return True


def reclaim_forward(model) -> bool:
    """Put fastsft's patched forward back in place when another library replaced it after patching (without
    keeping the replacement around it). Returns whether anything changed. Used by ``fastsft.SFTTrainer`` after
    TRL installs its own fused LM head."""
    causal_lm = causal_lm_of(model)
    state: PatchState | None = causal_lm.__dict__.get(STATE_ATTR)
    if state is None or any(causal_lm.__dict__.get(slot) is state.installed_forward
                            for slot in (state.slot, modules.forward_slot(causal_lm))):
        return False
    setattr(causal_lm, state.slot, state.installed_forward)
    return True
