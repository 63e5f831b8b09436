"""The fused-loss forward that ``fastsft.patch`` installs on a causal LM instance.

Called with ``labels`` (or ``shift_labels``), it runs the backbone and computes the loss with
:func:`fastsft.ops.linear_cross_entropy`, never materializing the [batch, seq, vocab] logits: the output's
``logits`` is ``None`` (with ``return_dict=False``, the tuple's second item: the layout is stock's). Called
without labels it is the model's original forward, so generation and logit-based evaluation are unchanged.

Two loss modes:
- default (what ``model(**batch, labels=...)`` does in transformers): mean loss over labelled tokens, or the sum
  over ``num_items_in_batch`` under gradient accumulation. The op finishes the gradients in the forward pass,
  which is its fastest path. ``return_token_stats=True`` also fills ``entropy``, ``is_top1`` and ``label_mask``.
- ``fused_lm_head=True``: the protocol TRL 1.16's ``SFTTrainer.compute_loss`` speaks (see
  ``trl.trainer.utils.add_fused_lm_head``): differentiable per-token ``log_probs`` (0 where ignored) plus
  ``entropy``/``is_top1``/``label_mask``, so TRL's other losses (DFT, label smoothing metrics, custom
  ``compute_loss_func``) keep working on a patched model.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from fastsft.ops import linear_cross_entropy
from fastsft.ops.linear_cross_entropy import as_device_scalar
from fastsft.patching.families import Family

IGNORE_INDEX = -100
STATE_ATTR = "_fastsft_patch"  # instance attribute holding the PatchState of a patched model
# transformers 5.24 renamed the outputs' `past_key_values` to `cache` (and renames the keyword when building one)
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """A causal-LM output whose loss came from the fused op. ``logits`` is always ``None``.

    ``log_probs`` (``fused_lm_head=True`` only), ``entropy``, ``is_top1`` and ``label_mask`` are per shifted
    label position and zero/False where the label is ignored.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    cache: Any = None  # transformers >= 5.24
    past_key_values: Any = None  # transformers < 5.24
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class PatchState:
    """Everything the patched forward needs, stored on the model instance (so copies of the model carry it)."""

    family: Family
    backend: str
    softcap: float | None
    logit_scale: float | None
    previous_forward: Any  # an instance-level forward that was there before patching, or None
    installed_forward: Any = None  # the bound method fastsft installed
    slot: str = "forward"  # where: "forward", or "_old_forward" under an accelerate hook

    def original_forward(self, model):
        return self.previous_forward or types.MethodType(type(model).forward, model)


def make_forward(model_class: type):
    """A forward for instances of ``model_class`` that keeps the class forward's signature (Trainer reads it to
    decide whether to pass ``num_items_in_batch``; ``generate`` validates its kwargs against it)."""
    signature = inspect.signature(model_class.forward)

    def forward(self, *args, **kwargs):
        if args:  # name positional arguments so labels/logits_to_keep are found wherever they were passed
            bound = signature.bind_partial(self, *args)
            bound.arguments.pop("self")
            kwargs = {**bound.arguments, **kwargs}
        return fused_forward(self, **kwargs)

    forward.__wrapped__ = model_class.forward
    forward.__name__, forward.__qualname__ = "forward", f"fastsft_fused_forward[{model_class.__name__}]"
    forward.__doc__ = model_class.forward.__doc__
    return forward


def fused_forward(model, *, labels=None, shift_labels=None, num_items_in_batch=None, fused_lm_head=False,
                  return_token_stats=False, logits_to_keep=0, return_dict=None, **kwargs):
    state: PatchState = getattr(model, STATE_ATTR)
    if labels is None and shift_labels is None:
        if fused_lm_head or return_token_stats:
            raise ValueError("fastsft: fused_lm_head=True / return_token_stats=True need labels (or shift_labels)")
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        return state.original_forward(model)(logits_to_keep=logits_to_keep, **kwargs)

    outputs = model.base_model(**kwargs)
    hidden = outputs.last_hidden_state
    # Same positions as the original forward: it computes (and scores) the logits of hidden[:, slice] only
    positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, positions]
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    head = model.get_output_embeddings()
    fused = fused_lm_head or return_token_stats
    result = _head_loss(state, head, hidden, targets, num_items_in_batch, per_token=fused_lm_head,
                        want_stats=fused)
    out = FusedCausalLMOutput(loss=result["loss"], log_probs=result.get("log_probs"), entropy=result.get("entropy"),
                              is_top1=result.get("is_top1"), label_mask=result.get("label_mask"),
                              **{CACHE_FIELD: getattr(outputs, CACHE_FIELD, None)},
                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if return_dict is False:
        # Stock's layout (CausalLMOutputWithPast.to_tuple()) with the logits' place kept, None as they are never
        # built, so that every index means what it means unpatched; the token stats, when asked for, after it
        rest = CausalLMOutputWithPast(**{CACHE_FIELD: getattr(outputs, CACHE_FIELD, None)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions).to_tuple()
        stats = (out.log_probs, out.entropy, out.is_top1, out.label_mask) if fused else ()
        return (out.loss, None, *rest, *(t for t in stats if t is not None))
    return out


def _head_loss(state: PatchState, head: torch.nn.Module, hidden, targets, num_items_in_batch, *, per_token: bool,
               want_stats: bool) -> dict:
    weight, bias = _gathered(head.weight), _gathered(getattr(head, "bias", None))
    if _is_dtensor(hidden):
        raise NotImplementedError(
            "fastsft: the backbone returned a DTensor (tensor or sequence parallelism); the fused loss takes plain "
            "hidden states. Patch with fused_cross_entropy=False (SFTTrainer(patch={'fused_cross_entropy': False})).")
    hidden, targets = hidden.to(weight.device), targets.to(weight.device)
    # The op needs one dtype. Under autocast the original head would have run in the autocast dtype; otherwise
    # the head's own dtype decides (a float32 backbone output meets a bf16 head after norm upcasts, e.g.).
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    hidden = hidden.to(weight.dtype)
    with torch.autocast(device_type, enabled=False):  # keep the op's (and its reference's) float32 math as is
        loss = linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX,
            reduction="none" if per_token else "mean",
            num_items_in_batch=None if per_token else num_items_in_batch,
            softcap=state.softcap, logit_scale=state.logit_scale, return_token_stats=want_stats, backend=state.backend)
    loss, stats = loss if want_stats else (loss, None)
    mask = targets != IGNORE_INDEX
    result = {"label_mask": mask}
    if per_token:
        log_probs = -loss  # the op's per-token loss is 0 where the label is ignored
        denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
        result["loss"] = -log_probs.sum() / as_device_scalar(denom, loss.device).clamp(min=1)
        result["log_probs"] = log_probs
    else:
        result["loss"] = loss
    if want_stats:
        result["entropy"] = stats.entropy.masked_fill(~mask, 0.0)
        result["is_top1"] = stats.is_argmax
    return result


def _is_dtensor(tensor) -> bool:
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _gathered(param):
    """The whole of an LM-head parameter that FSDP2 left sharded (a DTensor: the head is its own FSDP group, whose
    forward the fused path never calls, so FSDP never unshards it), as a plain tensor; anything else as it is.

    Gathered once per forward, as TRL's fused head does. The gather is differentiable: where the head trains,
    each rank's gradient of the whole weight is averaged across the mesh and lands back in the shards
    (``Partial("avg")``, a reduce-scatter: what FSDP2 does for every other parameter, and what DDP's all-reduce
    gives). A frozen head (LoRA) is gathered without autograd.
    """
    if not _is_dtensor(param):
        return param
    from torch.distributed.tensor import Partial, Replicate

    replicated = [Replicate()] * param.device_mesh.ndim
    if not param.requires_grad:
        return param.detach().redistribute(placements=replicated).to_local()
    return param.redistribute(placements=replicated).to_local(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
