"""One patched attention forward: q, k and v through the fused LoRA op, RoPE through ``fastsft.ops.rope``.

transformers' attention forwards compute the projections, an optional q/k norm, the rotation by the modeling
module's ``apply_rotary_pos_emb``, the KV cache update, the attention interface of ``config._attn_implementation``
and ``o_proj``, with no extension point for the projections or the rotation. So each attention module of a patched
model gets an instance forward that does the same steps itself, with the fused q/k/v LoRA op where the LoRA patch
turned it on (:func:`fastsft.patching.modules.patch_lora`) and fastsft's RoPE where the RoPE patch did
(:func:`fastsft.patching.rope.patch_rope`); each switch sets its part alone, and the steps it does not fuse run as
the stock forward runs them. Nothing outside the model's own modules changes.

The stock forwards differ between families (a q/k norm before or after the head transpose, a sliding window or a
soft-cap passed to the attention interface) and between transformers releases (decorators, the cache argument's
name). So a module is taken by what its forward does, not by how it is written: at patch time the stock forward
and this one, with nothing fused, run on one small test input each, with an attention interface that records what
it is given; the module is taken when q, k, v, the interface's keyword arguments and the output are the same, and
the attribute each extra argument is read from is found then. Any other module keeps its own forward, with the
reason in the report.

At a call, the patched forward runs the stock one for what it does not take: positional arguments past the three,
``output_attentions``, a keyword argument of the stock forward it does not know. A part it cannot fuse for a call (an adapter that became
ineligible after ``merge_adapter``, a dtype or shape the RoPE op does not take, a rotation function replaced since
patching) runs as the stock forward computes it: never a wrong number.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from fastsft.patching import rope as rope_patch
from fastsft.patching.modules import _set_forward, fused_group

STATE_ATTR = "_fastsft_attention_patch"
_GLOBALS = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
_LEADING = ("hidden_states", "position_embeddings", "attention_mask")
# keyword arguments the stock forwards take for the KV cache (transformers 5.24 renamed past_key_values)
_CACHE_ARGUMENTS = frozenset({"past_key_values", "cache"})
# attribute names an interface argument may be read from besides its own name
_ALIASES = {"softcap": ("attn_logit_softcapping",), "sliding_window": ()}
_NORMS = ("inside", "after", None)


@dataclass(frozen=True)
class Structure:
    """What one attention module's forward does beyond Llama's, found by :func:`prepare`.

    ``norm``: None; ``"inside"``, ``q_norm``/``k_norm`` on the [B, S, H, D] projections (Qwen3, Cohere); ``"after"``,
    on [B, H, S, D] after the transpose (Gemma 3). ``extra``: the interface's arguments beyond ``dropout`` and
    ``scaling``, as ``(argument, "self" or "config", attribute)`` (Mistral's ``sliding_window`` from the config,
    Qwen's and Gemma's from the module, Gemma 2's ``softcap`` from ``attn_logit_softcapping``). ``consumed``: the
    keyword parameters of the stock forward, which the interface is not given. ``cache``: the one of them that takes
    the KV cache (None: the forward takes none); ``cache_kwargs``: the cache's ``update`` is also given the forward's
    keyword arguments, as ``kwargs=`` (transformers 5.24)."""

    norm: str | None
    extra: tuple[tuple[str, str, str], ...]
    consumed: frozenset
    cache: str | None = None
    cache_kwargs: bool = False


class AttentionPatch:
    """On a patched attention module: its structure, its modeling module's globals, and the parts turned on.

    ``rope``: the RoPE op's backend, with ``rotation`` the modeling module's ``apply_rotary_pos_emb`` checked at
    patch time (None: the module's own rotation). ``qkv``: the q, k and v LoRA layers computed as one op, with
    ``lora_backend`` and ``casts`` (None: the module's own projections)."""

    def __init__(self, structure: Structure, globals_: dict):
        self.structure, self.globals = structure, globals_
        self.rope: Any = None
        self.rotation = None
        self.qkv: tuple | None = None
        self.lora_backend: Any = None
        self.casts: Any = None

    def __deepcopy__(self, memo):
        # a deep copy of the model gets its own layers and casts here; the modeling module's globals are shared
        new = copy.copy(self)
        new.qkv = copy.deepcopy(self.qkv, memo)
        new.casts = copy.deepcopy(self.casts, memo)
        return new


def attention_modules(causal_lm) -> list[torch.nn.Module]:
    """The decoder layers' attention modules (a class name ending in ``Attention``, with ``q_proj`` and ``k_proj``)."""
    return [m for m in causal_lm.modules() if type(m).__name__.endswith("Attention")
            and all(isinstance(getattr(m, name, None), torch.nn.Module) for name in ("q_proj", "k_proj"))]


def prepare(module: torch.nn.Module, dtype: torch.dtype) -> AttentionPatch | str:
    """The module's :class:`AttentionPatch` (the one in place, or a new one not yet installed), or why it keeps its
    own forward. ``dtype``: the model's hidden states' dtype, for the test input."""
    state = module.__dict__.get(STATE_ATTR)
    if state is not None:
        return state
    cls = type(module)
    fn = inspect.unwrap(cls.forward)  # transformers decorates some forwards (argument renames)
    unknown = f"{cls.__name__}.forward is not an attention forward fastsft can stand in for"
    if not inspect.isfunction(fn):
        return f"{unknown} (not a plain function)"
    # the modeling module's names the steps use: of the class or, for a subclass written elsewhere, of the nearest
    # base whose module has them (the check below tells whether the steps are the same)
    g = next((f.__globals__ for f in (inspect.unwrap(c.__dict__["forward"]) for c in cls.__mro__
                                      if "forward" in c.__dict__) if inspect.isfunction(f)
              and all(name in f.__globals__ for name in _GLOBALS)), None)
    if g is None:
        return f"{unknown} (neither its module nor a base class's has {', '.join(_GLOBALS)})"
    params = list(inspect.signature(fn).parameters.values())[1:]
    if (tuple(p.name for p in params[:3]) != _LEADING or params[-1].kind is not params[-1].VAR_KEYWORD
            or any(p.default is p.empty for p in params[3:-1])):
        return f"{unknown} (its parameters are not {', '.join(_LEADING)}, optional ones, **kwargs)"
    named = [p.name for p in params[3:-1]]
    cache = next((name for name in named if name in _CACHE_ARGUMENTS), None)
    found = _probe(module, g, frozenset(named) | _CACHE_ARGUMENTS, cache, dtype)
    if isinstance(found, str):
        return f"{unknown} ({found})"
    return AttentionPatch(found, g)


def install(module: torch.nn.Module, state: AttentionPatch) -> None:
    """Put the patched forward on ``module`` (once: the second part turned on shares it)."""
    if module.__dict__.get(STATE_ATTR) is not state:
        module.__dict__[STATE_ATTR] = state  # not a Module attribute: no state_dict entry, no __setattr__
        _set_forward(module, _attention_forward)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    state: AttentionPatch | None = self.__dict__.get(STATE_ATTR)
    if state is None or args or position_embeddings is None or kwargs.get("output_attentions"):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    structure, cache = state.structure, None
    if not structure.consumed.isdisjoint(kwargs):  # the stock forward takes these by name: the interface does not
        given = {k: v for k, v in kwargs.items() if k in structure.consumed and v is not None}
        caches = [v for k, v in given.items() if k in _CACHE_ARGUMENTS]
        if len(given) > 1 or len(caches) != len(given) or (caches and structure.cache is None):
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
        cache = caches[0] if caches else None
        kwargs = {k: v for k, v in kwargs.items() if k not in structure.consumed}
    return _steps(self, state, hidden_states, position_embeddings, attention_mask, cache, kwargs, fuse=True)


def _steps(self, state: AttentionPatch, hidden_states, position_embeddings, attention_mask, cache, kwargs, *,
           fuse: bool):
    """The stock forward's steps; with ``fuse``, q/k/v and RoPE through fastsft where turned on."""
    structure, g = state.structure, state.globals
    outs = None
    if fuse and state.qkv is not None:
        outs = fused_group(state.qkv, hidden_states, state.lora_backend, state.casts)
    if outs is None:  # in the stock forward's order (a LoRA dropout draws its random numbers in that order)
        outs = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (t.view(hidden_shape) for t in outs)
    if structure.norm == "inside":
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if structure.norm == "after":
        query, key = self.q_norm(query), self.k_norm(key)

    cos, sin = position_embeddings
    rotation = g["apply_rotary_pos_emb"]
    rotated = None
    if fuse and state.rope is not None and rotation is state.rotation:
        rotated = rope_patch.rotate(query, key, cos, sin, state.rope)
    query, key = rotated if rotated is not None else rotation(query, key, cos, sin)
    if cache is not None:
        update = {"kwargs": kwargs} if structure.cache_kwargs else {}
        key, value = cache.update(key, value, self.layer_idx, **update)

    interface = g["ALL_ATTENTION_FUNCTIONS"].get_interface(self.config._attn_implementation,
                                                           g["eager_attention_forward"])
    extra = {name: getattr(self if where == "self" else self.config, attribute, None)
             for name, where, attribute in structure.extra}
    attn_output, attn_weights = interface(self, query, key, value, attention_mask,
                                          dropout=self.attention_dropout if self.training else 0.0,
                                          scaling=self.scaling, **extra, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# --- the check at patch time ----------------------------------------------------------------------------------------

_PROBE = "fastsft_probe"  # an attention implementation that records its calls, used by the check only
_recorded: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastsft_attention_probe", default=None)


def _recording_interface(module, query, key, value, attention_mask, **kwargs):
    calls = _recorded.get()
    if calls is None:
        raise RuntimeError(f"the attention implementation {_PROBE!r} is fastsft's patch-time check, not for models")
    calls.append((query, key, value, attention_mask, kwargs))
    return query.transpose(1, 2), None  # [B, S, H, D], as the interfaces return it


class _RecordingCache:
    """A KV cache that records its updates and keeps nothing."""

    def __init__(self):
        self.calls = []

    def update(self, key, value, *args, **kwargs):
        self.calls.append((key, value, args, kwargs))
        return key, value


_MARK = {"fastsft_probe": True}  # a keyword argument the test calls pass, to see where the forward's kwargs go


def _probe(module, g: dict, consumed: frozenset, cache: str | None, dtype: torch.dtype) -> Structure | str:
    """The :class:`Structure` under which this forward, with nothing fused, does what the stock forward does on a
    test input (with a recording KV cache where it takes one), or what differs."""
    from transformers import AttentionInterface

    params = list(module.parameters())
    if any(p.device.type == "meta" for p in params):
        return "its weights are not in memory (offloaded) to check it on a test input"
    device = params[0].device if params else torch.device("cpu")
    head_dim, hidden = getattr(module, "head_dim", None), getattr(module.config, "hidden_size", None)
    if not isinstance(head_dim, int) or not isinstance(hidden, int):
        return "no integer head_dim and config.hidden_size to make a test input from"
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 3, hidden, generator=gen).to(device, dtype)
    cos, sin = (torch.randn(1, 3, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    AttentionInterface.register(_PROBE, _recording_interface)  # idempotent
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    def run(forward):
        calls = []
        token = _recorded.set(calls)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(0)  # a dropout in the projections draws the same numbers in both runs
                out = forward()
        finally:
            _recorded.reset(token)
        if len(calls) != 1:
            raise LookupError(f"it called the attention interface {len(calls)} times on a test input, not once")
        return out, calls[0]

    config = module.__dict__.get("config")
    probe_config = copy.copy(config)
    probe_config.__dict__["_attn_implementation_internal"] = _PROBE  # this module only, for the check
    module.__dict__["config"] = probe_config
    try:
        stock_cache = _RecordingCache()
        try:
            stock_out, stock = run(lambda: type(module).forward(module, x, (cos, sin), None,
                                                                **({cache: stock_cache} if cache else {}), **_MARK))
        except Exception as exc:  # anything at all: a forward fastsft cannot check is one it does not take
            return f"the stock forward failed on a test input ({type(exc).__name__}: {exc})"
        extra = _sources(module, {k: v for k, v in stock[4].items() if k not in _MARK})
        if isinstance(extra, str):
            return extra
        cache_kwargs = False
        if cache is not None:
            if len(stock_cache.calls) != 1:
                return f"it updated the KV cache {len(stock_cache.calls)} times on a test input, not once"
            update = stock_cache.calls[0]
            cache_kwargs = update[3] == {"kwargs": _MARK}
            if update[2] != (module.layer_idx,) or not (cache_kwargs or update[3] == {}):
                return "it updates the KV cache with arguments fastsft does not know"
        state = AttentionPatch(None, g)
        has_norms = all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("q_norm", "k_norm"))
        differs = "its steps differ"
        for norm in _NORMS if has_norms else (None,):
            state.structure = Structure(norm, extra, consumed, cache, cache_kwargs)
            ours_cache = _RecordingCache() if cache else None
            try:
                out, ours = run(lambda: _steps(module, state, x, (cos, sin), None, ours_cache, dict(_MARK),
                                               fuse=False))
            except Exception as exc:
                differs = f"its steps differ ({type(exc).__name__}: {exc})"
                continue
            same_cache = ours_cache is None or (len(ours_cache.calls) == 1 and all(
                _same(a, b) for a, b in zip(ours_cache.calls[0][:2], stock_cache.calls[0][:2])))
            if (all(_same(a, b) for a, b in zip(ours[:4], stock[:4])) and _same_kwargs(ours[4], stock[4])
                    and same_cache and _same(out[0], stock_out[0]) and _same(out[1], stock_out[1])):
                return state.structure
    finally:
        module.__dict__["config"] = config
    return differs + " on a test input"


def _sources(module, kwargs: dict):
    """Where the stock forward reads each interface argument beyond ``dropout`` and ``scaling``: ``(argument,
    "self" or "config", attribute)`` whose value now is the one it passed; or why one is not found."""
    extra = []
    for name, value in kwargs.items():
        if name in ("dropout", "scaling"):
            continue
        for where, owner in (("self", module), ("config", module.config)):
            attribute = next((a for a in (name, *_ALIASES.get(name, ())) if hasattr(owner, a)
                              and _same(getattr(owner, a), value)), None)
            if attribute is not None:
                extra.append((name, where, attribute))
                break
        else:
            return f"it passes {name}={value!r} to the attention interface from no attribute fastsft reads"
    return tuple(extra)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    try:
        return a is b or bool(a == b)
    except Exception:  # a value that does not compare
        return False


def _same_kwargs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
