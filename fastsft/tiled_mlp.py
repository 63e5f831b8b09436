"""Sequence-tiled MLP: a decoder layer's MLP computed in row tiles, so its [tokens, intermediate] activations exist
for one tile at a time.

At long context the MLP is the largest consumer of activation memory: at Llama-3.1-8B shapes and 350k tokens its
gate, up and activation-product tensors are ~10 GB each in bf16, alive in the forward and again in checkpointing's
recompute and the backward. The MLP works on each token's row alone, so it can run on ``tile_tokens`` rows at a
time: the forward runs each tile without a graph and writes into one preallocated output, and only the MLP's input
is saved. The backward recomputes one tile's forward with grad enabled, takes its gradients with
``torch.autograd.grad``, writes that tile's input gradient and adds up the parameter gradients, then frees the
tile's graph before the next. The price is one more forward of each MLP per step; gradient checkpointing's
recompute reruns the tiled forward (without a graph) just as it would rerun the untiled one.

The trainable parameters (LoRA A/B) are passed to the autograd Function as inputs, so their gradients reach
``.grad`` through autograd's own accumulation, once per backward (as DDP's hooks expect). Per-tile parameter
gradients are summed in float32 (or the parameter's dtype where that is wider) and cast once at the end: the
untiled backward sums over all tokens inside one GEMM with a float32 accumulator and rounds once, and adding
bf16 partial sums would round once per tile on top.

Dropout (LoRA dropout > 0) is supported: like ``torch.utils.checkpoint`` with ``preserve_rng_state``, the CPU RNG
state (and the CUDA one of the input's device) is saved before each tile's forward and restored for its recompute,
so the backward sees the forward's masks. The autocast state of the forward is re-entered for the recompute too.
The masks differ from an untiled forward's for the same seed (they are drawn tile by tile), not in distribution.

Installing it: each MLP instance gets a subclass of its own class whose ``forward`` is a data descriptor. Reading
``mlp.forward`` gives the tiled forward, which calls whatever forward the instance holds underneath: its
``__dict__["forward"]`` (fastsft.patch's fused LoRA MLP, say) or the class's. Writes and deletes of
``mlp.forward`` go to the instance ``__dict__``, below the tiling, so ``fastsft.patch``/``unpatch``/``refresh`` (which
set and restore instance forwards) keep working in either order, and ``type(mlp).forward`` is still the original
class's function (what a patched forward falls back to). :func:`disable_tiled_mlp` puts the original class back;
the instance ``__dict__`` is never touched by it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch

from fastsft.patching.modules import _mlp_modules

__all__ = ["DEFAULT_TILE_TOKENS", "enable_tiled_mlp", "disable_tiled_mlp"]

# 8192 rows at Llama-3.1-8B widths (intermediate 14336) is 224 MiB per [tile, intermediate] tensor in bf16, and
# GEMMs of that many rows still run at full speed; the tiled call's fixed cost is one more forward per tile.
DEFAULT_TILE_TOKENS = 8192
# Instance attribute holding the tile size; class attribute pointing a tiled class at its original
_TILE_ATTR = "_fastsft_tile_tokens"
_BASE_ATTR = "_fastsft_untiled_class"


# --- the autograd Function --------------------------------------------------------------------------------------

def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _restored_rng(state, device: torch.device):
    """Run with the RNG state from before a tile's forward, leaving the caller's state untouched afterwards."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _autocast_state(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()


def _autocast(device_type: str, state):
    if state is None:
        return contextlib.nullcontext()
    dtype, cache = state
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache)


def _tiles(rows: int, tile_tokens: int):
    return [(start, min(start + tile_tokens, rows)) for start in range(0, rows, tile_tokens)]


def _tile_input(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A tile of rows shaped like ``x`` ([1, ..., 1, tile, hidden]): forwards that expect [batch, seq, hidden] get
    that."""
    return rows.reshape(*(1,) * (x.dim() - 2), *rows.shape)


def _forward_tiles(run, x: torch.Tensor, tile_tokens: int, rng_states: list | None) -> torch.Tensor:
    """``run`` over ``x`` in row tiles, written into one output; appends each tile's RNG state to ``rng_states``."""
    rows = x.reshape(-1, x.shape[-1])
    out = flat = None
    for start, stop in _tiles(rows.shape[0], tile_tokens):
        if rng_states is not None:
            rng_states.append(_rng_state(x.device))
        tile = _tile_input(x, rows[start:stop])
        y = run(tile)
        if not isinstance(y, torch.Tensor) or y.dim() != tile.dim() or y.shape[:-1] != tile.shape[:-1]:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"tiled MLP: the MLP mapped a tile of shape {tuple(tile.shape)} to {got}; tiling needs "
                            f"one output row per input row (disable_tiled_mlp for this model)")
        if out is None:
            out = y.new_empty(*x.shape[:-1], y.shape[-1])
            flat = out.view(-1, y.shape[-1])
        flat[start:stop] = y.reshape(stop - start, -1)
    return out


class _TiledMLP(torch.autograd.Function):
    """``run(x)`` in row tiles of ``tile_tokens``; saves ``x`` (and the per-tile RNG states) only. ``params`` are
    the trainable parameters ``run`` uses: they are inputs here so that their gradients are routed by autograd."""

    @staticmethod
    def forward(ctx, run, x, tile_tokens, *params):
        ctx.rng_states = []
        with torch.no_grad():
            out = _forward_tiles(run, x, tile_tokens, ctx.rng_states)
        ctx.run, ctx.tile_tokens = run, tile_tokens
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if need_x else None
        sums = [None] * len(wanted)
        device_type = x.device.type
        for (start, stop), rng in zip(_tiles(rows.shape[0], ctx.tile_tokens), ctx.rng_states, strict=True):
            # a leaf of its own: the tile's graph ends here, and is freed when this iteration's grad is taken
            tile = _tile_input(x, rows[start:stop]).detach().requires_grad_(need_x)
            with torch.enable_grad(), _autocast(device_type, ctx.autocast), _restored_rng(rng, x.device):
                y = ctx.run(tile)
            inputs = ([tile] if need_x else []) + [params[i] for i in wanted]
            grads = torch.autograd.grad(y, inputs, grad_rows[start:stop].reshape(y.shape), allow_unused=True)
            if need_x:
                if grads[0] is None:  # an MLP whose output does not depend on its input
                    dx[start:stop] = 0
                else:
                    dx[start:stop] = grads[0].reshape(stop - start, -1)
                grads = grads[1:]
            for k, g in enumerate(grads):
                if g is None:
                    continue
                if sums[k] is None:
                    # a fresh tensor from autograd.grad (or its float32 copy), so adding into it in place is safe
                    sums[k] = g.to(torch.promote_types(g.dtype, torch.float32))
                else:
                    sums[k] += g
        param_grads = [None] * len(params)
        for k, i in enumerate(wanted):
            if sums[k] is not None:
                param_grads[i] = sums[k].to(params[i].dtype)
        return None, dx.view(x.shape) if need_x else None, None, *param_grads


# --- the instance forward ------------------------------------------------------------------------------------------

# ids of the MLPs whose underlying forward is running now (per thread: the backward may run on another thread)
_running = threading.local()


def _running_ids() -> set:
    if not hasattr(_running, "ids"):
        _running.ids = set()
    return _running.ids


def _call_inner(module, inner, *args, **kwargs):
    ids = _running_ids()
    ids.add(id(module))
    try:
        return inner(*args, **kwargs)
    finally:
        ids.discard(id(module))


def _tiled_forward(self, x, *args, **kwargs):
    base = getattr(type(self), _BASE_ATTR)
    if id(self) in _running_ids():
        # Re-entered from the forward underneath: a wrapper installed by reading ``module.forward`` (accelerate's
        # hooks do) holds this tiled forward and calls it from inside; the class's forward is what it wrapped.
        return base.forward(self, x, *args, **kwargs)
    inner = self.__dict__.get("forward") or types.MethodType(base.forward, self)
    run = functools.partial(_call_inner, self, inner)
    tile_tokens = self.__dict__[_TILE_ATTR]
    if (args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.shape[-1]
            or x.numel() // x.shape[-1] <= tile_tokens):
        return run(x, *args, **kwargs)
    if torch.is_grad_enabled():
        params = [p for p in self.parameters() if p.requires_grad]
        if x.requires_grad or params:
            return _TiledMLP.apply(run, x, tile_tokens, *params)
    return _forward_tiles(run, x, tile_tokens, None)  # nothing to differentiate: no graph, no saved input


class _ForwardSlot:
    """``forward`` of a tiled class. A data descriptor wins over the instance ``__dict__``, so reading gives the
    tiled forward whatever instance forward is set, and setting or deleting lands in the ``__dict__`` beneath it."""

    def __get__(self, obj, cls=None):
        if obj is None:  # ``type(mlp).forward(mlp, x)``: the original class's forward, as a patched forward expects
            return getattr(cls, _BASE_ATTR).forward
        return types.MethodType(_tiled_forward, obj)

    def __set__(self, obj, value):
        obj.__dict__["forward"] = value

    def __delete__(self, obj):
        if obj.__dict__.pop("forward", None) is None:
            raise AttributeError("forward")


_TILED_CLASSES: dict[type, type] = {}


def _tiled_class(cls: type) -> type:
    tiled = _TILED_CLASSES.get(cls)
    if tiled is None:
        # the same name, so the model's repr and name-based lookups (no-split or keep-in-fp32 lists) are unchanged
        tiled = type(cls.__name__, (cls,), {"forward": _ForwardSlot(), _BASE_ATTR: cls, "__module__": __name__,
                                             "__qualname__": cls.__qualname__})
        _TILED_CLASSES[cls] = tiled
    return tiled


# --- public API ----------------------------------------------------------------------------------------------------

def _check_model(fn: str, model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: int = DEFAULT_TILE_TOKENS) -> str:
    """Compute every gated MLP of ``model`` (a transformers model, PEFT-wrapped or not) in tiles of ``tile_tokens``
    rows (tokens of all sequences of the call together); calls of at most ``tile_tokens`` rows run the MLP as before.
    The MLP's current forward is kept underneath (fastsft.patch may come before or after). Enabling again changes
    the tile size. Returns a one-line report."""
    _check_model("enable_tiled_mlp", model)
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int):
        raise TypeError(f"tile_tokens must be a positive int, got {tile_tokens!r}")
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be a positive int, got {tile_tokens}")
    mlps = _mlp_modules(model)
    if not mlps:
        raise LookupError(f"tiled MLP: no gated MLP modules (gate_proj, up_proj, down_proj, act_fn) in "
                          f"{type(model).__name__}")
    for mlp in mlps:
        if getattr(type(mlp), _BASE_ATTR, None) is None:
            mlp.__class__ = _tiled_class(type(mlp))
        setattr(mlp, _TILE_ATTR, tile_tokens)
    return f"tiled MLP: {len(mlps)} MLPs in tiles of {tile_tokens} tokens"


def tiled_mlp_count(model: torch.nn.Module) -> int:
    """How many MLPs of ``model`` are tiled now."""
    _check_model("tiled_mlp_count", model)
    return sum(getattr(type(m), _BASE_ATTR, None) is not None for m in model.modules())


def disable_tiled_mlp(model: torch.nn.Module) -> int:
    """Put every tiled MLP of ``model`` back to its own class (its instance forward, if any, is as it is now).
    Returns how many MLPs were tiled."""
    _check_model("disable_tiled_mlp", model)
    count = 0
    for module in model.modules():
        base = type(module).__dict__.get(_BASE_ATTR)
        if base is None:
            continue
        module.__class__ = base
        module.__dict__.pop(_TILE_ATTR, None)
        count += 1
    return count
