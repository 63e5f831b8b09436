"""One patched attention forward: q, k and v through the fused LoRA op, RoPE through ``fastsft.ops.rope``.

transformers' attention forwards compute the projections, an optional q/k norm, the rotation by the modeling
module's ``apply_rotary_pos_emb``, the KV cache update, the attention interface of ``config._attn_implementation``
and ``o_proj``, with no extension point for the projections or the rotation. So each attention module of a patched
model gets an instance forward that does the same steps itself, with the fused q/k/v LoRA op where the LoRA patch
turned it on (:func:`fastsft.patching.modules.patch_lora`) and fastsft's RoPE where the RoPE patch did
(:func:`fastsft.patching.rope.patch_rope`); each switch sets its part alone, and the steps it does not fuse run as
the stock forward runs them. Nothing outside the model's own modules changes.

A class is taken only when its ``forward`` is, as a syntax tree (comments and formatting aside), one of the
structures below, which are those of the supported families' stock forwards; any other keeps its own forward, with
the reason in the report. A call the patched forward does not take (positional arguments past the four,
``output_attentions``) runs the stock forward; a part it cannot fuse for a call (an adapter that became ineligible
after ``merge_adapter``, a dtype or shape the RoPE op does not take, a rotation function replaced since patching)
runs as the stock forward computes it: never a wrong number.
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import torch

from fastsft.patching import rope as rope_patch
from fastsft.patching.modules import _set_forward, fused_group

STATE_ATTR = "_fastsft_attention_patch"
_PARAMETERS = ("self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values")
_GLOBALS = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")


@dataclass(frozen=True)
class Structure:
    """What an attention forward does beyond Llama's.

    ``norm``: None; ``"inside"``, ``q_norm``/``k_norm`` on the [B, S, H, D] projections (Qwen3); ``"after"``, on
    [B, H, S, D] after the transpose (Gemma 3); ``"cohere"``, on [B, S, H, D] when ``self.use_qk_norm``.
    ``sliding``: None, ``"config"`` (``getattr(self.config, "sliding_window", None)``: Mistral) or ``"attr"``
    (``self.sliding_window``). ``softcap``: passes ``softcap=self.attn_logit_softcapping`` (Gemma 2).
    ``dropout_first``: spells the dropout ``self.attention_dropout if self.training else 0.0`` (the same value)."""

    name: str
    norm: str | None = None
    sliding: str | None = None
    softcap: bool = False
    dropout_first: bool = False

    def source(self) -> str:
        """The body of the stock forward of this structure."""
        proj = {"query": "q", "key": "k", "value": "v"}
        lines = ["input_shape = hidden_states.shape[:-1]", "hidden_shape = (*input_shape, -1, self.head_dim)"]
        if self.norm == "inside":
            lines += [f"{n}_states = self.{p}_norm(self.{p}_proj(hidden_states).view(hidden_shape)).transpose(1, 2)"
                      for n, p in proj.items() if p != "v"]
            lines += ["value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)"]
        elif self.norm == "cohere":
            lines += [f"{n}_states = self.{p}_proj(hidden_states).view(hidden_shape)" for n, p in proj.items()]
            lines += ["if self.use_qk_norm:", "    query_states = self.q_norm(query_states)",
                      "    key_states = self.k_norm(key_states)"]
            lines += [f"{n}_states = {n}_states.transpose(1, 2)" for n in proj]
        else:
            lines += [f"{n}_states = self.{p}_proj(hidden_states).view(hidden_shape).transpose(1, 2)"
                      for n, p in proj.items()]
            if self.norm == "after":
                lines += ["query_states = self.q_norm(query_states)", "key_states = self.k_norm(key_states)"]
        dropout = ("self.attention_dropout if self.training else 0.0" if self.dropout_first
                   else "0.0 if not self.training else self.attention_dropout")
        extra = {None: "", "config": ', sliding_window=getattr(self.config, "sliding_window", None)',
                 "attr": ", sliding_window=self.sliding_window"}[self.sliding]
        extra += ", softcap=self.attn_logit_softcapping" if self.softcap else ""
        lines += [
            "cos, sin = position_embeddings",
            "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)",
            "if past_key_values is not None:",
            "    key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)",
            "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface("
            "self.config._attn_implementation, eager_attention_forward)",
            "attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, "
            f"attention_mask, dropout={dropout}, scaling=self.scaling{extra}, **kwargs)",
            "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
            "attn_output = self.o_proj(attn_output)",
            "return attn_output, attn_weights",
        ]
        return "\n".join(lines)


STRUCTURES = (
    Structure("llama"),  # Llama, Gemma, Granite
    Structure("mistral", sliding="config"),
    Structure("qwen2", sliding="attr"),
    Structure("qwen3", norm="inside", sliding="attr"),
    Structure("gemma2", sliding="attr", softcap=True, dropout_first=True),
    Structure("gemma3", norm="after", sliding="attr", dropout_first=True),
    Structure("cohere", norm="cohere"),
)
_DUMPS = {ast.dump(ast.parse(s.source())): s for s in STRUCTURES}
_RECOGNISED: dict = {}  # (class, its forward) -> (Structure, the forward's globals) or the reason it is not one


def recognise(cls: type):
    """``(structure, globals)`` of an attention class whose ``forward`` is one of :data:`STRUCTURES` (the globals:
    its modeling module's, read at each call as the stock forward reads them), or why it is not one."""
    key = (cls, cls.__dict__.get("forward", cls.forward))
    if key not in _RECOGNISED:
        _RECOGNISED[key] = _recognise(cls)
    return _RECOGNISED[key]


def _recognise(cls: type):
    fn = cls.forward
    unknown = f"{cls.__name__}.forward is not an attention forward fastsft recognises"
    if not inspect.isfunction(fn):
        return f"{unknown} (not a plain function)"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return f"{unknown} (no source to compare)"
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return f"{unknown} (not a function definition)"
    if node.decorator_list:
        return f"{unknown} (it is decorated)"
    args = node.args
    if (tuple(a.arg for a in args.posonlyargs + args.args) != _PARAMETERS or args.vararg or args.kwonlyargs
            or args.kwarg is None or args.kwarg.arg != "kwargs"):
        return f"{unknown} (its parameters are not {', '.join(_PARAMETERS[1:])}, **kwargs)"
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # a docstring
    structure = _DUMPS.get(ast.dump(ast.Module(body=body, type_ignores=[])))
    if structure is None:
        return f"{unknown} (its steps differ from those of the supported families)"
    missing = [name for name in _GLOBALS if name not in fn.__globals__]
    if missing:
        return f"{unknown} (its module has no {', '.join(missing)})"
    return structure, fn.__globals__


def attention_modules(causal_lm) -> list[torch.nn.Module]:
    """The decoder layers' attention modules (a class name ending in ``Attention``, with ``q_proj`` and ``k_proj``)."""
    return [m for m in causal_lm.modules() if type(m).__name__.endswith("Attention")
            and all(isinstance(getattr(m, name, None), torch.nn.Module) for name in ("q_proj", "k_proj"))]


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


def prepare(module: torch.nn.Module) -> AttentionPatch | str:
    """The module's :class:`AttentionPatch` (the one in place, or a new one not yet installed), or why its class
    keeps its own forward."""
    state = module.__dict__.get(STATE_ATTR)
    if state is not None:
        return state
    found = recognise(type(module))
    if isinstance(found, str):
        return found
    return AttentionPatch(*found)


def install(module: torch.nn.Module, state: AttentionPatch) -> None:
    """Put the patched forward on ``module`` (once: the second part turned on shares it)."""
    if module.__dict__.get(STATE_ATTR) is not state:
        module.__dict__[STATE_ATTR] = state  # not a Module attribute: no state_dict entry, no __setattr__
        _set_forward(module, _attention_forward)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       *args, **kwargs):
    state: AttentionPatch | None = self.__dict__.get(STATE_ATTR)
    if state is None or args or kwargs.get("output_attentions"):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, past_key_values, *args,
                                  **kwargs)
    structure, g = state.structure, state.globals
    outs = None
    if state.qkv is not None:
        outs = fused_group(state.qkv, hidden_states, state.lora_backend, state.casts)
    if outs is None:  # in the stock forward's order (a LoRA dropout draws its random numbers in that order)
        outs = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (t.view(hidden_shape) for t in outs)
    norm = structure.norm
    if norm == "inside" or (norm == "cohere" and self.use_qk_norm):
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if norm == "after":
        query, key = self.q_norm(query), self.k_norm(key)

    cos, sin = position_embeddings
    rotation = g["apply_rotary_pos_emb"]
    rotated = None
    if state.rope is not None and rotation is state.rotation:
        rotated = rope_patch.rotate(query, key, cos, sin, state.rope)
    query, key = rotated if rotated is not None else rotation(query, key, cos, sin)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    interface = g["ALL_ATTENTION_FUNCTIONS"].get_interface(self.config._attn_implementation,
                                                           g["eager_attention_forward"])
    extra = {}
    if structure.sliding == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif structure.sliding == "attr":
        extra["sliding_window"] = self.sliding_window
    if structure.softcap:
        extra["softcap"] = self.attn_logit_softcapping
    attn_output, attn_weights = interface(self, query, key, value, attention_mask,
                                          dropout=self.attention_dropout if self.training else 0.0,
                                          scaling=self.scaling, **extra, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights
