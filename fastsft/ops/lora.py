"""LoRA projections with a custom backward: one linear, N of one input (the fused QKV) and the gated MLP. PEFT's
layers are routed through them by :mod:`fastsft.patching.lora`.

A projection is ``x @ W.T + scaling * (x @ A.T) @ B.T`` with a frozen base weight ``W`` [out, in] (no gradient) and
an adapter ``A`` [r, in], ``B`` [out, r]. The fast backend (``triton``) is one ``torch.autograd.Function`` per call
that saves the input ``x`` and the small ``x @ A.T`` [tokens, r] only — never a [tokens, out] intermediate — and
orders the rank-r products so that each large GEMM runs once and the adapter adds into the base GEMM's output in
place (``addmm_``): forward ``out = x @ W.T; out += s * (x @ A.T) @ B.T``; backward ``dX = dY @ W;
dX += (s * dY @ B) @ A``, ``dA = (s * dY @ B).T @ x``, ``dB = dY.T @ (s * x @ A.T)``. The GEMMs are cuBLAS's;
the QKV concatenates the three ``A`` so ``x`` is read once for the down-projections and accumulates ``dX`` of the
three heads in one buffer. The MLP saves ``x`` and the rank-r products only and recomputes the gate and up
projections in backward; its activation (SwiGLU, GeGLU) runs in place in a Triton kernel
(``triton_kernels/lora.py``), forward and backward, so no extra [tokens, intermediate] buffer is allocated.
For ``lora_linear``, ``lora_qkv`` and ``lora_projections`` the ``triton`` backend is cuBLAS GEMMs only (no Triton
kernel pays there: ``addmm_`` already fuses the scaling and the add); it shares the backend name because the four
functions are one op, ``lora``, for backend choice (``FASTSFT_BACKEND_LORA``).

Base weights may be 4-bit: pass, instead of a tensor, an object whose ``dequantize()`` returns the dense weight
(e.g. :class:`Bnb4bitWeight`). It is dequantized into a temporary in forward and again in backward, never kept.
"""

from __future__ import annotations

import math
import weakref

import torch

from fastsft import backends
from fastsft._capture import host_caches_off
from fastsft.ops import nf4
from fastsft.reference import lora as reference

OP = "lora"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)
MLP_ACTIVATIONS = dict(reference.ACTIVATIONS)  # "swiglu" -> "silu", "geglu" -> "gelu", "geglu_tanh" -> "gelu_tanh"
# lora_mlp(compute_output=False)'s backward rows per tile: three [tile, intermediate] bf16 buffers are 96 MiB at
# Llama-3.2-1B widths (168 MiB at 8B); on an H200 2048-row tiles measured as fast as 4096-row ones at both shapes
GRADIENT_TILE_TOKENS = 2048


# --- public functions ----------------------------------------------------------------------------------------

def lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                backend: str = "auto", casts: StepCasts | None = None) -> torch.Tensor:
    """``x @ W.T + scaling * (x @ A.T) @ B.T``.

    Args:
        x: [..., in], float16/bfloat16/float32 (float64 too).
        weight: the frozen base weight [out, in] in ``x``'s dtype (``requires_grad=False``), or an object with
            ``dequantize()`` returning it (a 4-bit base; the result is cast to ``x``'s dtype).
        lora_a: [r, in], lora_b: [out, r], in ``x``'s dtype, or float32 with a float16/bfloat16 ``x`` (master
            weights, as PEFT keeps them under autocast: cast to ``x``'s dtype inside the op, as autocast would, and
            their gradients returned in float32). Their gradients are computed when they require grad.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        casts: where float32 adapters' half-precision copies may be reused (see :class:`StepCasts`; the patched
            model's); None casts them on every call.

    Returns [..., out] in ``x``'s dtype.
    """
    _check_input("lora_linear", x, scaling)
    _check_projection("lora_linear", "", x, weight, lora_a, lora_b)
    (out,) = backends.dispatch(OP, backend, x.device, "projections", x, ((weight, lora_a, lora_b),),
                               float(scaling), None, casts)
    return out


def lora_qkv(x: torch.Tensor, q: tuple, k: tuple, v: tuple, scaling: float, *, backend: str = "auto",
             casts: StepCasts | None = None):
    """The query, key and value projections of one input, each ``(W, A, B)`` as in :func:`lora_linear`.

    Returns ``(q, k, v)``, each [..., out_i] in ``x``'s dtype. ``x`` is read once for the three adapters' down
    projections, and the backward pass accumulates the input gradient of the three in one buffer.
    """
    return lora_projections(x, (q, k, v), scaling, backend=backend, casts=casts, fn="lora_qkv")


def lora_projections(x: torch.Tensor, projections, scaling: float, *, backend: str = "auto",
                     casts: StepCasts | None = None, fn: str = "lora_projections") -> tuple:
    """Any number of LoRA projections of one input (an attention module's q, k, v; an MLP's gate and up), each
    ``(W, A, B)`` as in :func:`lora_linear`, with one scaling, as one op: :func:`lora_qkv` for N projections.
    Returns their outputs, a tuple in ``projections``' order."""
    _check_input(fn, x, scaling)
    projections = tuple(projections)
    if not projections:
        raise ValueError(f"{fn}: no projections")
    names = "qkv" if len(projections) == 3 else [str(i) for i in range(len(projections))]
    projections = tuple(_triple(fn, name, p) for name, p in zip(names, projections))
    for name, p in zip(names, projections):
        _check_projection(fn, name, x, *p)
    return tuple(backends.dispatch(OP, backend, x.device, "projections", x, projections, float(scaling), None,
                                   casts))


def lora_mlp(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, scaling: float, activation: str = "swiglu", *,
             backend: str = "auto", casts: StepCasts | None = None, compute_output: bool = True,
             tile_tokens: int = GRADIENT_TILE_TOKENS) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) * up(x))`` with LoRA on all three projections, each ``(W, A, B)``.

    ``activation``: ``"swiglu"`` (Llama, Mistral, Qwen), ``"geglu"`` (exact gelu) or ``"geglu_tanh"`` (Gemma).
    The ``triton`` backend saves ``x`` and the rank-r products only (memory per token ~ hidden + 3 r, not
    intermediate) and recomputes the gate and up projections in backward. Returns [..., hidden] in ``x``'s dtype.

    ``compute_output=False`` is for a recomputation whose result is never read, only backpropagated through (a
    checkpointed decoder layer's backward, where the MLP's output only feeds the layer's discarded output): the
    returned tensor holds zeros and the forward does no work; the backward computes the gate and up projections,
    the activation and every gradient, ``tile_tokens`` rows at a time, and the down projection's forward GEMM never
    runs. The gradients are the same quantities; with the fast backend they are summed in a different order than
    the plain MLP's (rounding differs, not the math).
    """
    _check_input("lora_mlp", x, scaling)
    if not isinstance(compute_output, bool):
        raise TypeError(f"lora_mlp: compute_output must be a bool, got {compute_output!r}")
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(f"lora_mlp: tile_tokens must be a positive int, got {tile_tokens!r}")
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {tuple(MLP_ACTIVATIONS)}, got {activation!r}")
    parts = [_triple("lora_mlp", name, p) for name, p in (("gate", gate), ("up", up), ("down", down))]
    _check_projection("lora_mlp", "gate", x, *parts[0])
    _check_projection("lora_mlp", "up", x, *parts[1])
    inter = parts[0][2].shape[0]
    if parts[1][2].shape[0] != inter:
        raise ValueError(f"lora_mlp: gate and up must have one output size, got {inter} and "
                         f"{parts[1][2].shape[0]}")
    _check_projection("lora_mlp", "down", x.new_empty((0, inter)), *parts[2])
    if parts[2][2].shape[0] != x.shape[-1]:
        raise ValueError(f"lora_mlp: down must project back to {x.shape[-1]}, got {parts[2][2].shape[0]}")
    x2 = x.reshape(-1, x.shape[-1])
    kind = "mlp" if compute_output else "mlp_gradients"
    out = backends.dispatch(OP, backend, x.device, kind, x2, tuple(parts), float(scaling), activation, casts,
                            tile_tokens)
    return out.reshape(x.shape)


# --- input checks ---------------------------------------------------------------------------------------------

def _triple(fn, name, p):
    if not isinstance(p, (tuple, list)) or len(p) != 3:
        raise TypeError(f"{fn}: {name} must be a (weight, lora_a, lora_b) triple")
    return tuple(p)


def _check_input(fn, x, scaling):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"{fn}: x must be a floating tensor [..., in], got {x.dtype} of shape {tuple(x.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{fn}: scaling must be a finite number, got {scaling!r}")


def _check_projection(fn, name, x, weight, lora_a, lora_b):
    label = f"{name} " if name else ""
    for arg, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {label}{arg} must be a tensor, got {type(t).__name__}")
        if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in _HALF):
            raise TypeError(f"{fn}: {label}{arg} must have x's dtype {x.dtype} (or float32 with a float16/bfloat16 "
                            f"x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {label}{arg} is on {t.device}, x on {x.device}")
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != x.shape[-1] or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"{fn}: expected {label}lora_a [r, {x.shape[-1]}] and lora_b [out, r], got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.shape[0] < 1:
        raise ValueError(f"{fn}: {label}rank must be at least 1, got {lora_a.shape[0]}")
    if isinstance(weight, torch.Tensor):
        if weight.dtype != x.dtype:
            raise TypeError(f"{fn}: {label}weight must have x's dtype {x.dtype}, got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"{fn}: {label}weight is on {weight.device}, x on {x.device}")
        if tuple(weight.shape) != (lora_b.shape[0], x.shape[-1]):
            raise ValueError(f"{fn}: expected {label}weight [{lora_b.shape[0]}, {x.shape[-1]}], got "
                             f"{tuple(weight.shape)}")
        if weight.requires_grad:
            raise ValueError(f"{fn}: the {label}base weight must be frozen (requires_grad=False); LoRA trains "
                             "only the adapters")
    elif not callable(getattr(weight, "dequantize", None)):
        raise TypeError(f"{fn}: {label}weight must be a tensor or have a dequantize() method, got "
                        f"{type(weight).__name__}")


def _dense(weight, obj, like: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The saved dense weight, or a fresh dequantized temporary in ``like``'s dtype and device."""
    if weight is not None:
        return weight
    w = obj.dequantize()
    if tuple(w.shape) != (out_features, in_features):
        raise ValueError(f"lora: dequantize() returned {tuple(w.shape)}, expected [{out_features}, "
                         f"{in_features}]")
    return w.to(device=like.device, dtype=like.dtype)


# --- reference backend ---------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(kind, x, projections, scaling, activation, casts, tile_tokens=None):
    del casts, tile_tokens  # the reference computes in float32 or wider, untiled
    if kind == "mlp":
        return reference.lora_mlp(x, *projections, scaling, activation)
    if kind == "mlp_gradients":
        (wg, _, _), (wu, _, _), (wd, _, _) = projections

        def mlp(x, ag, bg, au, bu, ad, bd):
            return reference.lora_mlp(x, (wg, ag, bg), (wu, au, bu), (wd, ad, bd), scaling, activation)

        adapters = [t for _, a, b in projections for t in (a, b)]
        return _GradientsOnly.apply(mlp, x, *adapters)
    if len(projections) == 3:
        return reference.lora_qkv(x, *projections, scaling)
    return tuple(reference.lora_linear(x, *p, scaling) for p in projections)


class _GradientsOnly(torch.autograd.Function):
    """``fn(x, *params)`` for a result that is never read: zeros forward, and in backward ``fn`` recomputed with
    grad enabled and differentiated. The output is shaped like ``x`` (the MLP's is)."""

    @staticmethod
    def forward(ctx, fn, x, *params):
        ctx.fn = fn
        ctx.save_for_backward(x, *params)
        return x.new_zeros(()).expand(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            y = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True) if wanted else ())
        return None, *(next(grads) if t.requires_grad else None for t in inputs)


# --- fast backend: cuBLAS GEMMs, the MLP's activation in Triton -----------------------------------------------

@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(kind, x, projections, scaling, activation, casts, tile_tokens=GRADIENT_TILE_TOKENS):
    tensors, objs = [], []
    for w, a, b in projections:
        dense = isinstance(w, torch.Tensor)
        tensors += [w if dense else None, a, b]
        objs.append(None if dense else w)
    if kind in ("mlp", "mlp_gradients"):
        if x.dtype not in _KERNEL_DTYPES:
            raise backends.Unsupported(f"lora_mlp: the triton backend takes {_KERNEL_DTYPES}, got {x.dtype}; "
                            "use backend='reference' for float64")
        if kind == "mlp_gradients":
            return _LoraMlpGradients.apply(x, scaling, MLP_ACTIVATIONS[activation], tuple(objs), casts,
                                           tile_tokens, *tensors)
        return _LoraMlp.apply(x, scaling, MLP_ACTIVATIONS[activation], tuple(objs), casts, *tensors)
    return _LoraProjections.apply(x, scaling, tuple(objs), casts, *tensors)


def _split(t: torch.Tensor, sizes, dim: int = 1):
    """Blocks of ``t`` along ``dim`` (columns by default). The tensor method itself: ``torch.split``'s Python
    wrapper (symbolic-shape checks) took about as long as the GEMMs' own dispatch, on every projection."""
    return t.split_with_sizes(list(sizes), dim)


class _LoraProjections(torch.autograd.Function):
    """N LoRA projections of one input (N=1: lora_linear, N=3: lora_qkv). Saves x and s * x @ A_cat.T only.

    Host time matters here (the step is host-bound, and this runs 7 times per layer per forward): ``x`` may have
    any leading dims (the flattening happens inside, so no autograd view nodes around the op), and the frozen
    base weights and the adapters are kept on ``ctx`` rather than saved: under gradient checkpointing every saved
    tensor goes through Python pack and unpack hooks, and parameters need no saving (they outlive the step)."""

    @staticmethod
    def forward(ctx, x, scaling, objs, casts, *tensors):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        ws = tensors[0::3]
        # float32 master adapters: computed in x's dtype (as autocast would)
        as_ = [_compute_copy(a, x.dtype, casts) for a in tensors[1::3]]
        bs = [_compute_copy(b, x.dtype, casts) for b in tensors[2::3]]
        ranks = [a.shape[0] for a in as_]
        a_cat = as_[0] if len(as_) == 1 else _joined(tensors[1::3], as_, casts)
        # s * x @ A.T [T, sum r]: x is read once for every adapter; scaled here (the GEMM's alpha), so that dB in
        # backward needs no scaling of its own
        xa = _mm_scaled(x, a_cat.T, scaling)
        outs = []
        for w, obj, xa_i, b in zip(ws, objs, _split(xa, ranks), bs):
            out = x @ _dense(w, obj, x, b.shape[0], x.shape[1]).T  # a dequantized temporary dies here
            out.addmm_(xa_i, b.T)
            outs.append(out.view(*lead, out.shape[-1]))
        ctx.save_for_backward(x, xa)
        ctx.tensors, ctx.half, ctx.lead = tensors, (as_, bs, a_cat), lead
        ctx.scaling, ctx.objs, ctx.ranks = scaling, objs, ranks
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward()
        x, xa = ctx.saved_tensors
        tensors = ctx.tensors
        ws = tensors[0::3]
        params = tensors[1::3], tensors[2::3]  # in their own dtype: the gradients' dtype
        as_, bs, a_cat = ctx.half
        grads = [g if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        s, ranks = ctx.scaling, ctx.ranks
        need_x = ctx.needs_input_grad[0]
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return (None,) * (4 + len(tensors))
        # s * dY_i @ B_i for each head, side by side [T, sum r]; zero for a head whose output got no gradient
        dyb = x.new_zeros(x.shape[0], sum(ranks)) if len(live) < len(grads) else None
        parts = []
        for i, g in enumerate(grads):
            if g is not None:
                part = _mm_scaled(g, bs[i], s)
                if dyb is not None:
                    dyb[:, sum(ranks[:i]):sum(ranks[:i + 1])] = part
                parts.append(part)
        if dyb is None:
            dyb = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        dx = None
        if need_x:
            for i in live:  # dX of all heads in one buffer
                w = _dense(ws[i], ctx.objs[i], x, bs[i].shape[0], x.shape[1])
                if dx is None:
                    dx = grads[i] @ w
                else:
                    dx.addmm_(grads[i], w)
                del w
            dx.addmm_(dyb, a_cat)
            dx = dx.view(*ctx.lead, dx.shape[-1])
        da_cat = _mm(dyb.T, x, params[0][0].dtype) if any(ctx.needs_input_grad[5::3]) else None
        da = _split(da_cat, ranks, 0) if da_cat is not None else [None] * len(ranks)
        out = [dx, None, None, None]
        xa_parts = _split(xa, ranks)
        for i in range(len(grads)):
            need_a, need_b = ctx.needs_input_grad[4 + 3 * i + 1], ctx.needs_input_grad[4 + 3 * i + 2]
            db = None
            if need_b and grads[i] is not None:
                db = _mm(grads[i].T, xa_parts[i], params[1][i].dtype)  # xa holds s * x @ A.T
            elif need_b:
                db = torch.zeros_like(params[1][i])
            out += [None, _as_dtype(da[i], params[0][i]) if need_a else None, db]
        return tuple(out)


def _gated_kernels():
    """The Triton module of the MLP's in-place activation (imported on first use: Triton is optional)."""
    from fastsft.triton_kernels import lora as kernels

    return kernels


class _LoraMlp(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with adapters; saves x, x @ [A_g; A_u].T and h @ A_d.T only."""

    @staticmethod
    def forward(ctx, x, scaling, activation, objs, casts, wg, *params):
        ag, bg, wu, au, bu, wd, ad, bd = params
        ag, bg, au, bu, ad, bd = (_compute_copy(t, x.dtype, casts) for t in (ag, bg, au, bu, ad, bd))
        rg = ag.shape[0]
        inter = bg.shape[0]
        agu = torch.cat((ag, au))
        xa = x @ agu.T  # [T, rg + ru]
        g = _project(x, _dense(wg, objs[0], x, inter, x.shape[1]), xa[:, :rg], bg, scaling)
        u = _project(x, _dense(wu, objs[1], x, inter, x.shape[1]), xa[:, rg:], bu, scaling)
        _gated_kernels().lora_gated_forward(g, u, activation)  # g <- act(g) * u, in place
        del u
        h = g
        ha = h @ ad.T  # [T, rd]
        y = h @ _dense(wd, objs[2], h, x.shape[1], inter).T
        y.addmm_(ha, bd.T, alpha=scaling)
        ctx.save_for_backward(x, xa, ha, wg, *params)  # the adapters as given (their dtype: the gradients')
        ctx.half = (ag, bg, au, bu, ad, bd)  # as in _LoraProjections: kept, not saved
        ctx.scaling, ctx.activation, ctx.objs = scaling, activation, objs
        return y

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward()
        x, xa, ha, wg, *params = ctx.saved_tensors
        # inputs: x 0, scaling 1, activation 2, objs 3, casts 4, wg 5, ag 6, bg 7, wu 8, au 9, bu 10, wd 11,
        # ad 12, bd 13
        need = ctx.needs_input_grad
        want = {"x": need[0], "a": need[6] or need[9], "bg": need[7], "bu": need[10], "ad": need[12], "bd": need[13]}
        ag, _, au, _, _, _ = ctx.half
        g = _mlp_rows_backward(x, xa, ha, dy, wg, params, ctx.half, torch.cat((ag, au)), ctx, want)
        rg = ag.shape[0]
        dag = g["a"][:rg] if need[6] else None
        dau = _as_dtype(g["a"][rg:], params[3]) if need[9] else None
        return (g.get("x"), None, None, None, None, None, dag, g.get("bg"), None, dau, g.get("bu"), None, g.get("ad"),
                g.get("bd"))


def _mlp_rows_backward(x, xa, ha, dy, wg, params, half, agu, ctx, want, dx=None) -> dict:
    """The LoRA MLP's gradients over rows ``x`` given ``dy``: the gate and up projections recomputed from
    ``xa = x @ [A_g; A_u].T`` (unscaled), the activation's backward in place. ``ha = h @ A_d.T``, or None to take
    it from the recomputed ``h``. ``want``: which of ``x``, ``a`` (A_g and A_u side by side), ``bg``, ``bu``, ``ad``,
    ``bd`` to compute; ``dx``: rows to write the input gradient into (else a new tensor). ``params``, ``half``,
    ``ctx``: as ``_LoraMlp`` keeps them (the adapters as given, their compute copies, scaling, activation, objs)."""
    p_ag, p_bg, wu, p_au, p_bu, wd, p_ad, p_bd = params
    ag, bg, au, bu, ad, bd = half
    s, objs = ctx.scaling, ctx.objs
    rg, inter, hidden = ag.shape[0], bg.shape[0], x.shape[1]
    out = {}
    dyb = _mm_scaled(dy, bd, s)  # [T, rd]
    # d h = dY @ W_d + (s dY @ B_d) @ A_d
    dh = dy @ _dense(wd, objs[2], dy, hidden, inter)
    dh.addmm_(dyb, ad)
    # dequantized (4-bit) weights live from here to dX: each is dequantized once per call
    wg, wu = _dense(wg, objs[0], x, inter, hidden), _dense(wu, objs[1], x, inter, hidden)
    g = _project(x, wg, xa[:, :rg], bg, s)  # recomputed, not saved
    u = _project(x, wu, xa[:, rg:], bu, s)
    _gated_kernels().lora_gated_backward(dh, g, u, ctx.activation)  # g <- dg, u <- du, dh <- h
    h, dg, du = dh, g, u
    if want["ad"]:
        out["ad"] = _mm(dyb.T, h, p_ad.dtype)
    if want["bd"]:
        out["bd"] = _mm_scaled(dy.T, h @ ad.T if ha is None else ha, s, p_bd.dtype)
    del h, dh
    dgub = torch.cat((_mm_scaled(dg, bg, s), _mm_scaled(du, bu, s)), dim=1)  # [T, rg + ru]
    if want["x"]:
        if dx is None:
            dx = dg @ wg
        else:
            torch.mm(dg, wg, out=dx)
        dx.addmm_(du, wu)
        dx.addmm_(dgub, agu)
        out["x"] = dx
    del wg, wu
    if want["a"]:
        out["a"] = _mm(dgub.T, x, p_ag.dtype)
    if want["bg"]:
        out["bg"] = _mm_scaled(dg.T, xa[:, :rg], s, p_bg.dtype)
    if want["bu"]:
        out["bu"] = _mm_scaled(du.T, xa[:, rg:], s, p_bu.dtype)
    return out


class _LoraMlpGradients(torch.autograd.Function):
    """``lora_mlp(compute_output=False)``: forward keeps ``x`` and returns zeros; backward computes, in row tiles,
    the gate and up projections, the activation and the gradients of ``_LoraMlp`` (the same GEMMs but the down
    projection's forward, whose result only the unread output needed). Per-tile adapter gradients are summed in
    float32 (or wider) and rounded once."""

    @staticmethod
    def forward(ctx, x, scaling, activation, objs, casts, tile_tokens, wg, *params):
        ag, bg, wu, au, bu, wd, ad, bd = params
        ctx.half = tuple(_compute_copy(t, x.dtype, casts) for t in (ag, bg, au, bu, ad, bd))
        ctx.save_for_backward(x, wg, *params)
        ctx.scaling, ctx.activation, ctx.objs, ctx.tile_tokens = scaling, activation, objs, tile_tokens
        return x.new_zeros(()).expand(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        _no_double_backward()
        x, wg, *params = ctx.saved_tensors
        # inputs: x 0, scaling 1, activation 2, objs 3, casts 4, tile_tokens 5, wg 6, ag 7, bg 8, wu 9, au 10,
        # bu 11, wd 12, ad 13, bd 14
        need = ctx.needs_input_grad
        want = {"x": need[0], "a": need[7] or need[10], "bg": need[8], "bu": need[11], "ad": need[13], "bd": need[14]}
        ag, _, au, _, _, _ = ctx.half
        agu = torch.cat((ag, au))
        dx = torch.empty_like(x) if need[0] else None
        rows, tile = x.shape[0], ctx.tile_tokens
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, rows, tile):
            xt, dyt = x[start:start + tile], dy[start:start + tile]
            grads = _mlp_rows_backward(xt, xt @ agu.T, None, dyt, wg, params, ctx.half, agu, ctx, want,
                                       dx[start:start + tile] if dx is not None else None)
            for name, g in grads.items():
                if name == "x":
                    continue
                if rows <= tile:
                    sums[name] = g
                elif name not in sums:
                    sums[name] = g.to(torch.promote_types(g.dtype, torch.float32))
                else:
                    sums[name] += g
        rg = ag.shape[0]
        dag = _as_dtype(sums["a"][:rg], params[0]) if need[7] else None
        dau = _as_dtype(sums["a"][rg:], params[3]) if need[10] else None
        dbg, dbu = _as_dtype(sums.get("bg"), params[1]), _as_dtype(sums.get("bu"), params[4])
        dad, dbd = _as_dtype(sums.get("ad"), params[6]), _as_dtype(sums.get("bd"), params[7])
        return dx, None, None, None, None, None, None, dag, dbg, None, dau, dbu, None, dad, dbd


def _mm_scaled(a, b, scaling, dtype=None):
    """``scaling * (a @ b)`` as one GEMM (cuBLAS's alpha) instead of a GEMM and a separate scaling kernel: with
    ``beta=0`` the 0-d ``input`` is never read. The training step is host-bound, so each launch saved counts.
    ``dtype``: the result's, when it differs from the inputs' (a float32 gradient of a float32 master adapter)."""
    if dtype is None or dtype == a.dtype:
        return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)
    return _mm(a, b, dtype).mul_(scaling)


_OUT_DTYPE_GEMM = {"ok": None}  # cuBLAS half x half -> float32 GEMMs (torch.mm's out_dtype): None until tried


def _mm(a, b, dtype):
    """``a @ b`` with the result in ``dtype``: on a CUDA device one GEMM that writes float32 directly from its
    float32 accumulators (torch's ``out_dtype``), elsewhere (or on a torch without it) a GEMM and a cast."""
    if dtype == a.dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32 and a.dtype in _HALF and _OUT_DTYPE_GEMM["ok"] is not False:
        try:
            out = torch.mm(a, b, out_dtype=dtype)
        except torch.OutOfMemoryError:
            raise  # not a missing feature
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_GEMM["ok"] = False
        else:
            _OUT_DTYPE_GEMM["ok"] = True
            return out
    return (a @ b).to(dtype)


def _as_dtype(t, like):
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


class StepCasts:
    """Half-precision copies of float32 adapter weights, reused within one training step.

    PEFT keeps adapters in float32 under bf16/fp16 autocast and casts them at every use: the forward, then the
    forward again when gradient checkpointing recomputes a layer in backward, then each gradient back to float32
    (6 cast launches and 2 autograd nodes per projection and step; 1,344 per Llama-8B step). The fused ops take
    the float32 weights themselves, get their half copies here and return float32 gradients.

    ``new_step`` runs at each forward of the patched model's decoder stack (a forward pre-hook; checkpointing's
    recomputation runs single layers, not the stack). It refreshes every copy made so far in one multi-tensor
    copy, from the weights as they are now, so a weight updated between steps is never served stale, even when
    the update bumps no tensor version (bitsandbytes' 8-bit optimizers write through raw pointers). Within a
    step a copy is remade when its weight's version or storage changed. The refresh writes into last step's
    copies: a graph of that step still awaiting its backward (two forwards, then both backwards) sees the weights
    of the new step, which are the same unless something changed them in between. Under ``torch.inference_mode()``
    nothing is kept: each call casts afresh, as PEFT does; so too while a graph is captured (the cast is then part
    of the graph, and every replay casts the weights as they are at that time) and in the eager run that warms the
    graph up before its capture."""

    def __init__(self):
        self._copies: dict = {}  # this step's: key -> (weakref to the weight, version, data_ptr, copy)
        self._buffers: dict = {}  # kept across steps: key -> (weakref to the weight, copy)

    def clear(self) -> None:
        """Drop every copy (the model was unpatched)."""
        self._copies, self._buffers = {}, {}

    def new_step(self, *_):
        # Runs once per step over every adapter weight (448 at the 8B shape), on the host while the GPU waits:
        # plain attribute reads, one multi-tensor copy, and the weights read as they are (no detach: no grad mode)
        self._copies = copies = {}
        srcs, bufs = [], []
        for key, (ref, buf) in list(self._buffers.items()):
            src = ref()
            if src is None or src.shape != buf.shape or src.device != buf.device:
                del self._buffers[key]
            elif src.untyped_storage().nbytes() >= (src.storage_offset() + src.numel()) * src.element_size():
                srcs.append(src)
                bufs.append(buf)
                copies[key] = (ref, src._version, src.data_ptr(), buf)
            # else: no memory behind the weight now (FSDP2 frees an unsharded parameter's storage between uses):
            # its copy is made again by get(), when the weight is there
        if srcs:
            with torch.no_grad():
                torch._foreach_copy_(bufs, srcs)

    def get(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if torch.is_inference_mode_enabled() or host_caches_off(t):
            # an inference tensor has no version to key on and cannot be refreshed in place after inference mode;
            # a graph being captured casts in the graph, so that each replay reads the weights as they are then
            # (and the eager run before its capture keeps nothing either: the graph does not read it)
            return t.detach().to(dtype)
        key = (id(t), dtype)
        hit = self._copies.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == t.data_ptr():
            return hit[3]
        copy = t.detach().to(dtype)  # a new tensor: the last step's copy may still be in a graph awaiting backward
        self._copies[key] = (weakref.ref(t), t._version, t.data_ptr(), copy)
        self._buffers[key] = (weakref.ref(t), copy)
        return copy

    def joined(self, params, halves) -> torch.Tensor:
        """``torch.cat(halves)``, the half copies of ``params`` side by side, made once per step."""
        if torch.is_inference_mode_enabled() or host_caches_off(halves[0]):
            return torch.cat(halves)
        key = ("cat", *map(id, params))
        versions = tuple(h._version for h in halves)
        hit = self._copies.get(key)
        if hit is not None and hit[1] == versions and all(h is c for h, c in zip(hit[0], halves)):
            return hit[2]
        joined = torch.cat(halves)
        self._copies[key] = (tuple(halves), versions, joined)
        return joined


def _joined(params, halves, casts: StepCasts | None):
    """``torch.cat(halves)`` (the adapters' A of one group), made once per step with ``casts``."""
    return torch.cat(halves) if casts is None else casts.joined(params, halves)


def _compute_copy(t, dtype, casts: StepCasts | None):
    """``t`` in ``dtype`` for computing, outside autograd (a copy from ``casts`` when given)."""
    if t.dtype == dtype:
        return t
    return casts.get(t, dtype) if casts is not None else t.detach().to(dtype)


def _project(x, w, xa, b, scaling):
    """``x @ W.T + scaling * xa @ B.T``, the adapter added in place into the base GEMM's output."""
    out = x @ w.T
    out.addmm_(xa, b.T, alpha=scaling)
    return out


# --- bitsandbytes 4-bit base weights ----------------------------------------------------------------------------

class Bnb4bitWeight:
    """A bitsandbytes 4-bit (NF4/FP4) ``Params4bit`` seen as a base weight: ``dequantize()`` gives the dense
    [out, in] weight in the quantization state's dtype, a fresh temporary each call.

    NF4 runs :func:`fastsft.ops.nf4.dequantize_nf4` on ``backend`` (bit-exact to bitsandbytes), with its arguments
    read from the quantization state once, here: the nested absmax offset is a device scalar, and reading it is a
    host sync. FP4, and NF4 states that op does not take, run bitsandbytes' ``dequantize_4bit``."""

    def __init__(self, param, backend="auto"):
        self.param, self.backend = param, backend
        self._nf4 = _nf4_arguments(param)

    @property
    def shape(self):
        return tuple(self.param.quant_state.shape)

    def with_backend(self, backend) -> Bnb4bitWeight:
        """This weight on another NF4 backend, the quantization state read by this one reused."""
        other = object.__new__(Bnb4bitWeight)
        other.param, other.backend, other._nf4 = self.param, backend, self._nf4
        return other

    def for_lora(self, backend) -> Bnb4bitWeight:
        """This weight dequantizing for a LoRA call on ``backend``: a name or a model's plan is the NF4 op's as it
        is, a resolved selection of the LoRA op gives what it was asked. Itself when that is its backend already."""
        if isinstance(backend, backends.Resolved) and backend.op != nf4.OP:
            backend = backend.request
        return self if backend is self.backend else self.with_backend(backend)

    def dequantize(self) -> torch.Tensor:
        if self._nf4 is not None:
            return nf4.dequantize_nf4(self.param.data, **self._nf4, backend=self.backend)
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(self.param.data, self.param.quant_state)


def _nf4_arguments(param) -> dict | None:
    """The keyword arguments of ``dequantize_nf4`` but ``packed`` for a bitsandbytes ``Params4bit`` (what
    ``fastsft.ops.nf4.from_bnb`` reads, without importing bitsandbytes), or None when its state is not NF4 in a
    form that op takes."""
    state = param.quant_state
    if getattr(state, "quant_type", None) != "nf4" or state.dtype not in nf4.OUT_DTYPES:
        return None
    if int(state.blocksize) not in nf4.BLOCKSIZES:
        return None
    nested = None
    if state.nested:
        s2, offset = state.state2, state.offset
        nested = nf4.NestedAbsmax(s2.absmax, s2.code, int(s2.blocksize),
                                  float(offset.item() if isinstance(offset, torch.Tensor) else offset))
    code = state.code if isinstance(state.code, torch.Tensor) and state.code.numel() == 16 else None
    if code is not None:
        code = code.to(device=param.device, dtype=torch.float32)
    return {"absmax": state.absmax, "shape": tuple(state.shape), "dtype": state.dtype,
            "blocksize": int(state.blocksize), "code": code, "nested": nested}


def _no_double_backward():
    """A backward pass with create_graph=True would return gradients without a graph of their own: second
    derivatives silently zero or missing. Raised instead; the reference backend has a double backward."""
    if torch.is_grad_enabled():
        raise RuntimeError("lora: the fast backends have no double backward (create_graph=True); use "
                           "backend='reference'")
