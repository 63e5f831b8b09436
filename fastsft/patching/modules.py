"""Module-level patches: attention implementation, RMSNorm forwards, fused LoRA projections and MLPs.

Each patch changes instances only (an instance ``forward``, or the model's attention implementation through
transformers' ``set_attn_implementation`` on a config of the model's own) and records what it changed on the
modules themselves, so that undoing it acts on the model it is called on: a ``copy.deepcopy`` of a patched model
is patched on its own modules and unpatched on its own. Under an accelerate hook (``dispatch_model``, CPU or disk
offload) the patched forward goes where the hook calls the module's forward, after loading its weights. They are
re-applied after PEFT wraps a model (``fastsft.patching.refresh``), since the LoRA layers exist only then. A
patched forward that meets an input it does not handle (another dtype, extra arguments, an adapter that became
ineligible after ``merge_adapter``) runs the module's own forward for that call: never a wrong number. Under
autocast each computes in the dtype the module's own forward would.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastsft import _capture
from fastsft.patching.lora import fused_lora_forward, fused_lora_group_forward, lora_eligibility, lora_parts

Undo = Callable[[], None]
FORWARDS_ATTR = "_fastsft_forwards"  # on a patched module: [(slot, previous, installed), ...], oldest first
_HOOK_SLOT = "_old_forward"  # where accelerate's hook (its instance forward) calls the module's forward


def forward_slot(module: torch.nn.Module) -> str:
    """The instance attribute a patched forward goes in: ``forward``, or the ``_old_forward`` that an accelerate
    hook calls after moving (or loading from an offload) the module's weights."""
    state = module.__dict__
    return _HOOK_SLOT if "_hf_hook" in state and _HOOK_SLOT in state else "forward"


def install_forward(module: torch.nn.Module, installed) -> tuple[str, Any]:
    """Put the bound method ``installed`` where ``module``'s forward is called; returns ``(slot, previous)``."""
    slot = forward_slot(module)
    previous = module.__dict__.get(slot)
    setattr(module, slot, installed)
    return slot, previous


def uninstall_forward(module: torch.nn.Module, slot: str, previous, installed) -> bool:
    """Undo :func:`install_forward`. Returns False when ``installed`` was no longer in place (someone replaced it)
    and ``previous`` was put back over the replacement. An accelerate hook added after patching moved the patched
    forward into ``_old_forward``: it is replaced there, and the hook stays."""
    state = module.__dict__
    if slot == "forward" and state.get(slot) is not installed and state.get(_HOOK_SLOT) is installed:
        slot, previous = _HOOK_SLOT, previous or types.MethodType(type(module).forward, module)
    in_place = state.get(slot) is installed
    if previous is None:
        state.pop(slot, None)
    else:
        setattr(module, slot, previous)
    return in_place


def _set_forward(module: torch.nn.Module, forward) -> None:
    installed = types.MethodType(forward, module)
    slot, previous = install_forward(module, installed)
    module.__dict__.setdefault(FORWARDS_ATTR, []).append((slot, previous, installed))


def restore_forwards(module: torch.nn.Module) -> bool:
    """Undo every :func:`_set_forward` on ``module``, newest first. Returns whether there was any."""
    installed = module.__dict__.pop(FORWARDS_ATTR, [])
    for entry in reversed(installed):
        uninstall_forward(module, *entry)
    return bool(installed)


@dataclass
class ModulePatches:
    """What the module patches of one model changed beyond the modules' forwards (kept on the model instance, so a
    deep copy carries its own): the attention implementation and config swap, the adapter-cast hook."""

    wanted: dict
    backend: Any
    patched: list = field(default_factory=list)
    attention: tuple | None = None  # (previous implementation, the shared config, the model's own copy)
    casts_hook: int | None = None  # id of the pre-hook on the decoder stack


_MODULE_STATE = ("_fastsft_eps", "_fastsft_lora", "_fastsft_mlp", "_fastsft_attention_patch")


def undo_module_patches(causal_lm, record: ModulePatches) -> None:
    """Take every module patch in ``record`` off ``causal_lm`` (the model it is stored on)."""
    for module in causal_lm.modules():
        restore_forwards(module)
        for name in _MODULE_STATE:
            module.__dict__.pop(name, None)
    if record.casts_hook is not None:
        hooks = causal_lm.base_model._forward_pre_hooks
        hooks.pop(record.casts_hook, None)
        adapter_casts(causal_lm).clear()
    if record.attention is not None:
        from fastsft.patching.attention import undo_attention

        undo_attention(causal_lm, record.attention)
    record.patched.clear()


_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)  # the dtypes autocast casts (not float64)


def autocast_off(x: torch.Tensor):
    """A context with autocast off for ``x``'s device; nothing to enter where it is off already (host time: this
    runs in every patched forward)."""
    device_type = x.device.type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a linear layer's output for input ``x`` now, or None when it does not cast it."""
    device_type = x.device.type
    if x.dtype in _AUTOCAST_CASTS and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None

# transformers' activation names -> fastsft's gated MLP activation
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
               "gelu_new": "geglu_tanh", "gelu_fast": "geglu_tanh"}


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


def patch_rms_norms(causal_lm, offset: float, backend: str) -> str:
    from fastsft.ops import rms_norm

    def forward(self, x):
        if x.dtype != self.weight.dtype or x.shape[-1] != self.weight.shape[0]:
            return type(self).forward(self, x)
        # transformers' RMSNorm computes in float32 and returns x's dtype under autocast too
        with autocast_off(x):
            return rms_norm(x, self.weight, self._fastsft_eps, offset=offset, backend=backend)

    modules = rms_norm_modules(causal_lm)
    if not modules:
        raise LookupError("no RMSNorm modules in the model (it normalizes another way)")
    for module in modules:
        module._fastsft_eps = _norm_eps(module)
        _set_forward(module, forward)
    return f"{len(modules)} modules, offset {offset:g}"


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


@dataclass
class _LoraState:
    """On each fused LoRA layer: the backend and the model's adapter casts."""

    backend: Any
    casts: Any


_LORA_ATTR = "_fastsft_lora"


def _lora_forward(self, x, *args, **kwargs):
    state: _LoraState | None = self.__dict__.get(_LORA_ATTR)
    if not args and not kwargs and state is not None and isinstance(x, torch.Tensor):
        out = _in_layer_dtype(fused_lora_forward, self, x, state.backend, state.casts)
        if out is not None:
            return out
    return type(self).forward(self, x, *args, **kwargs)


def _in_layer_dtype(fn, layers, x: torch.Tensor, backend, casts):
    """``fn(layers, x)`` (a fused LoRA forward; None when not eligible now) in the dtype PEFT's layers compute in:
    under autocast the autocast dtype, on the input cast to it, where the base weight has that dtype (otherwise
    None, and PEFT's forward runs)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return fn(layers, x, backend=backend, casts=casts)
    with torch.autocast(x.device.type, enabled=False):
        return fn(layers, x.to(dtype), backend=backend, casts=casts)


def fused_group(layers: tuple, x, backend, casts):
    """The outputs of the fused PEFT LoRA ``layers`` that take one input (an attention module's q, k and v; an
    MLP's gate and up) for ``x``, as one op in the dtype their own forwards compute in; or None when one of them is
    not eligible now or has forward hooks (which calling it would run): the caller then calls the layers."""
    if not isinstance(x, torch.Tensor) or _has_hooks(layers):
        return None
    return _in_layer_dtype(fused_lora_group_forward, layers, x, backend, casts)


def _has_hooks(layers) -> bool:
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in layers)


def patch_lora(causal_lm, backend, record: ModulePatches) -> str:
    """Route eligible PEFT LoRA ``Linear`` layers through ``fastsft.ops.lora_linear``; ``Linear4bit`` ones too unless
    ``FASTSFT_LORA_4BIT=0`` (see :func:`lora_4bit_enabled`). An attention module whose q, k and v are all fused
    computes them as one op (``lora_qkv``) in the patched attention forward
    (:mod:`fastsft.patching.attention_forward`), where its structure is one fastsft recognises."""
    from fastsft.patching import attention_forward

    casts = adapter_casts(causal_lm)
    fuse_4bit = lora_4bit_enabled()
    eligible, eligible_4bit, reasons, fused = 0, 0, {}, []
    for module in causal_lm.modules():
        if not _is_lora_linear(module):
            continue
        reason = LORA_4BIT_OFF if _is_4bit(module) and not fuse_4bit else lora_eligibility(module)
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        eligible += 1
        eligible_4bit += _is_4bit(module)
        fused.append(module)
    if not eligible and not reasons:
        raise LookupError("no PEFT LoRA layers in the model")
    for module in fused:
        module.__dict__[_LORA_ATTR] = _LoraState(backend, casts)
        _set_forward(module, _lora_forward)
    fused_set = set(fused)
    n_qkv, unrecognised = 0, {}
    dtype = causal_lm.get_input_embeddings().weight.dtype  # the hidden states'
    for attention in attention_forward.attention_modules(causal_lm):
        layers = tuple(getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj"))
        if not all(m in fused_set for m in layers):
            continue  # all or none: a layer left to PEFT keeps the others on their own
        state = attention_forward.prepare(attention, dtype)
        if isinstance(state, str):
            unrecognised[state] = unrecognised.get(state, 0) + 1
            continue
        state.qkv, state.lora_backend, state.casts = layers, backend, casts
        attention_forward.install(attention, state)
        n_qkv += 1
    # a new step begins with each forward of the decoder stack (checkpointing's recomputation runs layers only)
    record.casts_hook = causal_lm.base_model.register_forward_pre_hook(casts.new_step).id
    detail = f"{eligible} LoRA layers fused"
    if eligible_4bit:
        detail += f" ({eligible_4bit} on a 4-bit base)"
    if n_qkv or unrecognised:
        detail += f", q/k/v as one op in {n_qkv} attention modules"
    if unrecognised:
        detail += " (one by one in " + ", ".join(f"{n}: {why}" for why, n in unrecognised.items()) + ")"
    if reasons:
        detail += "; left to PEFT: " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
    return detail


CASTS_ATTR = "_fastsft_adapter_casts"


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


@dataclass
class _MlpState:
    """On each patched MLP: how it computes, the decoder layer whose checkpointing flag decides lora_mlp, and the
    gate and up LoRA layers computed as one op otherwise."""

    activation: str
    fuse_lora: bool
    gated: bool
    fuse_4bit: bool
    backend: str
    casts: Any
    layer: Any  # the MLP's decoder layer, or None
    model: Any  # the causal LM, asked when there is no such layer
    group: tuple | None = None  # (gate_proj, up_proj): fused LoRA layers computed as one op where lora_mlp is not

    def checkpointed(self) -> bool:
        return bool(self.layer.gradient_checkpointing) if self.layer is not None else _checkpointing(self.model)


_MLP_ATTR = "_fastsft_mlp"


def _mlp_forward(self, x, *args, **kwargs):
    from fastsft.ops import lora_mlp

    state: _MlpState | None = self.__dict__.get(_MLP_ATTR)
    if args or kwargs or state is None:
        return type(self).forward(self, x, *args, **kwargs)
    # in a captured layer's backward graph the MLP's result is not read: its gradients alone, no down GEMM forward
    unread = _capture.unread_output()
    if state.fuse_lora and (unread is not None or not state.checkpointed()):
        # under autocast PEFT's projections compute in the autocast dtype: so does lora_mlp, where it can
        dtype = autocast_dtype(x) or x.dtype
        projections = [getattr(self, name) for name in ("gate_proj", "up_proj", "down_proj")]
        parts = [None if _is_4bit(p) and not state.fuse_4bit else lora_parts(p, dtype, state.backend)
                 for p in projections]
        if all(p is not None for p in parts) and len({scaling for _, scaling in parts}) == 1:
            (g, scaling), (u, _), (d, _) = parts
            options = {}
            if unread is not None:
                unread.used = True
                options = {"compute_output": False, "tile_tokens": unread.tile_tokens}
            with torch.autocast(x.device.type, enabled=False):
                return lora_mlp(x.to(dtype), g, u, d, scaling, state.activation, backend=state.backend,
                                casts=state.casts, **options)
    if not state.gated and state.group is None:
        return type(self).forward(self, x)
    # the stock MLP's steps, down(act(gate(x)) * up(x)), with gate and up as one op and the activation fused
    outs = fused_group(state.group, x, state.backend, state.casts) if state.group is not None else None
    gate, up = outs if outs is not None else (self.gate_proj(x), self.up_proj(x))
    if not state.gated or gate.dtype != up.dtype:  # the module's own elementwise product promotes
        return self.down_proj(self.act_fn(gate) * up)
    with autocast_off(gate):  # elementwise: autocast would not cast it
        hidden = _gated(state, gate, up)
    return self.down_proj(hidden)


def _gated(state: _MlpState, gate, up):
    from fastsft.ops import geglu, swiglu

    if state.activation == "swiglu":
        return swiglu(gate, up, backend=state.backend)
    return geglu(gate, up, approximate="tanh" if state.activation == "geglu_tanh" else "none",
                 backend=state.backend)


def patch_mlps(causal_lm, activation: str, *, fuse_lora: bool, gated: bool, backend: str) -> str:
    """Gated MLPs: ``lora_mlp`` (all three projections LoRA, one scaling: nothing of size [tokens, intermediate]
    is saved for backward) when ``fuse_lora`` and the model is not gradient-checkpointing, else the fused gated
    activation between the model's (fused LoRA) projections when ``gated``.

    ``lora_mlp`` recomputes the gate and up GEMMs in backward: measured on an H200 at 8B shapes it keeps 0.75 MiB
    instead of 897 MiB per layer for backward but runs at 0.85x PEFT's speed. Under gradient checkpointing those
    activations are dropped anyway, so there it would only cost time."""
    fuse_4bit = lora_4bit_enabled()  # the same switch as patch_lora's, read at the same time
    casts = adapter_casts(causal_lm)  # patch_lora's, whose hook starts each step
    modules = _mlp_modules(causal_lm)
    # Each MLP's decoder layer: its `gradient_checkpointing` flag says whether this MLP is recomputed. The model's
    # own property walks every module and finds nothing when checkpointing is off (14 ms a call at 2,600 modules
    # on the CI CPU, and this runs once per layer per forward).
    mlps = set(modules)
    layer_of = {layer.mlp: layer for layer in causal_lm.modules()
                if getattr(layer, "mlp", None) in mlps and hasattr(layer, "gradient_checkpointing")}
    if not modules:
        raise LookupError("no gated MLP modules (gate_proj, up_proj, down_proj, act_fn) in the model")
    n_groups = 0
    for module in modules:
        group = (module.gate_proj, module.up_proj)
        group = group if fuse_lora and all(_LORA_ATTR in m.__dict__ for m in group) else None  # both fused
        n_groups += group is not None
        module.__dict__[_MLP_ATTR] = _MlpState(activation, fuse_lora, gated, fuse_4bit, backend, casts,
                                               layer_of.get(module), causal_lm, group)
        _set_forward(module, _mlp_forward)
    kinds = [k for k, on in (("LoRA-fused without checkpointing", fuse_lora), (f"{activation} kernel", gated)) if on]
    detail = f"{len(modules)} MLPs ({' or '.join(kinds)})"
    if n_groups:
        detail += f", gate/up LoRA as one op in {n_groups} where lora_mlp does not run"
    return detail


def _checkpointing(model) -> bool:
    """Whether the model recomputes activations in backward (transformers 5.24 renamed the property)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def has_lora_mlps(causal_lm) -> bool:
    return any(_is_lora_linear(getattr(m, "gate_proj", None)) for m in _mlp_modules(causal_lm))
