"""Module-level patches: attention implementation, RMSNorm forwards, fused LoRA projections and MLPs.

Each patch changes instances only (an instance ``forward``, or the model's attention implementation through
transformers' ``set_attn_implementation``) and returns an undo. They are re-applied after PEFT wraps a model
(``fastsft.patching.refresh``), since the LoRA layers exist only then. A patched forward that meets an input it
does not handle (another dtype, extra arguments, an adapter that became ineligible after ``merge_adapter``)
runs the module's own forward for that call: never a wrong number.
"""

from __future__ import annotations

import os
import types
from typing import Callable

import torch

Undo = Callable[[], None]

# transformers' activation names -> fastsft's gated MLP activation
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
               "gelu_new": "geglu_tanh", "gelu_fast": "geglu_tanh"}


def _set_forward(module: torch.nn.Module, forward) -> Undo:
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)

    def undo():
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous

    return undo


# --- attention ------------------------------------------------------------------------------------------------

def attention_unsupported(config) -> str | None:
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout={config.attention_dropout} (fastsft attention has no dropout)"
    return None


def patch_attention(causal_lm) -> tuple[str, Undo]:
    """Select transformers' attention implementation ``"fastsft"`` (registered on first use)."""
    from fastsft import transformers_attention

    config = causal_lm.config
    previous = config._attn_implementation
    causal_lm.set_attn_implementation(transformers_attention.register())
    device = next(causal_lm.parameters()).device
    orders = {case: transformers_attention.provider_order(case, device) for case in ("packed", "dense")}
    detail = "providers: " + "; ".join(f"{case} {' > '.join(order)}" for case, order in orders.items())
    return detail, lambda: causal_lm.set_attn_implementation(previous)


# --- RMSNorm --------------------------------------------------------------------------------------------------

def _norm_eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def rms_norm_modules(causal_lm) -> list[torch.nn.Module]:
    """The model's RMSNorm modules (decoder norms, final norm, Qwen3/Gemma 3 q/k norms)."""
    return [m for m in causal_lm.modules() if type(m).__name__.endswith("RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and _norm_eps(m) is not None]


def patch_rms_norms(causal_lm, offset: float, backend: str) -> tuple[str, Undo]:
    from fastsft.ops import rms_norm

    def forward(self, x):
        if x.dtype != self.weight.dtype or x.shape[-1] != self.weight.shape[0]:
            return type(self).forward(self, x)
        return rms_norm(x, self.weight, self._fastsft_eps, offset=offset, backend=backend)

    undos = []
    modules = rms_norm_modules(causal_lm)
    if not modules:
        raise LookupError("no RMSNorm modules in the model (it normalizes another way)")
    for module in modules:
        module._fastsft_eps = _norm_eps(module)
        undos.append(_set_forward(module, forward))
    return f"{len(modules)} modules, offset {offset:g}", _chain(undos)


# --- LoRA projections and gated MLPs ---------------------------------------------------------------------------

def _is_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "base_layer")


def _is_4bit(module) -> bool:
    return type(getattr(module, "base_layer", None)).__name__ == "Linear4bit"


# LoRA on a bitsandbytes 4-bit base (QLoRA) dequantizes the weight in the fused forward and again in backward
# (fastsft.ops.lora.Bnb4bitWeight); validated against PEFT on NF4 weights on an H200 (tests/test_lora.py, gpu).
# FASTSFT_LORA_4BIT=0 leaves those layers to PEFT; read when the model is patched (and again by refresh()).
LORA_4BIT_ENV = "FASTSFT_LORA_4BIT"
LORA_4BIT_OFF = f"4-bit base, switched off by {LORA_4BIT_ENV}=0"


def lora_4bit_enabled() -> bool:
    """Whether LoRA layers on a 4-bit base are fused (yes unless ``FASTSFT_LORA_4BIT`` is ``"0"``)."""
    return os.environ.get(LORA_4BIT_ENV, "1") != "0"


def patch_lora(causal_lm, backend: str) -> tuple[str, Undo]:
    """Route eligible PEFT LoRA ``Linear`` layers through ``fastsft.ops.lora_linear``; ``Linear4bit`` ones too unless
    ``FASTSFT_LORA_4BIT=0`` (see :func:`lora_4bit_enabled`)."""
    from fastsft.ops import lora_eligibility
    from fastsft.ops.lora import fused_lora_forward, fused_lora_group_forward

    casts = adapter_casts(causal_lm)
    groups = _sibling_groups(causal_lm)  # first layer -> the layers of its group: (q, k, v), (gate, up)

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs:
            # a later layer of a group: computed with the group's first layer on this very input
            stash = self.__dict__.pop(_GROUP_STASH, None)
            if stash is not None and stash[0] is x:
                return stash[1]
            group = groups.get(self)
            if group is not None:
                if any(_GROUP_STASH in m.__dict__ for m in group[1:]):
                    # an output left unclaimed since the last call: this model calls the group's layers in
                    # another order or on other inputs; stop fusing this group (and hold nothing more)
                    for m in group[1:]:
                        m.__dict__.pop(_GROUP_STASH, None)
                    del groups[self]
                else:
                    outs = fused_lora_group_forward(group, x, backend=backend, casts=casts)
                    if outs is not None:
                        for module, out in zip(group[1:], outs[1:]):
                            module.__dict__[_GROUP_STASH] = (x, out)
                        return outs[0]
            out = fused_lora_forward(self, x, backend=backend, casts=casts)  # None: no longer eligible
            if out is not None:
                return out
        return type(self).forward(self, x, *args, **kwargs)

    fuse_4bit = lora_4bit_enabled()
    undos, eligible, eligible_4bit, reasons, fused = [], 0, 0, {}, set()
    for module in causal_lm.modules():
        if not _is_lora_linear(module):
            continue
        reason = LORA_4BIT_OFF if _is_4bit(module) and not fuse_4bit else lora_eligibility(module)
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        eligible += 1
        eligible_4bit += _is_4bit(module)
        fused.add(module)
        undos.append(_set_forward(module, forward))
    if not eligible and not reasons:
        raise LookupError("no PEFT LoRA layers in the model")
    # a new step begins with each forward of the decoder stack (checkpointing's recomputation runs layers only)
    hook = causal_lm.base_model.register_forward_pre_hook(casts.new_step)
    undos.append(lambda: (hook.remove(), casts.clear()))
    for first in [f for f, group in groups.items() if not all(m in fused for m in group)]:
        del groups[first]  # all or none: a layer left to PEFT keeps the group's other layers on their own
    undos.append(lambda: [m.__dict__.pop(_GROUP_STASH, None) for group in groups.values() for m in group])
    n_qkv = sum(len(g) == 3 for g in groups.values())
    detail = f"{eligible} LoRA layers fused"
    if eligible_4bit:
        detail += f" ({eligible_4bit} on a 4-bit base)"
    if groups:
        detail += (f", one op for q/k/v in {n_qkv} attention modules and for gate/up in {len(groups) - n_qkv} "
                   "MLPs")
    if reasons:
        detail += "; left to PEFT: " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
    return detail, _chain(undos)


CASTS_ATTR = "_fastsft_adapter_casts"
# On a group's later layers: (input, output) computed with the first layer's call on that input; popped by the
# next call
_GROUP_STASH = "_fastsft_group_output"
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _sibling_groups(causal_lm) -> dict:
    """``{first: (first, ...)}``: the PEFT LoRA layers that one module applies to one input, in the order it calls
    them: an attention module's q, k, v (Llama, Mistral, Qwen, Gemma) and a gated MLP's gate, up. The first
    layer's patched forward computes the group in one op and leaves the others' outputs for their calls, which
    take them only for that same input tensor."""
    groups = {}
    for module in causal_lm.modules():
        for names in _GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(m is not None and _is_lora_linear(m) for m in layers):
                groups[layers[0]] = tuple(layers)
    return groups


def adapter_casts(causal_lm):
    """The model's :class:`fastsft.ops.lora.StepCasts` (float32 adapters' half copies, reused within a step),
    made on first use; kept in the instance ``__dict__`` (not a module attribute: no state_dict entry)."""
    from fastsft.ops.lora import StepCasts

    casts = causal_lm.__dict__.get(CASTS_ATTR)
    if casts is None:
        casts = causal_lm.__dict__[CASTS_ATTR] = StepCasts()
    return casts


def _mlp_modules(causal_lm):
    return [m for m in causal_lm.modules()
            if all(isinstance(getattr(m, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj",
                                                                                     "down_proj", "act_fn"))]


def activation_of(config) -> str | None:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return ACTIVATIONS.get(name)


def patch_mlps(causal_lm, activation: str, *, fuse_lora: bool, gated: bool, backend: str) -> tuple[str, Undo]:
    """Gated MLPs: ``lora_mlp`` (all three projections LoRA, one scaling: nothing of size [tokens, intermediate]
    is saved for backward) when ``fuse_lora`` and the model is not gradient-checkpointing, else the fused gated
    activation between the model's (fused LoRA) projections when ``gated``.

    ``lora_mlp`` recomputes the gate and up GEMMs in backward: measured on an H200 at 8B shapes it keeps 0.75 MiB
    instead of 897 MiB per layer for backward but runs at 0.85x PEFT's speed. Under gradient checkpointing those
    activations are dropped anyway, so there it would only cost time."""
    from fastsft.ops import geglu, lora_mlp, swiglu
    from fastsft.ops.lora import lora_parts

    def act(gate, up):
        if activation == "swiglu":
            return swiglu(gate, up, backend=backend)
        return geglu(gate, up, approximate="tanh" if activation == "geglu_tanh" else "none", backend=backend)

    fuse_4bit = lora_4bit_enabled()  # the same switch as patch_lora's, read at the same time
    casts = adapter_casts(causal_lm)  # patch_lora's, whose hook starts each step
    modules = _mlp_modules(causal_lm)
    # Each MLP's decoder layer: its `gradient_checkpointing` flag says whether this MLP is recomputed. The model's
    # own property walks every module and finds nothing when checkpointing is off (14 ms a call at 2,600 modules
    # on the CI CPU, and this runs once per layer per forward).
    mlps = set(modules)
    layer_of = {layer.mlp: layer for layer in causal_lm.modules()
                if getattr(layer, "mlp", None) in mlps and hasattr(layer, "gradient_checkpointing")}

    def checkpointed(mlp) -> bool:
        layer = layer_of.get(mlp)
        return bool(layer.gradient_checkpointing) if layer is not None else _checkpointing(causal_lm)

    def forward(self, x, *args, **kwargs):
        if args or kwargs:
            return type(self).forward(self, x, *args, **kwargs)
        if fuse_lora and not checkpointed(self):
            projections = [getattr(self, name) for name in ("gate_proj", "up_proj", "down_proj")]
            parts = [None if _is_4bit(p) and not fuse_4bit else lora_parts(p, x.dtype) for p in projections]
            if all(p is not None for p in parts) and len({scaling for _, scaling in parts}) == 1:
                (g, scaling), (u, _), (d, _) = parts
                return lora_mlp(x, g, u, d, scaling, activation, backend=backend, casts=casts)
        if gated:
            return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))
        return type(self).forward(self, x)

    if not modules:
        raise LookupError("no gated MLP modules (gate_proj, up_proj, down_proj, act_fn) in the model")
    undos = [_set_forward(m, forward) for m in modules]
    kinds = [k for k, on in (("LoRA-fused without checkpointing", fuse_lora), (f"{activation} kernel", gated)) if on]
    return f"{len(modules)} MLPs ({' or '.join(kinds)})", _chain(undos)


def _checkpointing(model) -> bool:
    """Whether the model recomputes activations in backward (transformers 5.24 renamed the property)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def has_lora_mlps(causal_lm) -> bool:
    return any(_is_lora_linear(getattr(m, "gate_proj", None)) for m in _mlp_modules(causal_lm))


def _chain(undos: list[Undo]) -> Undo:
    def undo():
        for u in reversed(undos):
            u()

    return undo
