"""Captured decoder layers: a checkpointed training step in which each decoder layer costs the host one graph replay.

With gradient checkpointing a decoder layer runs twice per step: its forward, keeping only its input, and in
backward its recomputation followed by its backward. Each of these launches a few hundred small kernels from
Python, and on one GPU the host's launching, not the GPU, sets the pace of a 1B or 8B LoRA step. Here each layer's
two halves are captured once as CUDA graphs and replayed at every later step:

- the *forward graph* runs the layer without keeping activations (what checkpointing keeps is the layer's input,
  which stays in a static buffer until the backward);
- the *backward graph* recomputes the layer from that input and runs its backward: the input gradient and the
  gradients of the layer's trainable parameters (the adapters), which autograd then accumulates as usual.

Graphs have fixed shapes; packed batches do not. A batch of ``n`` tokens in ``s`` sequences (TRL's padding-free
collator: ``cu_seq_lens_q`` and ``max_length_q`` in the batch) runs on graphs of a token budget ``T >= n``, at most
``S`` sequences and a longest sequence of ``L``: the hidden states are padded with zero rows up to ``T``, the padding
is split into sequences of at most ``L`` tokens of their own (no real token attends to it, and it attends to
nothing real), and ``cu_seqlens`` is padded to ``S + 1`` entries with empty sequences. Layer outputs and input
gradients are sliced back to ``n`` rows, so nothing outside the layers sees the padding: the loss, the labels and
the token counts are those of the batch. One set of graphs thus serves every batch that fits; a batch that does not
fit is captured anew, on larger bounds (at most ``max_captures`` times), and after that runs eagerly.

With offloaded checkpointing (:mod:`fastsft.offload_checkpointing` is the layers' checkpointing function) the
layer inputs are not kept on the device: the layers write their outputs into two buffers in turn, and each layer's
input is copied to pinned host memory on a side stream while the layer runs (the layer after next, which
overwrites that buffer, waits for the copy). In backward, layer ``i``'s input is copied back into one of two
recompute buffers while layer ``i + 1`` runs its backward. Seven token-sized buffers stay on the device instead
of one per layer, and the graphs compute exactly what the kept-input graphs compute.

The backward graph recomputes the layer only to differentiate it: the value of the layer's output is never read.
In the layers that end in ``residual + mlp(norm(h))`` (Llama, Mistral, Qwen2, Qwen3, Gemma) fastsft's fused LoRA
MLP therefore computes its gradients alone there (``fastsft.ops.lora_mlp(compute_output=False)``): its forward
returns zeros, its backward recomputes the gate and up projections and takes every gradient in row tiles. One GEMM
of the MLP's three (the down projection's forward) is not run, and no [tokens, intermediate] activation exists
outside the MLP's backward. ``mlp_gradients_only=False`` recomputes the MLP as the eager layer does.

What is not captured runs the eager checkpointed layer, with one log line per reason: rows that are not packed,
a KV cache or a mask, hooks on the layer (accelerate's offloading, transformers' output recording), dropout in
training, checkpointing functions other than torch's and fastsft's offloaded one, a second forward before the
first one's backward, a capture that fails. The layer's outputs are views of the graphs' static buffers, valid
until the layer's next training forward (with offloading: until the forward of the layer after next): the
decoder loop consumes each at once.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import traceback
import weakref
from contextlib import nullcontext

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from fastsft import _capture
from fastsft.offload_checkpointing import OffloadedCheckpoint
from fastsft.ops.lora import GRADIENT_TILE_TOKENS

__all__ = ["CapturedLayers", "enable_captured_layers", "disable_captured_layers", "captured_layers_of"]

logger = logging.getLogger(__name__)

ATTR = "_fastsft_captured_layers"  # on the decoder stack (the model's base_model): its CapturedLayers
_CU_NAMES = ("cu_seq_lens_q", "cu_seq_lens_k")
_MAX_NAMES = ("max_length_q", "max_length_k")
_TOKEN_ROUND = 256  # an inferred token budget is the first batch's token count rounded up to this
_MIN_SEQUENCES = 32


class _NotCaptured(Exception):
    """Why a call runs eagerly: ``reason`` (counted, logged once) and what this call showed of it."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# --- graphs ----------------------------------------------------------------------------------------------------

class _CudaGraph:
    """A CUDA graph of ``body``: captured once on the set's side stream and memory pool, replayed on the current
    stream. ``body`` runs once eagerly before the capture (Triton compiles, cuBLAS sets up its workspace), with
    host-side caches off as under the capture (:func:`fastsft._capture.warming_up`)."""

    def __init__(self, body, pool, stream):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _capture.warming_up():
            body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: a data loader's pin-memory thread may allocate host memory meanwhile
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.result = body()

    def replay(self):
        self.graph.replay()


class _EmulatedGraph:
    """The CPU stand-in for :class:`_CudaGraph`, for tests: ``replay`` runs ``body`` again and writes what it
    returns into the tensors of the first run, so callers see the same static buffers as with a CUDA graph, and
    :func:`fastsft._capture.capturing` is True inside (host-side caches stay out, as they do under capture)."""

    def __init__(self, body, pool=None, stream=None):
        del pool, stream
        self.body = body
        with _capture.emulated():
            self.result = body()

    def replay(self):
        with _capture.emulated():
            new = self.body()
        for old, fresh in zip(pytree.tree_leaves(self.result), pytree.tree_leaves(new)):
            if isinstance(old, torch.Tensor):
                old.copy_(fresh)


GRAPHS = {"cuda": _CudaGraph, "emulated": _EmulatedGraph}


# --- static inputs ---------------------------------------------------------------------------------------------

class _Slot:
    """The static copy of one tensor argument, shared by the layers that received the same tensor when they were
    captured (position embeddings, position ids: one object for every layer of a forward). Token tensors
    ([1, n, ...]) are padded with zeros to the budget's rows."""

    def __init__(self, like: torch.Tensor, tokens: int | None):
        self.tokens = tokens
        shape = (1, tokens, *like.shape[2:]) if tokens is not None else like.shape
        self.buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.generation = -1
        self.source = None

    def fill(self, src: torch.Tensor, n: int, generation: int) -> None:
        if self.tokens is None:
            self.buffer.copy_(src)
        else:
            self.buffer[:, :n].copy_(src)
            if n < self.tokens:
                self.buffer[:, n:].zero_()
        self.generation, self.source = generation, weakref.ref(src)


def _describe(leaf, n: int):
    """The part of a keyword leaf that a captured graph depends on: a tensor's kind, dtype and non-token shape, or
    a plain value itself."""
    if isinstance(leaf, torch.Tensor):
        tokens = leaf.dim() >= 2 and leaf.shape[0] == 1 and leaf.shape[1] == n
        return ("tokens" if tokens else "tensor", leaf.dtype, leaf.device,
                tuple(leaf.shape[2:]) if tokens else tuple(leaf.shape))
    try:
        hash(leaf)
    except TypeError:
        raise _NotCaptured(f"an argument of type {type(leaf).__name__} that cannot be compared") from None
    return ("value", leaf)


class _Call:
    """One decoder layer call taken apart: the hidden states, the packed-sequence arguments, the other keyword
    arguments as pytree leaves, and the key a graph captured for it must match."""

    def __init__(self, function: functools.partial, args: tuple, offload_min_bytes: int | None = None):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _NotCaptured("the layer was given positional arguments other than the hidden states")
        x = args[0]
        if x.dim() != 3 or x.shape[0] != 1:
            raise _NotCaptured(f"hidden states of shape {tuple(x.shape)}: only packed rows ([1, tokens, hidden], from "
                               f"a padding-free collator) are captured")
        kwargs = dict(function.keywords)
        cu = kwargs.pop(_CU_NAMES[0], None)
        other_cu = kwargs.pop(_CU_NAMES[1], None)
        longest = kwargs.pop(_MAX_NAMES[0], None)
        other_longest = kwargs.pop(_MAX_NAMES[1], None)
        if not isinstance(cu, torch.Tensor) or not isinstance(longest, int):
            raise _NotCaptured("no cu_seq_lens_q / max_length_q (rows from a padding-free collator) in the call")
        if other_cu is not None and other_cu.shape != cu.shape or other_longest not in (None, longest):
            raise _NotCaptured("cu_seq_lens_k / max_length_k differ from cu_seq_lens_q / max_length_q")
        if kwargs.get("attention_mask") is not None:
            raise _NotCaptured("an attention mask")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise _NotCaptured("a KV cache")
        self.x, self.cu, self.longest = x, cu, longest
        self.n, self.sequences = x.shape[1], cu.shape[0] - 1
        self.has_k = (other_cu is not None, other_longest is not None)
        self.leaves, self.spec = pytree.tree_flatten(kwargs)
        for leaf in self.leaves:
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                raise _NotCaptured("a keyword tensor argument that needs a gradient")
        autocast = torch.is_autocast_enabled(x.device.type)
        self.autocast = (autocast, torch.get_autocast_dtype(x.device.type) if autocast else None)
        self.offload_min_bytes = offload_min_bytes
        self.key = (x.dtype, x.device, x.shape[2], self.spec, self.has_k, self.autocast, offload_min_bytes,
                    tuple(_describe(leaf, self.n) for leaf in self.leaves))


def _padding_sequences(pad: int, longest: int) -> int:
    return -(-pad // longest) if pad > 0 else 0


class _GraphSet:
    """Every layer's graphs for one key and one set of bounds (tokens ``T``, sequences ``S``, longest ``L``), with
    their static inputs, one memory pool and the input-gradient buffers the layers pass to each other."""

    def __init__(self, call: _Call, tokens: int, sequences: int, longest: int, graphs: str,
                 mlp_gradients_only: bool, mlp_tile_tokens: int):
        self.key, self.T, self.S, self.L = call.key, tokens, sequences, longest
        self.mlp_gradients_only, self.mlp_tile_tokens = mlp_gradients_only, mlp_tile_tokens
        self.graph_class = GRAPHS[graphs]
        device, hidden = call.x.device, call.x.shape[2]
        self.cu = torch.full((sequences + 1,), tokens, dtype=torch.int32, device=device)
        # gradient buffers: layer i reads its output gradient from grads[i % 2] and writes its input gradient into
        # grads[(i - 1) % 2], where layer i - 1 reads it: no copy between layers, two buffers for the whole stack
        self.grads = [torch.zeros(1, tokens, hidden, dtype=call.x.dtype, device=device) for _ in range(2)]
        self.first_input = torch.zeros(1, tokens, hidden, dtype=call.x.dtype, device=device)
        token_bytes = tokens * hidden * call.x.element_size()
        self.offload = call.offload_min_bytes is not None and token_bytes >= call.offload_min_bytes
        if self.offload:
            # layer i writes outputs[i % 2] and recomputes from recompute_inputs[i % 2]
            self.outputs = [torch.zeros_like(self.first_input) for _ in range(2)]
            self.recompute_inputs = [torch.zeros_like(self.first_input) for _ in range(2)]
            self.holds = [None, None]  # (forward, layer index) whose input each recompute buffer holds
            self.fetched: list = [None, None]  # the event of the copy into each recompute buffer
            self.read_events: dict[int, object] = {}  # data_ptr -> the event of the copy to the host reading it
        self.slots: list[_Slot] = []
        self.layers: dict[int, _LayerGraphs] = {}  # id(layer) -> its graphs
        self.pending: list[weakref.ref] = []  # forwards awaiting their backward
        self.generation = -1  # the forward whose inputs the static buffers hold
        self.sources: dict[int, _Slot] = {}  # id(tensor) -> its slot, in that forward
        self.sources_alive: list = []  # keeps those tensors' ids from being reused in that forward
        if graphs == "cuda":
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device) if self.offload else None
        else:
            self.pool = self.stream = self.copy_stream = None

    # -- offloading: all of it between replays, on the copy stream, ordered by events (no host sync) --

    def offload_input(self, layer: _LayerGraphs) -> None:
        """Copy ``layer``'s input (complete on the current stream) to its host buffer."""
        if self.copy_stream is None:
            layer.host.copy_(layer.input)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            layer.host.copy_(layer.input, non_blocking=True)
            self.read_events[layer.input.data_ptr()] = self.copy_stream.record_event()

    def before_write(self, buffer: torch.Tensor) -> None:
        """Make the current stream wait until a copy to the host reading ``buffer`` is done."""
        event = self.read_events.pop(buffer.data_ptr(), None)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def fetch(self, layer: _LayerGraphs) -> None:
        """Start copying ``layer``'s input back into its recompute buffer, once the work queued so far on the
        current stream (the backward that last read that buffer) is done."""
        b = layer.index % 2
        if self.copy_stream is None:
            self.recompute_inputs[b].copy_(layer.host)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.copy_stream):
                self.recompute_inputs[b].copy_(layer.host, non_blocking=True)
                self.fetched[b] = self.copy_stream.record_event()
        self.holds[b] = (self.generation, layer.index)

    def restore(self, layer: _LayerGraphs) -> None:
        """``layer``'s input in its recompute buffer for the current stream, and the previous layer's on its way."""
        b = layer.index % 2
        if self.holds[b] != (self.generation, layer.index):
            self.fetch(layer)
        event, self.fetched[b] = self.fetched[b], None
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        if layer.previous is not None:
            self.fetch(layer.previous)

    def fits(self, call: _Call) -> bool:
        return (call.key == self.key and call.n <= self.T and call.longest <= self.L
                and call.sequences + _padding_sequences(self.T - call.n, self.L) <= self.S)

    def busy(self) -> bool:
        """Whether a forward run on these graphs still awaits its backward (its autograd graph is alive)."""
        self.pending = [ref for ref in self.pending if ref() is not None and not getattr(ref(), "done", False)]
        return bool(self.pending)

    def start_forward(self, call: _Call, generation: int) -> None:
        """Fill the sequence boundaries for this forward: the batch's, then the padding split into sequences of at
        most ``L`` tokens, then empty sequences."""
        n, s, pad = call.n, call.sequences, self.T - call.n
        self.cu[:s + 1].copy_(call.cu)
        if s + 1 < self.cu.shape[0]:
            self.cu[s + 1:].fill_(self.T)
        if pad:
            k = _padding_sequences(pad, self.L)
            ends = torch.arange(n + self.L, n + k * self.L + 1, self.L, dtype=torch.int32, device=self.cu.device)
            self.cu[s + 1:s + 1 + k].copy_(ends.clamp_(max=self.T))
        self.generation, self.sources, self.sources_alive = generation, {}, []

    def static_leaves(self, call: _Call, layer_graphs: _LayerGraphs | None) -> list:
        """The static counterpart of each keyword leaf of ``call``, filled for this forward (once per tensor
        shared by several layers). A layer captured earlier must get the tensors it was captured sharing."""
        statics = []
        for j, leaf in enumerate(call.leaves):
            if not isinstance(leaf, torch.Tensor):
                statics.append(leaf)
                continue
            slot = self.sources.get(id(leaf))
            if layer_graphs is not None:
                captured = layer_graphs.slots[j]
                if slot is None and captured.generation != self.generation:
                    captured.fill(leaf, call.n, self.generation)
                    self.sources[id(leaf)] = slot = captured
                    self.sources_alive.append(leaf)
                if slot is not captured:
                    raise _NotCaptured("the layers share their tensor arguments differently from when they were "
                                       "captured")
            elif slot is None:
                slot = _Slot(leaf, self.T if _describe(leaf, call.n)[0] == "tokens" else None)
                slot.fill(leaf, call.n, self.generation)
                self.slots.append(slot)
                self.sources[id(leaf)] = slot
                self.sources_alive.append(leaf)
            statics.append(slot)
        return statics


# --- one layer -------------------------------------------------------------------------------------------------

# decoder layers that end in ``residual + mlp(norm(h))``: in their backward graph nothing reads the MLP's result
_MLP_ENDS_LAYER = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                   "GemmaDecoderLayer"}


def _mlp_ends_layer(layer: torch.nn.Module) -> bool:
    cls = type(layer)
    return (cls.__name__ in _MLP_ENDS_LAYER and cls.__module__.startswith("transformers.models.")
            and "forward" not in layer.__dict__)


def _trainable(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


class _ParameterCheck:
    """The layer's parameters as they were captured (each module's own, by name), checked at every call with
    plain dictionary reads: a parameter replaced, moved, or frozen/unfrozen since then invalidates the graphs."""

    def __init__(self, layer: torch.nn.Module):
        self.entries = [(m._parameters, name, p, p.data_ptr(), p.requires_grad) for m in layer.modules()
                        for name, p in m._parameters.items() if p is not None]

    def changed(self) -> bool:
        return any(params.get(name) is not p or p.data_ptr() != ptr or p.requires_grad != grad
                   for params, name, p, ptr, grad in self.entries)


class _LayerGraphs:
    """One decoder layer's forward and backward graphs, on its set's static buffers."""

    def __init__(self, gs: _GraphSet, layer, function: functools.partial, call: _Call, index: int, previous):
        self.gs, self.index, self.previous = gs, index, previous
        self.parameter_check = _ParameterCheck(layer)
        self.modules = list(layer.modules())
        self.params = _trainable(layer)
        self.slots = gs.static_leaves(call, None)
        # the input: the previous layer's output buffer when that is what this layer was given (the decoder loop)
        chained = previous is not None and call.x.data_ptr() == previous.output.data_ptr()
        self.input = previous.output if chained else (gs.first_input if index == 0 else
                                                       torch.zeros_like(gs.first_input))
        self.chained = chained
        if gs.offload:
            self.host = torch.empty(self.input.shape, dtype=self.input.dtype, pin_memory=gs.copy_stream is not None)
            self.recompute_input = gs.recompute_inputs[index % 2]
            out_buffer = gs.outputs[index % 2]
            if gs.copy_stream is not None:
                # the warm-up run before the capture writes out_buffer, which a copy to the host may still read
                torch.cuda.current_stream().wait_stream(gs.copy_stream)
        else:
            self.recompute_input, out_buffer = self.input, None
        self.grad_in = gs.grads[index % 2]
        self.grad_out = gs.grads[(index - 1) % 2]
        statics = [s.buffer if isinstance(s, _Slot) else s for s in self.slots]
        kwargs = pytree.tree_unflatten(statics, call.spec)
        kwargs[_CU_NAMES[0]], kwargs[_MAX_NAMES[0]] = gs.cu, gs.L
        if call.has_k[0]:
            kwargs[_CU_NAMES[1]] = gs.cu
        if call.has_k[1]:
            kwargs[_MAX_NAMES[1]] = gs.L
        enabled, dtype = call.autocast
        device_type = call.x.device.type
        # the layer's call without its checkpointing: transformers 5.17 checkpoints nn.Module.__call__ (bound),
        # 5.24 the class's forward (given the layer as its first argument)
        module_call = functools.partial(function.func, *function.args)

        def run(x):
            # autocast's weight cache would hand the graph casts made outside it: off while capturing
            ctx = torch.autocast(device_type, dtype, cache_enabled=False) if enabled else nullcontext()
            with ctx:
                out = module_call(x, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
                raise _NotCaptured(f"the layer returns {type(out).__name__}, not one tensor shaped like its input")
            return out

        def forward():
            with torch.no_grad():
                out = run(self.input)
                if out_buffer is None:
                    return out
                return out_buffer.copy_(out)

        # the recomputation's output is not read: a patched MLP ending the layer computes its gradients only
        unread = (functools.partial(_capture.output_unread, gs.mlp_tile_tokens)
                  if gs.mlp_gradients_only and _mlp_ends_layer(layer) else nullcontext)
        self.mlp_gradients_only = False  # whether the MLP took that shortcut

        def backward():
            with torch.enable_grad(), unread() as mark:
                x = self.recompute_input.detach().requires_grad_(True)
                grads = torch.autograd.grad(run(x), [x, *self.params], self.grad_in, allow_unused=True)
            self.mlp_gradients_only = mark is not None and mark.used
            self.grad_out.copy_(grads[0])
            return list(grads[1:])

        self.forward_graph = gs.graph_class(forward, gs.pool, gs.stream)
        self.output = self.forward_graph.result
        self.backward_graph = gs.graph_class(backward, gs.pool, gs.stream)
        self.param_grads = self.backward_graph.result

    def run_forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if x.data_ptr() != self.input.data_ptr() or x.stride() != self.input.stride():
            if self.chained:
                raise _NotCaptured("the layer was given a tensor other than the previous layer's output")
            if self.gs.offload:
                self.gs.before_write(self.input)
            self.input[:, :n].copy_(x)
            if n < self.gs.T:
                self.input[:, n:].zero_()
        if self.gs.offload:
            self.gs.offload_input(self)
            self.gs.before_write(self.output)
        self.forward_graph.replay()
        return self.output[:, :n]

    def run_backward(self, grad: torch.Tensor, n: int):
        if grad.data_ptr() != self.grad_in.data_ptr() or grad.stride() != self.grad_in.stride():
            self.grad_in[:, :n].copy_(grad)
            if n < self.gs.T:
                self.grad_in[:, n:].zero_()
        if self.gs.offload:
            self.gs.restore(self)
        self.backward_graph.replay()
        dx = self.grad_out[:, :n]
        # the first layer's input gradient leaves the stack (embeddings, a leaf's .grad): a tensor of its own
        return (dx.clone() if self.index == 0 else dx), self.param_grads


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: _LayerGraphs, n: int, x, *params):
        out = graphs.run_forward(x, n)
        ctx.graphs, ctx.n, ctx.done = graphs, n, False
        graphs.gs.pending.append(weakref.ref(ctx))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dx, param_grads = ctx.graphs.run_backward(grad, ctx.n)
        ctx.done = True
        return (None, None, dx, *param_grads)


# --- the model's layers ----------------------------------------------------------------------------------------

def _where(exc: BaseException) -> str:
    """`` at file:line`` of the innermost frame of ``exc``'s traceback outside torch: the code that cannot be
    captured."""
    inside_torch = os.path.join("site-packages", "torch", "")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if inside_torch not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def _module_reason(m: torch.nn.Module) -> str | None:
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return f"hooks on a {type(m).__name__} in the layer"
    if "_hf_hook" in m.__dict__:
        return f"an accelerate hook on a {type(m).__name__} in the layer"
    if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
        return f"dropout (p={m.p}) in the layer: a replay would repeat one mask"
    return None


def _layer_reason(modules) -> str | None:
    """Why a layer (its ``modules``) cannot be replayed from a graph now: Python that runs at every call (hooks,
    which come and go: transformers records outputs with them), or random numbers drawn."""
    if _global_hooks():
        return "global module hooks are registered"
    for m in modules:
        if reason := _module_reason(m):
            return reason
    return None


def _checkpoint_kind(inner) -> tuple[bool, int | None]:
    """``(capturable, offload_min_bytes)`` of a layer's checkpointing function: torch's checkpoint (None: nothing
    offloaded) or fastsft's offloaded checkpointing (its size threshold)."""
    if not isinstance(inner, functools.partial):
        return False, None
    if isinstance(inner.func, OffloadedCheckpoint):
        return True, inner.func.min_bytes
    return inner.func is checkpoint, None


class _CapturedCheckpoint:
    """What a decoder layer's ``_gradient_checkpointing_func`` becomes: the captured graphs where the call can
    replay them, else ``inner`` (transformers' checkpointing as it was)."""

    def __init__(self, owner: CapturedLayers, layer: torch.nn.Module, inner):
        self.owner, self.layer, self.inner = owner, weakref.ref(layer), inner

    def __call__(self, function, *args):
        layer = self.layer()
        if layer is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.inner(function, *args)
        return self.owner.run(layer, self.inner, function, args)

    def __deepcopy__(self, memo):
        return _CapturedCheckpoint(copy.deepcopy(self.owner, memo), copy.deepcopy(self.layer(), memo),
                                   copy.deepcopy(self.inner, memo))


class CapturedLayers:
    """The captured decoder layers of one model (see the module docstring).

    Args:
        stack: the decoder stack whose layers are captured (a transformers model's ``base_model``).
        token_budget: ``T``, the tokens a captured step holds (a packing trainer's batch size times its
            ``max_length``); None: the first batch's tokens rounded up to 256.
        max_length: ``L``, the longest sequence (the packing ``max_length``); None: the first batch's longest
            rounded up to a power of two.
        max_captures: the graph sets captured for bounds that grew; later batches that fit none run eagerly.
        graphs: ``"cuda"``; ``"emulated"`` re-runs the layers eagerly on the same static buffers (CPU tests).
        mlp_gradients_only: in the backward graph of a layer that ends in ``residual + mlp(...)`` (Llama, Mistral,
            Qwen2, Qwen3, Gemma), fastsft's fused LoRA MLP computes its gradients only
            (``fastsft.ops.lora_mlp(compute_output=False)``): no down-projection GEMM for the unread output, and
            its [tokens, intermediate] activations exist only inside its backward, in row tiles. False recomputes
            the MLP as the eager checkpointed layer does.
        mlp_tile_tokens: the rows of those tiles.
    """

    def __init__(self, stack: torch.nn.Module, *, token_budget: int | None = None, max_length: int | None = None,
                 max_captures: int = 4, graphs: str = "cuda", mlp_gradients_only: bool = True,
                 mlp_tile_tokens: int = GRADIENT_TILE_TOKENS):
        if graphs not in GRAPHS:
            raise ValueError(f"graphs must be one of {sorted(GRAPHS)}, got {graphs!r}")
        for name, value in (("token_budget", token_budget), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if isinstance(max_captures, bool) or not isinstance(max_captures, int) or max_captures < 0:
            raise ValueError(f"max_captures must be a non-negative int, got {max_captures!r}")
        if not isinstance(mlp_gradients_only, bool):
            raise TypeError(f"mlp_gradients_only must be a bool, got {mlp_gradients_only!r}")
        if isinstance(mlp_tile_tokens, bool) or not isinstance(mlp_tile_tokens, int) or mlp_tile_tokens < 1:
            raise ValueError(f"mlp_tile_tokens must be a positive int, got {mlp_tile_tokens!r}")
        self.mlp_gradients_only, self.mlp_tile_tokens = mlp_gradients_only, mlp_tile_tokens
        self.token_budget, self.max_length, self.max_captures, self.graphs = (token_budget, max_length,
                                                                             max_captures, graphs)
        self.stack = weakref.ref(stack)
        self.set: _GraphSet | None = None
        self.captures = 0
        self.generation = 0
        self._decided = -1  # the forward the current decision is for
        self._eager_reason: str | None = None  # this forward's, when it runs eagerly as a whole
        self._eager_detail: str | None = None
        self._broken: str | None = None  # a capture failed: everything runs eagerly from then on
        self.stats = {"replayed": 0, "eager": 0, "captured": 0}
        self.reasons: dict[str, int] = {}  # why calls ran eagerly, and how often
        self._hook = stack.register_forward_pre_hook(self._on_forward)
        self._wrap_layers(stack)

    def __deepcopy__(self, memo):
        stack = copy.deepcopy(self.stack(), memo)  # the copy being made, from the memo
        new = object.__new__(CapturedLayers)
        new.__dict__.update(token_budget=self.token_budget, max_length=self.max_length,
                            max_captures=self.max_captures, graphs=self.graphs,
                            mlp_gradients_only=self.mlp_gradients_only, mlp_tile_tokens=self.mlp_tile_tokens,
                            stack=weakref.ref(stack), set=None,
                            captures=0, generation=0, _decided=-1, _eager_reason=None, _eager_detail=None,
                            _broken=None,
                            stats=dict.fromkeys(self.stats, 0), reasons={}, _hook=None)
        memo[id(self)] = new
        return new

    # -- installation --

    @staticmethod
    def _layers(stack: torch.nn.Module):
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in stack.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _wrap_layers(self, stack: torch.nn.Module) -> None:
        # at every forward: a later gradient_checkpointing_enable() (the Trainer's) sets a new function
        for layer in self._layers(stack):
            func = layer.__dict__.get("_gradient_checkpointing_func")
            if func is not None and not isinstance(func, _CapturedCheckpoint):
                layer._gradient_checkpointing_func = _CapturedCheckpoint(self, layer, func)

    def _on_forward(self, stack, args):
        self.generation += 1
        self._wrap_layers(stack)

    def remove(self) -> None:
        """Put every layer's checkpointing function back and drop the graphs."""
        stack = self.stack()
        if self._hook is not None:
            self._hook.remove()
        if stack is not None:
            for layer in self._layers(stack):
                func = layer.__dict__.get("_gradient_checkpointing_func")
                if isinstance(func, _CapturedCheckpoint):
                    layer._gradient_checkpointing_func = func.inner
        self.set = None

    # -- running --

    def _note(self, reason: str, detail: str | None = None) -> None:
        if reason not in self.reasons:
            logger.warning("fastsft captured layers: %s%s; these layer calls run eagerly", reason,
                           f" ({detail})" if detail else "")
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.stats["eager"] += 1

    def run(self, layer, inner, function, args):
        try:
            capturable, offload_min_bytes = _checkpoint_kind(inner)
            if not capturable:
                raise _NotCaptured(f"the layers checkpoint with {getattr(inner, 'func', inner)!r}, not "
                                   f"torch.utils.checkpoint or fastsft's offloaded checkpointing")
            if args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cuda" and self.graphs == "cuda":
                raise _NotCaptured(f"the model is on {args[0].device.type}, not a CUDA device")
            call = _Call(function, args, offload_min_bytes)
            graphs = self._graphs_for(layer, function, call)
            out = _Replay.apply(graphs, call.n, call.x, *graphs.params)
        except _NotCaptured as exc:
            self._note(exc.reason, exc.detail)
            return inner(function, *args)
        self.stats["replayed"] += 1
        return out

    def _graphs_for(self, layer, function, call: _Call) -> _LayerGraphs:
        if self._decided != self.generation:
            self._start_forward(call)
        if self._eager_reason is not None:
            raise _NotCaptured(self._eager_reason, self._eager_detail)
        gs = self.set
        if not gs.fits(call):
            raise _NotCaptured("a layer's arguments differ from the first layer's in this forward")
        graphs = gs.layers.get(id(layer))
        if reason := _layer_reason(layer.modules() if graphs is None else graphs.modules):
            raise _NotCaptured(reason)  # checked at every call: hooks come and go
        if graphs is not None and graphs.parameter_check.changed():
            raise _NotCaptured("the layer's parameters changed since it was captured")
        if graphs is None:
            previous = next(reversed(gs.layers.values()), None)
            try:
                graphs = _LayerGraphs(gs, layer, function, call, len(gs.layers), previous)
            except _NotCaptured:
                raise
            except Exception as exc:  # a host sync, an op that cannot be captured: this set stays eager
                self._broken = self._eager_reason = (f"capturing {type(layer).__name__} failed "
                                                     f"({type(exc).__name__}: {exc}{_where(exc)})")
                self.set = None
                raise _NotCaptured(self._eager_reason) from exc
            gs.layers[id(layer)] = graphs
            self.stats["captured"] += 1
        else:
            gs.static_leaves(call, graphs)
        return graphs

    def _start_forward(self, call: _Call) -> None:
        """The first layer call of a forward: run it on the current graphs, on new ones, or eagerly."""
        self._decided, self._eager_reason, self._eager_detail = self.generation, self._broken, None
        if self._broken:
            return
        gs = self.set
        if gs is not None and gs.busy():
            self._eager_reason = "a forward ran before the backward of the one before it"
            return
        if gs is None or not gs.fits(call):
            if self.captures >= self.max_captures:
                self._eager_reason = f"a batch fits none of the {self.max_captures} shapes captured"
                self._eager_detail = (f"{call.n} tokens, {call.sequences} sequences, the longest {call.longest}; "
                                      f"captured: {self.set.T} tokens, {self.set.S} sequences of at most "
                                      f"{self.set.L}" if self.set is not None else None)
                return
            self.set = gs = None  # the old graphs' memory first
            rounded = -(-call.n // _TOKEN_ROUND) * _TOKEN_ROUND
            tokens = self.token_budget if self.token_budget and call.n <= self.token_budget else rounded
            longest = min(max(self.max_length or 0, 1 << max(call.longest - 1, 0).bit_length()), tokens)
            needed = call.sequences + _padding_sequences(tokens - call.n, longest)
            sequences = max(_MIN_SEQUENCES, 1 << (2 * needed - 1).bit_length())
            self.set = gs = _GraphSet(call, tokens, sequences, longest, self.graphs, self.mlp_gradients_only,
                                      self.mlp_tile_tokens)
            self.captures += 1
            logger.info("fastsft captured layers: capturing for %d tokens, %d sequences of at most %d tokens",
                        tokens, sequences, longest)
        gs.start_forward(call, self.generation)

    def summary(self) -> str:
        gs = self.set
        shape = (f"{gs.T} tokens, {gs.S} sequences of at most {gs.L}{', inputs offloaded' if gs.offload else ''}"
                 if gs is not None else "nothing captured")
        if gs is not None and any(g.mlp_gradients_only for g in gs.layers.values()):
            shape += f", MLP gradients only in backward (tiles of {gs.mlp_tile_tokens} tokens)"
        eager = "; ".join(f"{why} ({count}x)" for why, count in self.reasons.items())
        return (f"captured layers: {shape}; {self.stats['replayed']} layer calls replayed, {self.stats['eager']} "
                f"eager{': ' + eager if eager else ''}")


def _stack_of(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"captured layers need a transformers model (or a PEFT model wrapping one), got "
                        f"{type(model).__name__}")
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(inner, "base_model", inner)


def enable_captured_layers(model, *, token_budget: int | None = None, max_length: int | None = None,
                           max_captures: int = 4, graphs: str = "cuda", mlp_gradients_only: bool = True,
                           mlp_tile_tokens: int = GRADIENT_TILE_TOKENS) -> CapturedLayers:
    """Capture ``model``'s checkpointed decoder layers (a transformers causal LM, plain or PEFT-wrapped, patched
    or not) as CUDA graphs at their first packed training call; see :mod:`fastsft.captured_layers`. Gradient
    checkpointing must be on (``model.gradient_checkpointing_enable()``, or the trainer's argument): its calls are
    what is captured. Calling it again replaces the previous settings. Returns the :class:`CapturedLayers`."""
    disable_captured_layers(model)
    stack = _stack_of(model)
    captured = CapturedLayers(stack, token_budget=token_budget, max_length=max_length, max_captures=max_captures,
                              graphs=graphs, mlp_gradients_only=mlp_gradients_only,
                              mlp_tile_tokens=mlp_tile_tokens)
    stack.__dict__[ATTR] = captured
    return captured


def captured_layers_of(model) -> CapturedLayers | None:
    return _stack_of(model).__dict__.get(ATTR)


def disable_captured_layers(model) -> bool:
    """Back to eager layers (the graphs are dropped). Returns whether they were captured."""
    captured = _stack_of(model).__dict__.pop(ATTR, None)
    if captured is None:
        return False
    captured.remove()
    return True

