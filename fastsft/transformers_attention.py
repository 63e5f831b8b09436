"""fastsft attention for transformers models, through transformers' public ``AttentionInterface``.

``register()`` adds the implementation ``"fastsft"`` (and its mask function) to transformers; a model selects it
with ``model.set_attn_implementation("fastsft")`` or ``attn_implementation="fastsft"`` at load, and
``fastsft.patch`` does that for supported families. Its attention *backends*:

- ``triton`` and ``reference``: ``fastsft.ops.flash_attention_varlen`` on that backend (packed or dense rows, GQA,
  window, softcap);
- ``torch_varlen``: torch's ``torch.nn.attention.varlen.varlen_attn`` where the installed torch has it (CUDA,
  bf16/fp16, no softcap);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal`` (dense rows only).

:func:`resolve` orders them per case (``packed`` or ``dense`` rows) once, for a device: :data:`DEFAULT_ORDER`, or the
card table's ``attention`` section where a card measured another order (``python -m bench.bench_attention
--write-table``), less the backends that cannot run there. ``fastsft.patch`` keeps the result on every attention
module of the model; a module without one resolves it on its first call. Each call takes the first backend of its
case that takes its input (dtype, head dim, window, softcap). ``FASTSFT_BACKEND_ATTENTION=<backend>`` (or
``patch(model, backend=...)``) asks for one backend; a case it does not take (SDPA and packed rows, say) runs
fastsft's op.

What reaches the kernels without host syncs: packed rows from TRL's padding-free collator (``cu_seq_lens_q``
and ``max_length_q`` in the batch). Rows without a mask are split into sequences where their ``position_ids`` do
not step by 1, as transformers' own SDPA masks split them; that and right-padded rows cost one host sync per
forward pass (cached across layers). Left padding, holes in the mask, and decoding with a KV cache go to SDPA
with an explicit mask. Under autocast q, k and v are cast to the autocast dtype first, as autocast casts them
for SDPA.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fastsft._tensor_cache import LastTensorCache

NAME = "fastsft"
BACKENDS = ("triton", "reference", "torch_varlen", "sdpa")
KERNEL = ("triton", "reference")  # the backends that run fastsft's op
# auto's order per case: SDPA's causal kernel is the fastest on dense rows, and takes no packed ones
DEFAULT_ORDER = {"packed": ("triton", "torch_varlen", "reference"),
                 "dense": ("sdpa", "triton", "torch_varlen", "reference")}
ENV = "FASTSFT_BACKEND_ATTENTION"
DEPRECATED_ENV = "FASTSFT_ATTENTION"  # its values: fastsft (fastsft's op), torch_varlen, sdpa
# on an attention module: its AttentionPlan (set by fastsft.patch, or on the module's first call)
PLAN_ATTR = "_fastsft_attention_plan"
OP = "flash_attention_varlen"


def register() -> str:
    """Register ``"fastsft"`` with transformers' attention and mask interfaces (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, make_mask)
    return NAME


class AttentionPlan:
    """The attention of one model on one device: per case, the backends in order, and fastsft's op resolved
    (:class:`fastsft.backends.Resolved`). In ``orders`` fastsft's op is ``"fastsft"``."""

    def __init__(self, orders: dict[str, tuple[str, ...]], kernel, requested: str):
        self.orders, self.kernel, self.requested = orders, kernel, requested

    def names(self, case: str) -> list[str]:
        return [self.kernel.backend if p == "fastsft" else p for p in self.orders[case]]

    def __str__(self) -> str:
        names = {case: " > ".join(self.names(case)) for case in self.orders}
        if len(set(names.values())) == 1:
            return f"{names['packed']} (packed and dense rows)"
        return "; ".join(f"{case} {order}" for case, order in names.items())


def requested(backend: str = "auto") -> str:
    """The attention backend asked for: ``backend`` when not ``"auto"``, else ``FASTSFT_BACKEND_ATTENTION``, else
    the deprecated ``FASTSFT_ATTENTION``; ``"auto"`` when none is set."""
    if backend != "auto":
        choice, source = backend, "backend"
    elif os.environ.get(ENV):
        choice, source = os.environ[ENV].lower(), ENV
    elif os.environ.get(DEPRECATED_ENV):
        old = os.environ[DEPRECATED_ENV].lower()
        if old not in ("fastsft", "torch_varlen", "sdpa"):
            raise ValueError(f"{DEPRECATED_ENV}={old!r}: expected fastsft, torch_varlen or sdpa (and it is deprecated: "
                             f"set {ENV}=<{'|'.join(BACKENDS)}> instead)")
        if DEPRECATED_ENV not in _warned:
            _warned.add(DEPRECATED_ENV)
            warnings.warn(f"fastsft: {DEPRECATED_ENV} is deprecated; set {ENV} instead (fastsft's own kernel is "
                          f"{ENV}=triton, or reference)", FutureWarning, stacklevel=3)
        return "auto-kernel" if old == "fastsft" else old
    else:
        return "auto"
    if choice not in BACKENDS and choice != "auto":
        raise ValueError(f"{source}={choice!r}: unknown attention backend; expected 'auto' or one of {BACKENDS}")
    return choice


_warned: set = set()


def resolve(device: torch.device, backend: str = "auto") -> AttentionPlan:
    """The attention plan for ``device``: ``backend`` (or the environment) asks for one backend, else every one
    that can run here, in the measured order. ``backend`` may be an op backend (``cuda``: fastsft's op has none, so
    attention keeps ``auto``, as ``fastsft.patch(model, backend=...)`` treats every op without it)."""
    from fastsft import backends, card_table

    if backend in backends.BACKENDS and backend not in KERNEL:
        backend = "auto"
    choice = requested(backend)
    if choice in KERNEL:
        return AttentionPlan({case: ("fastsft",) for case in DEFAULT_ORDER}, backends.resolve(OP, choice, device), choice)
    kernel = backends.resolve(OP, "auto", device)  # FASTSFT_BACKEND(_FLASH_ATTENTION_VARLEN) apply here
    if kernel.explicit or choice == "auto-kernel":  # a backend asked for fastsft's op: exactly that op
        return AttentionPlan({case: ("fastsft",) for case in DEFAULT_ORDER}, kernel, kernel.request)
    if choice != "auto":
        if reason := _unavailable(choice, device):
            raise backends.BackendUnavailable(f"attention backend {choice!r} cannot run on {device}: {reason}")
        return AttentionPlan({case: (choice,) for case in DEFAULT_ORDER}, kernel, choice)
    measured = card_table.section(device, "attention")
    orders = {}
    for case, default in DEFAULT_ORDER.items():
        order = []
        for name in measured.get(case) or default:
            if name in KERNEL:
                if name in kernel.candidates and "fastsft" not in order:
                    order.append("fastsft")
            elif _unavailable(name, device) is None:
                order.append(name)
        orders[case] = tuple(order or ("fastsft",))
    return AttentionPlan(orders, kernel, "auto")


def _unavailable(name: str, device: torch.device) -> str | None:
    if name == "torch_varlen":
        if _torch_varlen() is None:
            return "this torch has no torch.nn.attention.varlen.varlen_attn"
        if device.type != "cuda":
            return "torch's varlen_attn runs on CUDA devices"
    return None


def plan_of(module, device: torch.device) -> AttentionPlan:
    """The module's plan (``fastsft.patch`` puts one on each attention module), resolved on its first call when it
    has none (a model loaded with ``attn_implementation="fastsft"``, not patched)."""
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is None:
        plan = module.__dict__[PLAN_ATTR] = resolve(device)
    return plan


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def supports(provider: str, *, device, dtype, head_dim, packed, window, softcap) -> bool:
    if provider == "fastsft":
        return head_dim <= 256 or device.type != "cuda"
    if provider == "torch_varlen":
        return (_torch_varlen() is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and softcap is None and head_dim <= 256)
    if provider == "sdpa":
        return not packed and window is None and softcap is None
    return False


# --- masks -----------------------------------------------------------------------------------------------------

def make_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """Mask function for ``"fastsft"``: like flash attention's (None, or the 2D padding mask) while queries and
    keys are the same tokens; SDPA's 4D mask when a cache makes them differ (decoding)."""
    from transformers import masking_utils

    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    if mask_function is not None:
        args["mask_function"] = mask_function
    offset = q_offset if isinstance(q_offset, int) else None
    if kv_length != q_length or offset != 0 or kv_offset != 0:
        return masking_utils.sdpa_mask(**args)
    return masking_utils.flash_attention_mask(**args)


# host syncs: once per forward pass, not per layer
_position_cache = LastTensorCache()
_padding_cache = LastTensorCache()


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch: int):
    """Sequence boundaries of rows without a mask, found as stock transformers finds them for SDPA and eager
    (``masking_utils.find_packed_sequence_indices``): a sequence starts at each row's first token and wherever a
    position does not follow the one before by 1. Tokens before a row's first 0 are thus a sequence of their own."""
    ids = position_ids.expand(batch, -1)
    starts = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] - ids[:, :-1] != 1
    first = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([first, first.new_tensor([ids.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _is_right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(-1, keepdim=True)
    expected = torch.arange(mask.shape[-1], device=mask.device)[None] < lengths
    return bool(torch.equal(mask.bool(), expected))


# --- the attention function ----------------------------------------------------------------------------------

_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)  # the dtypes autocast casts (not float64)


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _autocast_inputs(query, key, value):
    """q, k and v as stock SDPA (an autocast op) computes them: in the autocast dtype where autocast is on for
    their device. They can arrive in different dtypes: RoPE's float32 cos/sin promote a bfloat16 q and k, not v."""
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype in _AUTOCAST_CASTS else t for t in (query, key, value))


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None)."""
    query, key, value = _autocast_inputs(query, key, value)
    batch, q_heads, q_len, head_dim = query.shape
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap")
    if dropout and module.training:
        raise ValueError("fastsft attention has no dropout; set the model's attention_dropout to 0 or use 'sdpa'")
    if key.shape[2] != q_len or (attention_mask is not None and attention_mask.dim() == 4):
        return _sdpa_with_mask(module, query, key, value, attention_mask, scaling, window, softcap)

    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    packed = cu is not None
    if attention_mask is not None:  # 2D padding mask
        if not _padding_cache.get(attention_mask, _is_right_padded):
            return _sdpa_with_mask(module, query, key, value, attention_mask, scaling, window, softcap)
        # Right padding: pads come after every real token of their row, so causal rows never see them.
    elif not packed and position_ids is not None and position_ids.shape[0] in (1, batch) and q_len > 1:
        cu, max_len = _position_cache.get(position_ids, lambda ids: _cu_seqlens_from_position_ids(ids, batch), batch)
        packed = cu.numel() > batch + 1
    if not packed:
        cu = torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
        max_len = q_len

    plan = plan_of(module, query.device)
    provider = "fastsft"
    for name in plan.orders["packed" if packed else "dense"]:
        if supports(name, device=query.device, dtype=query.dtype, head_dim=head_dim, packed=packed, window=window,
                    softcap=softcap):
            provider = name
            break
    if provider == "sdpa":
        return _sdpa_dense(query, key, value, scaling)

    # [B, H, S, D] -> [B*S, H, D]: the varlen layout
    q = query.transpose(1, 2).reshape(batch * q_len, q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * q_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * q_len, value.shape[1], head_dim)
    cu = cu.to(device=query.device, dtype=torch.int32)
    # q, k and v are in the autocast dtype already; the kernels' float32 math stays float32
    with _autocast_off(query.device.type):
        if provider == "torch_varlen":
            out = torch_varlen_call(q, k, v, cu, int(max_len), scaling, window)
        else:
            from fastsft.ops import flash_attention_varlen

            out = flash_attention_varlen(q, k, v, cu, int(max_len), causal=True, softmax_scale=scaling,
                                         window=window, softcap=softcap, backend=plan.kernel)
    return out.view(batch, q_len, q_heads, head_dim), None


def torch_varlen_call(q, k, v, cu, max_len, scaling=None, window=None):
    """torch's varlen attention, causal, on [total, H, D] tensors with GQA, across its signatures: newer torch
    takes ``enable_gqa``; torch 2.11 has ``window_size`` and takes GQA natively (FlashAttention kernels)."""
    varlen_attn = _torch_varlen()
    params = _parameters(varlen_attn)
    left = -1 if window is None else window - 1
    kwargs = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (left, 0)
    elif window is not None:
        raise NotImplementedError("this torch's varlen_attn has no sliding window")
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    """The parameter names of ``fn``, read once (inspect.signature costs tens of microseconds, per layer call)."""
    import inspect

    return frozenset(inspect.signature(fn).parameters)


def _sdpa_dense(query, key, value, scaling):
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _sdpa_with_mask(module, query, key, value, attention_mask, scaling, window, softcap):
    """Decoding with a cache, left padding and other masks: SDPA with an explicit boolean mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:  # build causal (+ window) (+ key padding), queries aligned to the last keys
        qi = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        kj = torch.arange(kv_len, device=query.device)[None]
        allowed = kj <= qi
        if window is not None:
            allowed = allowed & (kj > qi - window)
        mask = allowed[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -kv_len:].bool()
    if softcap is not None:  # SDPA cannot cap the scores: plain math, as transformers' eager attention does
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = softcap * torch.tanh((query @ k.transpose(-1, -2)) * scale / softcap)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return (probs @ v).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None
