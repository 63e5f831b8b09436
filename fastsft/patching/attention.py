"""The attention implementation patch: transformers' ``"fastsft"`` attention on a config of the model's own."""

from __future__ import annotations

import copy


def attention_unsupported(config) -> str | None:
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout={config.attention_dropout} (fastsft attention has no dropout)"
    return None


def patch_attention(causal_lm, record, plan) -> str:
    """Select transformers' attention implementation ``"fastsft"`` (registered on first use) on a copy of the
    model's config: models built from one config object share it, and the others stay as they are. Every
    attention module gets ``plan`` (a :class:`fastsft.transformers_attention.AttentionPlan`), which its calls
    run."""
    from fastsft import transformers_attention

    shared = causal_lm.config
    own = copy.deepcopy(shared)
    _use_config(causal_lm, shared, own)
    record.attention = (own._attn_implementation, shared, own)
    causal_lm.set_attn_implementation(transformers_attention.register())
    for module in causal_lm.modules():
        if module.__dict__.get("config") is own and hasattr(module, "head_dim"):  # the attention modules
            module.__dict__[transformers_attention.PLAN_ATTR] = plan
    return str(plan)


def _use_config(causal_lm, old, new) -> None:
    """Every module of the model that holds the config ``old`` (the model, its backbone, attention modules, ...)
    gets ``new``."""
    for module in causal_lm.modules():
        if module.__dict__.get("config") is old:
            module.config = new


def _same_config(a, b) -> bool:
    try:
        return a._attn_implementation == b._attn_implementation and a.to_dict() == b.to_dict()
    except Exception:  # a value that does not compare: keep the copy
        return False


def undo_attention(causal_lm, attention: tuple) -> None:
    """Undo :func:`patch_attention` given what it recorded (``ModulePatches.attention``)."""
    from fastsft.transformers_attention import PLAN_ATTR

    previous, shared, own = attention
    for module in causal_lm.modules():
        module.__dict__.pop(PLAN_ATTR, None)
    causal_lm.set_attn_implementation(previous)
    if causal_lm.config is own and _same_config(own, shared):
        _use_config(causal_lm, own, shared)  # nothing else changed in the copy: the model shares it again
