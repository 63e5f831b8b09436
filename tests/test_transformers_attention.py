"""fastsft attention inside transformers models: same outputs and gradients as SDPA in every batch layout."""

import pytest
import torch

from fastsft import transformers_attention as fa

transformers = pytest.importorskip("transformers")


def tiny_llama(**overrides):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=101,
                                      max_position_embeddings=256, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    fa.register()
    monkeypatch.setenv(fa.ENV, "reference")  # fastsft's op: the CPU would pick SDPA for dense rows


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls that reached fastsft.ops.flash_attention_varlen (rather than an SDPA fallback)."""
    import fastsft.ops

    calls = []
    original = fastsft.ops.flash_attention_varlen

    def spy(*args, **kwargs):
        calls.append(args[3])  # cu_seqlens
        return original(*args, **kwargs)

    monkeypatch.setattr(fastsft.ops, "flash_attention_varlen", spy)
    return calls


def logits_with(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


def test_dense_rows_match_sdpa(kernel_calls):
    model = tiny_llama()
    ids = torch.randint(0, 101, (3, 29))
    torch.testing.assert_close(logits_with(model, "fastsft", input_ids=ids), logits_with(model, "sdpa", input_ids=ids),
                               rtol=1e-4, atol=1e-4)
    assert len(kernel_calls) == 2 and kernel_calls[0].tolist() == [0, 29, 58, 87]


def test_right_padding_matches_sdpa_on_real_tokens(kernel_calls):
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0
    ours = logits_with(model, "fastsft", input_ids=ids, attention_mask=mask)
    ref = logits_with(model, "sdpa", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)
    assert len(kernel_calls) == 2


def test_left_padding_falls_back_and_matches(kernel_calls):
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ours = logits_with(model, "fastsft", input_ids=ids, attention_mask=mask)
    ref = logits_with(model, "sdpa", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)
    assert kernel_calls == []  # left padding is not expressible as rows: SDPA with the mask


def packed_batch(lengths, vocab=101):
    ids = torch.randint(0, vocab, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, position_ids, cu


def separate_logits(model, ids, lengths):
    """Each sequence run alone: what packing must reproduce."""
    outs, start = [], 0
    for n in lengths:
        outs.append(logits_with(model, "sdpa", input_ids=ids[:, start:start + n]))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("with_cu_seqlens", [True, False])
def test_packed_rows_match_separate_sequences(with_cu_seqlens, kernel_calls):
    model = tiny_llama()
    lengths = [7, 1, 19, 12]
    ids, position_ids, cu = packed_batch(lengths)
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19, max_length_k=19) if with_cu_seqlens else {}
    ours = logits_with(model, "fastsft", input_ids=ids, position_ids=position_ids, **extra)
    torch.testing.assert_close(ours, separate_logits(model, ids, lengths), rtol=1e-4, atol=1e-4)
    assert [c.tolist() for c in kernel_calls] == [cu.tolist()] * 2
    # and SDPA on the packed row without a mask would be wrong: the test can tell the difference
    unmasked = logits_with(model, "sdpa", input_ids=ids)
    assert not torch.allclose(ours, unmasked, atol=1e-3)


def test_gradients_match_sdpa():
    model = tiny_llama().train()
    ids = torch.randint(0, 101, (2, 17))
    grads = {}
    for impl in ("fastsft", "sdpa"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["fastsft"], grads["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_generation_with_cache_matches_sdpa(kernel_calls):
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 9))
    out = {}
    for impl in ("fastsft", "sdpa"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out["fastsft"], out["sdpa"])
    assert len(kernel_calls) == 2  # the prefill (2 layers); decoding steps go to SDPA with the cache


def test_sliding_window_matches_eager():
    config_kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=101, sliding_window=5)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**config_kw)).eval()
    ids = torch.randint(0, 101, (1, 23))
    ours = logits_with(model, "fastsft", input_ids=ids)
    ref = logits_with(model, "eager", input_ids=ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_unknown_attention_backend_is_rejected(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        fa.resolve(cpu, "flash9")
    monkeypatch.setenv(fa.ENV, "nope")
    with pytest.raises(ValueError, match=fa.ENV):
        fa.resolve(cpu)
    monkeypatch.delenv(fa.ENV)
    monkeypatch.setenv(fa.DEPRECATED_ENV, "nope")
    with pytest.raises(ValueError, match=fa.DEPRECATED_ENV):
        fa.resolve(cpu)


def test_attention_plan_per_case_and_what_can_run_here(monkeypatch):
    """auto: the default order per case less what cannot run on the device (torch's varlen attention is CUDA-only,
    Triton is never auto on a CPU); one asked-for backend for every case; one that cannot run here raises."""
    from fastsft import backends

    monkeypatch.delenv(fa.ENV)
    cpu = torch.device("cpu")
    plan = fa.resolve(cpu)
    assert plan.orders == {"packed": ("fastsft",), "dense": ("sdpa", "fastsft")}
    assert plan.kernel.backend == "reference" and str(plan) == "packed reference; dense sdpa > reference"
    assert str(fa.resolve(cpu, "reference")) == "reference (packed and dense rows)"
    assert fa.resolve(cpu, "sdpa").orders == {"packed": ("sdpa",), "dense": ("sdpa",)}
    assert fa.resolve(cpu, "reference").kernel.explicit
    with pytest.raises(backends.BackendUnavailable, match="torch_varlen"):
        fa.resolve(cpu, "torch_varlen")
    assert fa.resolve(cpu, "cuda").requested == "auto"  # an op backend fastsft's attention lacks: auto, as patch()
    monkeypatch.setenv(fa.ENV, "sdpa")
    assert fa.resolve(cpu).orders["dense"] == ("sdpa",)


def test_the_deprecated_variable_still_applies_with_a_warning(monkeypatch):
    monkeypatch.delenv(fa.ENV)
    monkeypatch.setattr(fa, "_warned", set())
    monkeypatch.setenv(fa.DEPRECATED_ENV, "fastsft")
    with pytest.warns(FutureWarning, match=fa.ENV):
        plan = fa.resolve(torch.device("cpu"))
    assert plan.orders == {"packed": ("fastsft",), "dense": ("fastsft",)}


def test_a_module_without_a_plan_resolves_one_on_its_first_call(monkeypatch):
    """A model loaded with attn_implementation="fastsft" and not patched: the environment read once, on the first
    call of each attention module."""
    monkeypatch.setenv(fa.ENV, "sdpa")
    model = tiny_llama()
    model.set_attn_implementation("fastsft")
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        model(input_ids=ids)
    plans = [m.__dict__[fa.PLAN_ATTR] for m in model.modules() if fa.PLAN_ATTR in m.__dict__]
    assert len(plans) == model.config.num_hidden_layers and all(p.orders["dense"] == ("sdpa",) for p in plans)
    monkeypatch.setenv(fa.ENV, "reference")
    with torch.no_grad():
        model(input_ids=ids)
    assert all(m.__dict__[fa.PLAN_ATTR] is p for m, p in zip(
        [m for m in model.modules() if fa.PLAN_ATTR in m.__dict__], plans))


def test_torch_varlen_call_adapts_to_both_signatures(monkeypatch):
    """torch 2.11's varlen_attn takes window_size (GQA native); newer ones take is_causal and enable_gqa."""
    calls = []

    def older(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append({"scale": scale, "window_size": window_size})

    def newer(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False, enable_gqa=False):
        calls.append({"scale": scale, "is_causal": is_causal, "enable_gqa": enable_gqa})

    q, kv, cu = torch.zeros(5, 4, 8), torch.zeros(5, 2, 8), torch.tensor([0, 5], dtype=torch.int32)
    monkeypatch.setattr(fa, "_torch_varlen", lambda: older)
    fa.torch_varlen_call(q, kv, kv, cu, 5, 0.5, window=3)
    fa.torch_varlen_call(q, kv, kv, cu, 5, 0.5)
    monkeypatch.setattr(fa, "_torch_varlen", lambda: newer)
    fa.torch_varlen_call(q, kv, kv, cu, 5, 0.5)
    with pytest.raises(NotImplementedError, match="sliding window"):
        fa.torch_varlen_call(q, kv, kv, cu, 5, 0.5, window=3)
    assert calls == [{"scale": 0.5, "window_size": (2, 0)}, {"scale": 0.5, "window_size": (-1, 0)},
                     {"scale": 0.5, "is_causal": True, "enable_gqa": True}]


@pytest.mark.parametrize("position_ids", [[[3, 4, 0, 1, 0, 1]], [[0, 1, 2, 0, 1, 2], [5, 6, 0, 1, 2, 3]]],
                         ids=["prefix-before-0", "two-packed-rows"])
def test_position_ids_split_rows_as_stock_sdpa_does(position_ids, kernel_calls):
    """Without a mask or cache, stock's SDPA mask starts a sequence wherever a position does not follow the one
    before by 1 (in every row): tokens before the first 0 are a sequence of their own."""
    model = tiny_llama()
    position_ids = torch.tensor(position_ids)
    ids = torch.randint(0, 101, position_ids.shape)
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    ours = logits_with(model, "fastsft", **inputs)
    torch.testing.assert_close(ours, logits_with(model, "sdpa", **inputs), rtol=1e-4, atol=1e-4)
    assert len(kernel_calls) == 2  # packed rows: the kernel, not an SDPA fallback
    assert not torch.allclose(ours, logits_with(model, "sdpa", input_ids=ids, use_cache=False), atol=1e-3)


def test_autocast_casts_q_k_v_to_the_autocast_dtype():
    """transformers hands over q, k and v as RoPE left them (float32 q and k, bfloat16 v under bf16 autocast on a
    float32 model): computed in the autocast dtype, as stock SDPA is."""
    q, k = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8)
    v = torch.randn(1, 2, 9, 8).bfloat16()
    module = torch.nn.Module()
    module.training = False
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fa.attention_forward(module, q, k, v, None, position_ids=position_ids)
    assert out.dtype == torch.bfloat16
    bounds = [(0, 4), (4, 7), (7, 9)]
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b].bfloat16().float(), k[:, :, a:b].bfloat16().float(), v[:, :, a:b].float(), is_causal=True,
        enable_gqa=True) for a, b in bounds], dim=2).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
