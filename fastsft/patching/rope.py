"""RoPE patch: transformers' ``apply_rotary_pos_emb`` through ``fastsft.ops.rope``, for patched models only.

transformers gives rotary embeddings no per-model extension point: each family's attention forward calls the
function ``apply_rotary_pos_emb`` of its modeling module by global name. So that global is replaced, once per
modeling module, and the replacement runs fastsft's op only while a thread-local flag is set; otherwise it calls
the original. The flag is set by an instance forward on each attention module of a patched model, so every other
model of the family in the process keeps the original. The flag is per thread because backward can run on
autograd's own threads, and a checkpointed layer's recompute there goes through the attention forward again,
which sets it on that thread.

The global is counted per patched model and put back when the last one is unpatched (or garbage collected). A
call the op would not compute as the original does (another ``unsqueeze_dim``, float64, partial rotary, other
shapes, cos/sin that need a gradient) runs the original: never a wrong number. A family is taken only when
its ``apply_rotary_pos_emb`` computes the rotate-half rotation (checked numerically at patch time: Cohere's
interleaved form is not) and its rotary embedding repeats cos/sin over the two halves of the head dim (the fast
backends' backward is the rotation by ``-sin``, which is the transpose only then).
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
import weakref
from typing import Callable

import torch

from fastsft.ops import rope
from fastsft.patching.modules import ModulePatches, _set_forward, autocast_off

FUNCTION = "apply_rotary_pos_emb"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the fast backends' dtypes (fastsft.ops.rope)
# Parameters after (q, k, cos, sin) that the replacement understands: transformers 5 has only unsqueeze_dim,
# releases before it also took position_ids, documented as unused.
_SIGNATURES = {("unsqueeze_dim",), ("position_ids", "unsqueeze_dim")}

_local = threading.local()  # .backend: fastsft's backend while a patched attention forward runs, else unset
# Installing and releasing the globals. Reentrant: a release may run from a finalizer that the garbage collector
# starts inside an acquire on the same thread.
_lock = threading.RLock()


class _Installed:
    """One replaced global: the function it replaced, and how many patched models use it."""

    def __init__(self, module: types.ModuleType, original: Callable, extra: tuple[str, ...]):
        self.module, self.original, self.users = module, original, 0
        self.replacement = _make_replacement(original, extra)
        self.replacement._fastsft_rope = self

    def acquire(self) -> None:
        with _lock:
            if self.users == 0:
                setattr(self.module, FUNCTION, self.replacement)
            self.users += 1

    def release(self) -> None:
        with _lock:
            self.users -= 1
            # Another library may have replaced the global since (perhaps wrapping ours): leave theirs in place.
            # Ours, if it stays reachable through theirs, calls the original whenever no patched model runs.
            if self.users == 0 and getattr(self.module, FUNCTION, None) is self.replacement:
                setattr(self.module, FUNCTION, self.original)


def _make_replacement(original: Callable, extra: tuple[str, ...]) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        backend = getattr(_local, "backend", None)
        if backend is None or not _takes(q, k, cos, sin, args, kwargs, extra):
            return original(q, k, cos, sin, *args, **kwargs)
        # The original computes in the promoted dtype (float32 for bf16 q under autocast with float32 cos/sin) and
        # returns it: so does this.
        dtype = torch.promote_types(q.dtype, cos.dtype)
        if q.dtype != dtype:
            q, k = q.to(dtype), k.to(dtype)
        with autocast_off(q):  # elementwise in the original: autocast casts nothing
            return rope(q, k, cos, sin, backend=backend)

    return apply_rotary_pos_emb


def _takes(q, k, cos, sin, args, kwargs, extra) -> bool:
    """Whether fastsft's op computes what the original would for this call: the same rotation, shapes and dtype
    (in float32 math, so bf16/fp16 results are as close or closer). Cheap: argument and attribute checks only."""
    if len(args) > len(extra):
        return False
    bound = dict(zip(extra, args))
    for name, value in kwargs.items():
        if name not in extra or name in bound:
            return False
        bound[name] = value
    if bound.get("unsqueeze_dim", 1) != 1:  # position_ids, where the signature has it, is unused there too
        return False
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

def attention_modules(causal_lm) -> list[torch.nn.Module]:
    """The decoder layers' attention modules (a class name ending in ``Attention``, with ``q_proj`` and ``k_proj``)."""
    return [m for m in causal_lm.modules() if type(m).__name__.endswith("Attention")
            and all(isinstance(getattr(m, name, None), torch.nn.Module) for name in ("q_proj", "k_proj"))]


def _modeling_module(attention_cls) -> types.ModuleType | None:
    """The module whose global ``apply_rotary_pos_emb`` the class's forward calls, or None when it calls none."""
    forward = inspect.unwrap(attention_cls.forward)
    code = getattr(forward, "__code__", None)
    if code is None or FUNCTION not in code.co_names:
        return None
    module = inspect.getmodule(forward)
    # Replacing the module attribute changes what the forward sees only if the forward's globals are that module's
    if module is None or getattr(module, "__dict__", None) is not forward.__globals__:
        return None
    return module


def _signature_extra(fn) -> tuple[str, ...] | None:
    """The parameters after (q, k, cos, sin) when they are ones the replacement understands, else None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    names = tuple(p.name for p in params)
    defaults = {p.name: p.default for p in params}
    if names[:4] != ("q", "k", "cos", "sin") or names[4:] not in _SIGNATURES:
        return None
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params) or defaults["unsqueeze_dim"] != 1:
        return None
    if defaults.get("position_ids", None) is not None:
        return None
    return names[4:]


def _rotation_mismatch(fn, extra: tuple[str, ...]) -> str | None:
    """None when ``fn`` computes ``fastsft.reference.rope.rope`` (the rotate-half rotation), else how it differs.

    Arbitrary cos/sin (not the repeated halves a model builds) make the comparison strict: an interleaved rotation
    or one reading only half of cos/sin fails it."""
    from fastsft.reference.rope import rope as reference

    cpu = torch.device("cpu")  # explicit: the caller may have set another default device
    g = torch.Generator(cpu).manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g, device=cpu), torch.randn(2, 2, 5, 8, generator=g, device=cpu)
    cos, sin = torch.randn(2, 5, 8, generator=g, device=cpu), torch.randn(2, 5, 8, generator=g, device=cpu)
    expected = reference(q, k, cos, sin)
    calls = [{}] + ([{"position_ids": torch.arange(5, device=cpu).expand(2, 5)}] if "position_ids" in extra else [])
    for kwargs in calls:
        try:
            out = fn(q, k, cos, sin, **kwargs)
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

def _installed_for(module: types.ModuleType) -> _Installed | str:
    """The replacement for ``module``'s global (existing or new, not yet installed), or why there is none."""
    current = getattr(module, FUNCTION, None)
    if current is None:
        return f"{module.__name__} has no {FUNCTION}"
    entry = getattr(current, "_fastsft_rope", None)
    if isinstance(entry, _Installed) and entry.module is module:
        return entry
    extra = _signature_extra(current)
    if extra is None:
        return (f"{module.__name__}.{FUNCTION} takes other parameters than (q, k, cos, sin, unsqueeze_dim=1) or "
                f"(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)")
    reason = _rotation_mismatch(current, extra)
    if reason is not None:
        return f"{module.__name__}.{FUNCTION}: {reason}"
    return _Installed(module, current, extra)


class RopeUse:
    """The replaced globals that one patched model uses. Released by unpatch, or when the model (which holds this)
    is garbage collected unpatched; a deep copy of the model (which copies the patched attention forwards along
    with this) acquires them again for the copy."""

    def __init__(self, entries):
        self.entries = list(entries)
        for entry in self.entries:
            entry.acquire()
        self._release = weakref.finalize(self, _release, self.entries)  # runs at most once
        self._release.atexit = False

    def release(self) -> None:
        self._release()

    def __deepcopy__(self, memo):
        return RopeUse(self.entries)


def _release(entries) -> None:
    for entry in entries:
        entry.release()


def patch_rope(causal_lm, backend: str, record: ModulePatches) -> str:
    """Route the model's rotary embeddings through ``fastsft.ops.rope``. Raises LookupError with the reason when the
    model has no attention module fastsft can take this way."""
    # Per attention class, and per modeling module (one entry each: the checks run once)
    by_class: dict[type, _Installed | str] = {}
    by_module: dict[str, _Installed | str] = {}
    targets, left = [], {}
    for attention in attention_modules(causal_lm):
        cls = type(attention)
        if cls not in by_class:
            module = _modeling_module(cls)
            if module is None:
                by_class[cls] = f"{cls.__name__}.forward does not call a module-level {FUNCTION}"
            else:
                if module.__name__ not in by_module:
                    by_module[module.__name__] = _installed_for(module)
                by_class[cls] = by_module[module.__name__]
        entry = by_class[cls]
        if isinstance(entry, str):
            left[entry] = left.get(entry, 0) + 1
        else:
            targets.append((attention, entry))
    if not targets:
        raise LookupError("; ".join(left) if left else "no attention modules with q_proj and k_proj in the model")
    if reason := _halves_mismatch(causal_lm):
        raise LookupError(reason)

    def forward(self, *args, **kwargs):
        previous = getattr(_local, "backend", None)
        _local.backend = backend
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:  # restored, not cleared: nesting-safe
            _local.backend = previous

    for attention, _ in targets:
        _set_forward(attention, forward)
    record.rope = RopeUse({id(e): e for _, e in targets}.values())
    detail = f"{len(targets)} attention modules"
    if left:
        detail += "; left alone: " + ", ".join(f"{n} ({why})" for why, n in left.items())
    return detail
