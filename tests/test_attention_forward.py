"""The patched attention forward (fastsft.patching.attention_forward) against the stock one of every family: q/k/v
LoRA as one op and RoPE through fastsft.ops.rope, forward and LoRA gradients, generation with a KV cache; a class
it does not recognise keeps its own forward; no global of a transformers modeling module is replaced."""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch

import fastsft
from fastsft.patching import attention_forward, rope as rope_patch
from helpers import assert_close, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere", "granite"]
ONLY = dict(fused_cross_entropy=False, attention=False, rms_norm=False, gated_activation=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LAYERS = 2  # helpers.TINY


def peft_model(model_type, dtype=torch.float32, **overrides):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(model_type, **overrides).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return model.to(dtype)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 96, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    gen = torch.Generator().manual_seed(2)
    (logits * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def calls(monkeypatch):
    """What the patched forwards fused: ``{"qkv": n, "rope": n}``."""
    counts = {"qkv": 0, "rope": 0}
    group, op = attention_forward.fused_group, rope_patch.rope

    def counting_group(layers, *args):
        out = group(layers, *args)
        counts["qkv"] += out is not None and len(layers) == 3
        return out

    def counting_rope(*args, **kwargs):
        counts["rope"] += 1
        return op(*args, **kwargs)

    monkeypatch.setattr(attention_forward, "fused_group", counting_group)
    monkeypatch.setattr(rope_patch, "rope", counting_rope)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_matches_the_stock_forward(model_type, dtype, calls):
    """Logits and every LoRA gradient of the patched model equal the stock one's; q/k/v ran as one op in each
    layer (not Qwen2's, whose projections have a bias: left to PEFT), and RoPE through fastsft's op wherever the
    family takes it (not Cohere's interleaved rotation, not float64, which the op does not take)."""
    overrides = {"use_qk_norm": True} if model_type == "cohere" else {}
    model, inputs = peft_model(model_type, dtype, **overrides), batch()
    stock = copy.deepcopy(model)
    report = fastsft.patch(model, **ONLY)
    fused = LAYERS if model_type != "qwen2" else 0
    assert ("q/k/v as one op in 2 attention modules" in report.patched["lora"]) == bool(fused), str(report)
    assert ("rope" in report.patched) == (model_type != "cohere"), str(report)
    logits, grads = logits_and_grads(model, inputs)
    assert calls["qkv"] == fused
    assert calls["rope"] == (LAYERS if model_type != "cohere" and dtype == torch.float32 else 0)
    want_logits, want_grads = logits_and_grads(stock, inputs)
    assert calls["qkv"] == fused  # the stock copy runs its own forward
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(logits, want_logits, rtol=rtol, name="logits")
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], rtol=rtol, atol=1e-9 if dtype == torch.float32 else 0, name=name)
    fastsft.unpatch(model)


@pytest.mark.parametrize("lora,rope", [(True, False), (False, True)], ids=["lora-only", "rope-only"])
def test_each_switch_turns_its_part_on_alone(lora, rope, calls):
    model, inputs = peft_model("qwen3"), batch()
    expected = copy.deepcopy(model)(**inputs).logits
    report = fastsft.patch(model, lora=lora, rope=rope, **ONLY)
    assert ("lora" in report.patched) == lora and ("rope" in report.patched) == rope, str(report)
    attention = model.base_model.model.model.layers[0].self_attn
    state = attention.__dict__[attention_forward.STATE_ATTR]
    assert (state.qkv is not None) == lora and (state.rope is not None) == rope
    assert_close(model(**inputs).logits, expected, rtol=1e-5, name="logits")
    assert calls == {"qkv": LAYERS if lora else 0, "rope": LAYERS if rope else 0}
    fastsft.unpatch(model)
    assert attention_forward.STATE_ATTR not in attention.__dict__ and "forward" not in attention.__dict__


def test_an_unrecognised_attention_keeps_its_forward_with_the_reason(calls):
    """An attention class whose forward is not one of the known structures (here: Llama's with the output scaled)
    keeps it: RoPE is skipped with the reason, and its q/k/v LoRA layers are fused one by one."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class ScaledAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            out, weights = super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
            return out * 0.5, weights

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = ScaledAttention
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    inputs = batch()
    expected = copy.deepcopy(model)(**inputs).logits
    report = fastsft.patch(model, **ONLY)
    reason = "ScaledAttention.forward is not an attention forward fastsft can stand in for"
    assert reason in report.skipped["rope"], str(report)
    assert "q/k/v as one op in 0 attention modules" in report.patched["lora"] and reason in report.patched["lora"]
    attention = model.base_model.model.model.layers[0].self_attn
    assert attention_forward.STATE_ATTR not in attention.__dict__ and "forward" not in attention.__dict__
    assert_close(model(**inputs).logits, expected, rtol=1e-5, name="logits")
    assert calls == {"qkv": 0, "rope": 0}
    fastsft.unpatch(model)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_generation_with_a_kv_cache_matches_stock(model_type, calls):
    """Greedy generation (the cache updated in each patched forward) gives the stock tokens, and the logits of a
    step on a cache equal the stock ones."""
    from transformers import DynamicCache

    model = peft_model(model_type).eval()
    stock = copy.deepcopy(model)
    fastsft.patch(model, **ONLY)
    prompt = batch()["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(input_ids=prompt, **kwargs)
        assert calls["qkv"] >= LAYERS * 6 and calls["rope"] >= LAYERS * 6
        assert torch.equal(tokens, stock.generate(input_ids=prompt, **kwargs))
        steps = []
        for m in (model, stock):
            cache = DynamicCache(config=m.config)
            m(input_ids=prompt, past_key_values=cache, use_cache=True)
            steps.append(m(input_ids=tokens[:, 6:7], past_key_values=cache, use_cache=True).logits)
    assert_close(steps[0], steps[1], rtol=1e-5, name="logits on the cache")
    fastsft.unpatch(model)


def test_output_attentions_with_eager_matches_stock():
    model, inputs = peft_model("llama"), batch()
    model.base_model.model.set_attn_implementation("eager")
    stock = copy.deepcopy(model)
    fastsft.patch(model, **ONLY)
    got = model(**inputs, output_attentions=True)
    want = stock(**inputs, output_attentions=True)
    assert_close(got.logits, want.logits, rtol=1e-5, name="logits")
    assert got.attentions is not None and len(got.attentions) == len(want.attentions) == LAYERS
    for g, w in zip(got.attentions, want.attentions):
        assert_close(g, w, rtol=1e-5, atol=1e-7, name="attention weights")
    fastsft.unpatch(model)


def test_a_deep_copy_fuses_its_own_layers():
    model, inputs = peft_model("llama"), batch()
    fastsft.patch(model, **ONLY)
    clone = copy.deepcopy(model)
    for name, p in clone.named_parameters():
        if "lora_B" in name:
            p.data.mul_(2.0)
    attention = clone.base_model.model.model.layers[0].self_attn
    state = attention.__dict__[attention_forward.STATE_ATTR]
    assert state.qkv[0] is attention.q_proj
    assert state.globals is inspect.unwrap(type(attention).forward).__globals__
    got = clone(**inputs).logits
    fastsft.unpatch(clone)
    assert_close(got, clone(**inputs).logits, rtol=1e-5, name="the copy, patched and unpatched")
    assert not torch.allclose(got, model(**inputs).logits)  # the original kept its own adapters
    fastsft.unpatch(model)


def test_no_global_of_a_modeling_module_is_replaced():
    """Patching, running and unpatching leaves every module-level name of transformers' modeling modules as it
    was: the patch is the model's own modules' forwards only."""
    models = {t: peft_model(t) for t in ("llama", "qwen3", "gemma2", "cohere")}

    def snapshot():
        return {name: dict(vars(module)) for name, module in list(sys.modules.items())
                if name.startswith("transformers.models.") and ".modeling_" in name and module is not None}

    before = snapshot()
    for model in models.values():
        fastsft.patch(model)
        model(**batch()).logits.sum().backward()
    after = snapshot()
    for name, names in before.items():
        changed = [k for k, v in names.items() if after[name].get(k, object()) is not v]
        assert not changed, f"{name}: {changed}"
    for model in models.values():
        fastsft.unpatch(model)


def test_the_check_finds_where_each_family_reads_its_arguments():
    """The structure found at patch time: Qwen3's q/k norm, Mistral's window from the config, Gemma 2's soft-cap
    from attn_logit_softcapping, the cache parameter of the installed transformers."""
    expected = {"qwen3": ("inside", {("sliding_window", "self", "sliding_window")}),
                "mistral": (None, {("sliding_window", "config", "sliding_window")}),
                "gemma2": (None, {("sliding_window", "self", "sliding_window"),
                                  ("softcap", "self", "attn_logit_softcapping")}),
                "llama": (None, set())}
    for model_type, (norm, extra) in expected.items():
        model = peft_model(model_type)
        fastsft.patch(model, **ONLY)
        attention = model.base_model.model.model.layers[0].self_attn
        structure = attention.__dict__[attention_forward.STATE_ATTR].structure
        assert structure.norm == norm and set(structure.extra) == extra, (model_type, structure)
        cache = [n for n in inspect.signature(inspect.unwrap(type(attention).forward)).parameters
                 if n in ("past_key_values", "cache")]
        assert structure.cache == cache[0], (model_type, structure)
        fastsft.unpatch(model)


def test_an_argument_read_from_elsewhere_keeps_the_stock_forward():
    """A forward that passes the interface a value fastsft finds on no attribute is left alone, with the reason."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class CappedAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            return super().forward(hidden_states, position_embeddings, attention_mask, softcap=0.123, **kwargs)

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = CappedAttention
    report = fastsft.patch(model, **ONLY)
    assert "it passes softcap=0.123 to the attention interface from no attribute fastsft reads" in \
        report.skipped["rope"], str(report)
    fastsft.unpatch(model)


def test_the_check_leaves_the_module_as_it_was():
    """The check runs the stock forward on a recording attention implementation for that module only: afterwards
    the module reads the model's config again, and the recording implementation refuses calls from a model."""
    from transformers import AttentionInterface

    model = peft_model("qwen3")
    configs = [layer.self_attn.config for layer in model.base_model.model.model.layers]
    fastsft.patch(model, **ONLY)
    assert [layer.self_attn.config for layer in model.base_model.model.model.layers] == configs
    assert all(c is model.base_model.model.config for c in configs)
    assert model.base_model.model.config._attn_implementation != attention_forward._PROBE
    probe = AttentionInterface._global_mapping[attention_forward._PROBE]
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="patch-time check"):
        probe(None, q, q, q, None)
    fastsft.unpatch(model)


def test_a_keyword_the_patched_forward_does_not_know_runs_the_stock_forward(calls):
    """A keyword parameter of the stock forward beyond the cache, given a value, sends that call to the stock
    forward; without it the call is fused."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class ScalableAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, scale=None, **kwargs):
            out, weights = super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
            return (out if scale is None else out * scale), weights

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = ScalableAttention
    stock = copy.deepcopy(model)
    report = fastsft.patch(model, **ONLY)
    assert "rope" in report.patched, str(report)
    attention, reference = model.model.layers[0].self_attn, stock.model.layers[0].self_attn
    x = torch.randn(1, 5, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, torch.arange(5)[None])
    plain = attention(x, (cos, sin), None)[0]
    assert calls["rope"] == 1
    scaled = attention(x, (cos, sin), None, scale=3.0)[0]
    assert calls["rope"] == 1  # the stock forward ran
    assert_close(plain, reference(x, (cos, sin), None)[0], rtol=1e-5, name="fused")
    assert_close(scaled, reference(x, (cos, sin), None, scale=3.0)[0], rtol=1e-5, name="stock")
    fastsft.unpatch(model)
