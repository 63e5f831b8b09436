"""PEFT LoRA layers seen by the fused LoRA ops: which layers the ops compute exactly as PEFT does
(:func:`lora_eligibility`), their ``(W, A, B)`` and scaling (:func:`lora_parts`, cached on the layer and made again
when PEFT's or the user's changes make it stale), and their forwards through ``fastsft.ops.lora``
(:func:`fused_lora_forward`, :func:`fused_lora_group_forward`). The ops know nothing of PEFT; this module does.
"""

from __future__ import annotations

import torch

from fastsft.ops.lora import Bnb4bitWeight, StepCasts, lora_linear, lora_projections

_HALF = (torch.float16, torch.bfloat16)

__all__ = ["fused_lora_forward", "fused_lora_group_forward", "lora_eligibility", "lora_parts"]


def _is_4bit(base) -> bool:
    return type(base).__name__ == "Linear4bit" and getattr(base.weight, "quant_state", None) is not None


def lora_eligibility(module) -> str | None:
    """None when ``module`` (a PEFT LoRA ``Linear``, or its bitsandbytes ``Linear4bit``) can run through
    :func:`~fastsft.ops.lora_linear` exactly as PEFT computes it; otherwise the reason it cannot."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return "peft is not installed"
    if not isinstance(module, LoraLayer) or type(module).__name__ not in ("Linear", "Linear4bit"):
        return f"{type(module).__name__} is not a PEFT LoRA Linear layer"
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return "adapters are merged into the base weight"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused path takes exactly one)"
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return f"adapter {name!r} is a LoRA variant (DoRA or other), not vanilla LoRA"
    dropout = module.lora_dropout[name]
    if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0)):
        return f"adapter {name!r} has dropout {getattr(dropout, 'p', dropout)}"
    if module.lora_B[name].bias is not None or getattr(module, "lora_bias", {}).get(name, False):
        return f"adapter {name!r} has a bias on lora_B"
    if getattr(module, "fan_in_fan_out", False):
        return "the base weight is stored [in, out] (fan_in_fan_out)"
    base = module.get_base_layer()
    if getattr(base, "bias", None) is not None:
        return "the base layer has a bias"
    if _is_4bit(base) and getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel (on the first CPU forward in
        # eval mode without grad, with AVX512-BF16); dequantize_4bit cannot read that layout
        return "the 4-bit weight is repacked for bitsandbytes' CPU kernel"
    if not _is_4bit(base):
        if not isinstance(base, torch.nn.Linear):
            return f"base layer {type(base).__name__} is not nn.Linear or a bitsandbytes Linear4bit"
        if not base.weight.is_floating_point():
            return f"base weight dtype {base.weight.dtype} is not floating (8-bit layers are not fused)"
        if base.weight.requires_grad:
            return "the base weight requires grad (not frozen)"
    return None


def _state_key(module) -> tuple:
    """What :func:`lora_eligibility` depends on that PEFT or a user can change between calls, read straight from
    the instance (PEFT's properties and ``nn.Module.__getattr__`` cost microseconds each, on every projection of
    every layer): adapters enabled, merged and active; the base layer and its weight object, that weight's
    ``requires_grad``, its quantization state (none before it is quantized) and whether bitsandbytes repacked it
    for its CPU kernel; the active adapter's A, B and dropout modules and the dropout's rate."""
    state = module.__dict__
    active = state.get("_active_adapter")
    active = (active,) if isinstance(active, str) else tuple(active or ())
    children = state["_modules"]
    base = children.get("base_layer")
    weight = base._parameters.get("weight") if base is not None else None
    quant_state = getattr(weight, "quant_state", None)
    per_adapter = []
    for name in active:
        dropout = children["lora_dropout"]._modules.get(name) if "lora_dropout" in children else None
        per_adapter.append((id(children["lora_A"]._modules.get(name)) if "lora_A" in children else None,
                            id(children["lora_B"]._modules.get(name)) if "lora_B" in children else None,
                            id(dropout), getattr(dropout, "p", None)))
    return (state.get("_disable_adapters"), tuple(state.get("merged_adapters", ())), active, id(base), id(weight),
            getattr(weight, "requires_grad", None), id(quant_state),
            bool(getattr(quant_state, "packing_format_for_cpu", False)), tuple(per_adapter))


_PLAN_ATTR = "_fastsft_lora_plan"


def _plan(module):
    """``[name, base, lora_A, lora_B, 4-bit weight or None]`` of an eligible layer, or None; cached on the module
    under the :func:`_state_key` it was made for, and made again when that key changes. A 4-bit base's
    :class:`~fastsft.ops.lora.Bnb4bitWeight` is made here, once: it reads the quantization state with a host sync."""
    key = _state_key(module)
    cached = module.__dict__.get(_PLAN_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = None
    if lora_eligibility(module) is None:
        name = [a for a in module.active_adapters if a in module.lora_A][0]
        base = module.get_base_layer()
        plan = [name, base, module.lora_A[name], module.lora_B[name],
                Bnb4bitWeight(base.weight) if _is_4bit(base) else None]
    module.__dict__[_PLAN_ATTR] = (key, plan)  # not a Module attribute: no state_dict entry, no __setattr__
    return plan


def lora_parts(module, dtype: torch.dtype, backend="auto"):
    """``((W, A, B), scaling)`` of an eligible PEFT LoRA layer for inputs of ``dtype``, or None with the layer
    not eligible or its dense base weight of another dtype. ``W`` is the base weight tensor or a
    :class:`~fastsft.ops.lora.Bnb4bitWeight` dequantizing NF4 for a LoRA call on ``backend``. ``A`` and ``B`` are
    the adapter's parameters themselves when they have ``dtype`` or are float32 with a float16/bfloat16 ``dtype``
    (the fused ops cast those inside and return float32 gradients); otherwise a differentiable cast to ``dtype``."""
    plan = _plan(module)
    if plan is None:
        return None
    name, base, lora_a, lora_b, quantized = plan
    if quantized is not None:
        weight = plan[4] = quantized.for_lora(backend)  # the same object while the backend is the same
    else:
        weight = base._parameters["weight"]
        if weight.dtype != dtype:
            return None
    a, b = lora_a._parameters["weight"], lora_b._parameters["weight"]
    return (weight, _adapter_for(a, dtype), _adapter_for(b, dtype)), float(module.scaling[name])


def _adapter_for(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype or (t.dtype == torch.float32 and dtype in _HALF):
        return t
    return t.to(dtype)


def fused_lora_forward(module, x: torch.Tensor, *, backend: str = "auto",
                       casts: StepCasts | None = None) -> torch.Tensor | None:
    """PEFT LoRA ``module``'s forward of ``x`` through :func:`~fastsft.ops.lora_linear`, or None when it is not
    eligible (see :func:`lora_eligibility`; also when ``x`` is not floating or the base weight has another dtype) so
    that the caller falls back to ``module(x)`` unchanged. Adapters' scaling (``alpha / r``, rsLoRA's
    ``alpha / sqrt(r)``) is read from ``module.scaling``. ``casts``: see :class:`~fastsft.ops.lora.StepCasts` (the
    patched model passes its own)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    parts = lora_parts(module, x.dtype, backend)
    if parts is None:
        return None
    (weight, a, b), scaling = parts
    return lora_linear(x, weight, a, b, scaling, backend=backend, casts=casts)


def fused_lora_group_forward(modules, x: torch.Tensor, *, backend: str = "auto",
                             casts: StepCasts | None = None) -> tuple | None:
    """PEFT LoRA layers ``modules`` that take one input (an attention module's q, k and v; an MLP's gate and up)
    applied to ``x`` as one op (``x`` read once for their adapters, one backward, dX accumulated in one buffer),
    or None when one of them is not eligible or their scalings or base dtypes differ: the caller then runs them
    one by one."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    parts = [lora_parts(m, x.dtype, backend) for m in modules]
    if any(p is None for p in parts) or len({scaling for _, scaling in parts}) != 1:
        return None
    return lora_projections(x, [p for p, _ in parts], parts[0][1], backend=backend, casts=casts)
