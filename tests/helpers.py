"""Shared test utilities: readable mismatch reports, baseline-relative tolerances, opcheck, backend lists."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fastsft import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The shipped demo model shrunk for tests: trains a step in well under a second on the CPU
SMALL_DEMO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """A script of the repository that is not part of the package (scripts/, examples/), imported as a module."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def _describe(actual, expected, limit=5) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    lines = [f"shapes {tuple(a.shape)} vs {tuple(e.shape)}"]
    for name, t in (("actual", a), ("expected", e)):
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            lines.append(f"{name} has {bad} NaN/inf values")
    if a.shape == e.shape and a.numel():
        diff = (a - e).abs()
        order = diff.flatten().argsort(descending=True)[:limit]
        for flat in order.tolist():
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
            lines.append(f"  at {idx}: actual {a[idx].item():.6g}, expected {e[idx].item():.6g}, "
                         f"diff {diff[idx].item():.3g}")
    return "\n".join(lines)


def assert_close(actual, expected, *, rtol: float, name: str = "value", atol: float = 0.0):
    """Norm-wise relative error at most ``rtol`` (plus ``atol`` absolute on the norm); finite values only."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values\n{_describe(actual, expected)}"
    err = rel_error(actual, expected)
    abs_err = (actual.detach().double() - expected.detach().double()).norm().item()
    assert err <= rtol or abs_err <= atol, (
        f"{name}: relative error {err:.3g} > {rtol:.3g}\n{_describe(actual, expected)}")


def assert_close_to_baseline(actual, expected, baseline, *, factor: float = 2.0, floor: float = 1e-6,
                             name: str = "value"):
    """The kernel's error against the float64 ``expected`` is at most ``factor`` times that of a plain PyTorch
    ``baseline`` computed in the same low precision (plus ``floor``): a tolerance that follows dtype and size."""
    base_err = rel_error(baseline, expected)
    assert_close(actual, expected, rtol=factor * base_err + floor, name=f"{name} (baseline error {base_err:.3g})")


def backend_params(op: str, device: str):
    """pytest params for every registered backend of ``op``; unavailable ones are skipped with the reason."""
    params = []
    for name in backends.registered(op):
        reason = backends.unavailable_reason(op, name, torch.device(device))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def opcheck(op, args, kwargs=None, test_utils=None):
    """torch.library.opcheck: schema, fake (meta), autograd registration and AOT dispatch (all by default)."""
    if test_utils is None:
        torch.library.opcheck(op, args, kwargs or {})
    else:
        torch.library.opcheck(op, args, kwargs or {}, test_utils=test_utils)


def opcheck_triton(op, args, kwargs=None):
    """opcheck for a Triton op: every test on a GPU. On the CPU (Triton's interpreter) all but AOT dispatch: AOT
    autograd traces into a triton_op's body and the interpreter cannot run on traced tensors, so that check runs
    in the GPU pass (scripts/gpu_check.sh)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    cpu_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck(op, args, kwargs, test_utils=None if device.type == "cuda" else cpu_tests)


# --- tiny models of every supported family ------------------------------------------------------------------------

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
# Non-default head settings so the softcap/scale paths are really exercised
FAMILY_OVERRIDES = {"gemma2": {"final_logit_softcapping": 0.3}, "gemma3_text": {"final_logit_softcapping": 0.3},
                    "cohere": {"logit_scale": 0.5}, "granite": {"logits_scaling": 4.0}}


def tiny_model(model_type="llama", seed=0, **overrides):
    """A float32 causal LM of ``model_type`` with the TINY sizes and the family's head overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILY_OVERRIDES.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def eager_attention(q, k, v, cu, *, causal=True, softmax_scale=None, window=None, softcap=None):
    """PyTorch attention in the inputs' dtype (scores and P @ V in that dtype, softmax in float32), per sequence:
    what an unfused implementation computes, whose error sets the tolerance."""
    from fastsft.reference.attention import attention_mask

    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs = [q[:0]]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        keep = attention_mask(e - s, causal=causal, window=window, device=q.device)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        outs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outs)
