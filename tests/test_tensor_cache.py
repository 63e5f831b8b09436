"""fastsft._tensor_cache.LastTensorCache and the checks built on it: a value is reused only while its tensor has
the same values, inference tensors included."""

import types

import pytest
import torch

from fastsft._tensor_cache import LastTensorCache
from fastsft.ops import flash_attention_varlen


def counting(fn):
    calls = []

    def compute(t):
        calls.append(t.tolist())
        return fn(t)

    return compute, calls


def test_reused_for_the_same_tensor_and_recomputed_after_a_write_through_data():
    cache = LastTensorCache()
    compute, calls = counting(lambda t: int(t.sum()))
    t = torch.tensor([1, 2, 3])
    assert cache.get(t, compute) == 6 and cache.get(t, compute) == 6 and len(calls) == 1
    t.data[0] = 10  # bumps no version counter
    assert cache.get(t, compute) == 15 and len(calls) == 2
    t[0] = 20  # an ordinary in-place write
    assert cache.get(t, compute) == 25 and len(calls) == 3
    assert cache.get(t.clone(), compute) == 25 and len(calls) == 4  # another tensor: computed again
    assert cache.get(t, compute, "other key") == 25 and len(calls) == 5


def test_inference_tensors_are_cached_by_value():
    """Inference tensors have no version counter (reading ``_version`` raises): compared by value instead."""
    cache = LastTensorCache()
    compute, calls = counting(lambda t: int(t.sum()))
    with torch.inference_mode():
        t = torch.tensor([1, 2, 3])
        assert cache.get(t, compute) == 6 and cache.get(t, compute) == 6 and len(calls) == 1
        t[0] = 10  # inference tensors change in place without any counter
        assert cache.get(t, compute) == 15 and len(calls) == 2
    assert cache.get(t, compute) == 15 and len(calls) == 2  # read outside inference mode too


def test_flash_attention_checks_cu_seqlens_under_inference_mode():
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    expected = flash_attention_varlen(q, k, v, cu, 4, backend="reference")
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 3, 7], dtype=torch.int32)
        for _ in range(2):  # the second call is the cached one
            out = flash_attention_varlen(q, k, v, cu_inf, 4, backend="reference")
            torch.testing.assert_close(out, expected)
        cu_inf[1] = 5  # lengths 5 and 2: the longest exceeds max_seqlen 4
        with pytest.raises(ValueError, match="max_seqlen"):
            flash_attention_varlen(q, k, v, cu_inf, 4, backend="reference")


def test_cu_seqlens_edited_through_data_is_checked_again():
    """A write through ``.data`` bumps no version: a version-keyed check would pass the edited tensor to the kernels,
    which then read past the tokens."""
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    flash_attention_varlen(q, k, v, cu, 4, backend="reference")
    flash_attention_varlen(q, k, v, cu, 4, backend="reference")  # the cached pass
    cu.data[2] = 9  # ends past the 7 tokens
    with pytest.raises(ValueError, match="end at the number of tokens"):
        flash_attention_varlen(q, k, v, cu, 4, backend="reference")


def test_padded_attention_forward_under_inference_mode():
    """A patched model's attention with a 2-D padding mask (``generate()`` runs its forward so), under
    ``torch.inference_mode()``: the padding check is cached by value, so a mask edited in place is seen."""
    from fastsft.transformers_attention import attention_forward

    module = types.SimpleNamespace(training=False, sliding_window=None)
    with torch.inference_mode():
        q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        first, _ = attention_forward(module, q, k, v, mask, scaling=0.5)
        again, _ = attention_forward(module, q, k, v, mask, scaling=0.5)
        torch.testing.assert_close(again, first)
        mask[1] = torch.tensor([0, 0, 1, 1, 1])  # left padding now: not the right-padded fast path
        left, _ = attention_forward(module, q, k, v, mask, scaling=0.5)
    assert not torch.allclose(left[1], first[1])


def test_lora_step_casts_under_inference_mode():
    """float32 adapters of a bfloat16 model: the fused LoRA ops cast them once per step through StepCasts. Under
    ``torch.inference_mode()`` (``generate()``) the copies are inference tensors, which have no version counter and
    cannot be refreshed in place afterwards: training after generating must still work."""
    from fastsft.ops.lora import StepCasts, lora_qkv

    casts = StepCasts()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    projections = [(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, requires_grad=True),
                    torch.randn(4, 2, requires_grad=True)) for _ in range(3)]
    expected = lora_qkv(x, *projections, 0.5, backend="reference")
    with torch.inference_mode():
        for _ in range(2):
            casts.new_step()
            got = lora_qkv(x, *projections, 0.5, backend="triton", casts=casts)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
    casts.new_step()
    out = lora_qkv(x, *projections, 0.5, backend="triton", casts=casts)
    sum(o.float().sum() for o in out).backward()
    assert all(p.grad is not None for _, a, b in projections for p in (a, b))
