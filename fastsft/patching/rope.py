"""RoPE patch: the rotary embedding of a patched model's attention modules through ``fastsft.ops.rope``.

The rotation runs in the patched attention forward (:mod:`fastsft.patching.attention_forward`), which calls the op
directly; the modeling module's ``apply_rotary_pos_emb`` is left as it is, so every other model keeps it. A family
is taken only when that function computes the rotate-half rotation (checked numerically at patch time: Cohere's
interleaved form is not) and its rotary embedding repeats cos/sin over the two halves of the head dim (the fast
backends' backward is the rotation by ``-sin``, which is the transpose only then). A call the op would not compute
as the original does (float64, partial rotary, other shapes, cos/sin that need a gradient) runs the original:
never a wrong number.
"""

from __future__ import annotations

import inspect

import torch

from fastsft.ops import rope
from fastsft.patching.modules import ModulePatches, autocast_off

FUNCTION = "apply_rotary_pos_emb"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the fast backends' dtypes (fastsft.ops.rope)


def rotate(q, k, cos, sin, backend):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` through ``fastsft.ops.rope`` on ``backend``, or None when the op
    would not compute what the original does for these inputs."""
    if not _takes(q, k, cos, sin):
        return None
    # The original computes in the promoted dtype (float32 for bf16 q under autocast with float32 cos/sin) and
    # returns it: so does this.
    dtype = torch.promote_types(q.dtype, cos.dtype)
    if q.dtype != dtype:
        q, k = q.to(dtype), k.to(dtype)
    with autocast_off(q):  # elementwise in the original: autocast casts nothing
        return rope(q, k, cos, sin, backend=backend)


def _takes(q, k, cos, sin) -> bool:
    """Whether fastsft's op computes what the original would for this call (``unsqueeze_dim=1``): the same
    rotation, shapes and dtype (in float32 math, so bf16/fp16 results are as close or closer). Cheap: attribute
    checks only."""
    if not all(type(t) is torch.Tensor for t in (q, k, cos, sin)):  # subclasses (DTensor, ...) stay with theirs
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    B, _, S, D = q.shape
    if D % 2 or k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        return False
    # [B or 1, S, D]: a smaller last dim is partial rotary, a 2-D cos broadcasts differently in the original
    if cos.shape[0] not in (1, B) or cos.shape[1] != S or cos.shape[2] != D:
        return False
    if q.dtype != k.dtype or cos.dtype != sin.dtype or torch.promote_types(q.dtype, cos.dtype) not in _DTYPES:
        return False
    if cos.requires_grad or sin.requires_grad:  # the op gives cos/sin no gradient
        return False
    return q.device == k.device == cos.device == sin.device


# --- checks at patch time ------------------------------------------------------------------------------------------

def _rotation_mismatch(fn) -> str | None:
    """None when ``fn`` computes ``fastsft.reference.rope.rope`` (the rotate-half rotation), else how it differs.

    Arbitrary cos/sin (not the repeated halves a model builds) make the comparison strict: an interleaved rotation
    or one reading only half of cos/sin fails it."""
    from fastsft.reference.rope import rope as reference

    cpu = torch.device("cpu")  # explicit: the caller may have set another default device
    g = torch.Generator(cpu).manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g, device=cpu), torch.randn(2, 2, 5, 8, generator=g, device=cpu)
    cos, sin = torch.randn(2, 5, 8, generator=g, device=cpu), torch.randn(2, 5, 8, generator=g, device=cpu)
    expected = reference(q, k, cos, sin)
    try:
        out = fn(q, k, cos, sin)  # as the attention forwards call it
    except Exception as exc:  # anything at all: the function is not one fastsft can stand in for
        return f"it failed on a test call ({type(exc).__name__}: {exc})"
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(o, torch.Tensor) and o.shape == e.shape and o.dtype == e.dtype
                    and torch.allclose(o, e, rtol=1e-5, atol=1e-6) for o, e in zip(out, expected))):
        return ("it does not compute the rotate-half rotation of fastsft.ops.rope on a test call (an "
                "interleaved rotation, as Cohere's, differs)")
    return None


def _halves_mismatch(causal_lm) -> str | None:
    """None when every rotary embedding module of the model gives cos/sin whose two halves are equal."""
    rotaries = [m for m in causal_lm.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        return "no rotary embedding module (*RotaryEmbedding) in the model to check cos/sin against"
    for module in rotaries:
        name = type(module).__name__
        buffer = next(module.buffers(), None)
        device = buffer.device if buffer is not None else torch.device("cpu")
        x = torch.zeros(1, 4, 1, device=device)
        position_ids = torch.arange(0, 64, 16, device=device)[None]
        try:
            # Gemma 3 keeps one rotation per layer type and takes the type as a third argument
            has_types = "layer_type" in inspect.signature(module.forward).parameters
            with torch.no_grad():
                outputs = ([module(x, position_ids, layer_type) for layer_type in module.layer_types] if has_types
                           else [module(x, position_ids)])
        except Exception as exc:
            return f"could not check the cos/sin of {name} ({type(exc).__name__}: {exc})"
        for cos, sin in outputs:
            half = cos.shape[-1] // 2
            if not all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin)):
                return (f"{name} gives cos/sin whose two halves differ (the fast backward is the rotation by -sin, "
                        "the transpose only when they are equal)")
    return None


# --- the patch -------------------------------------------------------------------------------------------------------

def patch_rope(causal_lm, backend, record: ModulePatches) -> str:
    """Route the rotary embeddings of the model's attention modules through ``fastsft.ops.rope`` (in the patched
    attention forward). Raises LookupError with the reason when the model has no attention module fastsft can take
    this way."""
    from fastsft.patching import attention_forward

    del record  # what to undo is the attention modules' forward, recorded on them
    checked: dict[int, str | None] = {}  # per modeling module (its globals): the check runs once
    targets, left = [], {}
    dtype = causal_lm.get_input_embeddings().weight.dtype  # the hidden states'
    for attention in attention_forward.attention_modules(causal_lm):
        state = attention_forward.prepare(attention, dtype)
        if not isinstance(state, str):
            g = state.globals
            if id(g) not in checked:
                reason = _rotation_mismatch(g[FUNCTION])
                checked[id(g)] = None if reason is None else f"{g.get('__name__', '?')}.{FUNCTION}: {reason}"
            state = checked[id(g)] or state
        if isinstance(state, str):
            left[state] = left.get(state, 0) + 1
        else:
            targets.append((attention, state))
    if not targets:
        raise LookupError("; ".join(left) if left else "no attention modules with q_proj and k_proj in the model")
    if reason := _halves_mismatch(causal_lm):
        raise LookupError(reason)
    for attention, state in targets:
        state.rope, state.rotation = backend, state.globals[FUNCTION]
        attention_forward.install(attention, state)
    detail = f"{len(targets)} attention modules"
    if left:
        detail += "; left alone: " + ", ".join(f"{n} ({why})" for why, n in left.items())
    return detail
