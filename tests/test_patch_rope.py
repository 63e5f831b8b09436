"""fastsft.patch's RoPE: the patched attention forward rotates q and k with fastsft.ops.rope, for patched models
only; the modeling modules' apply_rotary_pos_emb is never replaced.

Tiny float32 models on the CPU. Every parity test also counts the op's calls, so a patch that silently left the
original in place fails.
"""

from __future__ import annotations

import copy
import functools
import importlib

import pytest
import torch

import fastsft
from fastsft.patching import rope as rope_patch
from helpers import assert_close, backend_params, tiny_model

MODELING = {"llama": "transformers.models.llama.modeling_llama", "qwen3": "transformers.models.qwen3.modeling_qwen3",
            "gemma2": "transformers.models.gemma2.modeling_gemma2",
            "mistral": "transformers.models.mistral.modeling_mistral",
            "cohere": "transformers.models.cohere.modeling_cohere"}
ONLY_ROPE = dict(fused_cross_entropy=False, attention=False, rms_norm=False, lora=False, gated_activation=False)
LAYERS = 2  # helpers.TINY


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 96, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits_loss_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of fastsft.ops.rope made by the patched attention forwards (each a (q, k) pair)."""
    calls = []
    op = rope_patch.rope
    monkeypatch.setattr(rope_patch, "rope", lambda q, k, *a, **kw: calls.append((q, k)) or op(q, k, *a, **kw))
    return calls


@pytest.fixture
def counted(monkeypatch):
    """``counted(model_type)``: puts a counting wrapper of the family's own function in the module global (before
    patching, so it is what the patch checks and falls back to); returns (modeling module, calls list)."""
    def install(model_type):
        module = importlib.import_module(MODELING[model_type])
        original, calls = module.apply_rotary_pos_emb, []

        @functools.wraps(original)
        def counting(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "apply_rotary_pos_emb", counting)
        return module, calls

    return install


@pytest.fixture
def patched():
    """Models patched in a test, unpatched at its end (before monkeypatch restores the module globals)."""
    models = []
    yield models
    for model in models:
        fastsft.unpatch(model)


# --- parity, and the op really runs --------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "mistral"])
def test_patched_matches_unpatched_and_calls_the_op(model_type, op_calls, patched):
    model, inputs = tiny_model(model_type), batch()
    reference = copy.deepcopy(model)
    report = fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    assert report.patched["rope"].endswith(f": {LAYERS} attention modules"), str(report)
    logits, loss, grads = logits_loss_grads(model, inputs)
    assert len(op_calls) == LAYERS  # one call per layer: the op computed what the model used
    expected_logits, expected_loss, expected_grads = logits_loss_grads(reference, inputs)
    assert len(op_calls) == LAYERS  # the unpatched copy kept the original
    assert_close(logits, expected_logits, rtol=1e-5, name="logits")
    assert_close(loss, expected_loss, rtol=1e-5, name="loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-9, name=name)


@pytest.mark.parametrize("backend", backend_params("rope", "cpu"))
def test_every_backend_matches_with_gradient_checkpointing(backend, op_calls, patched):
    """Checkpointing recomputes each layer in backward: the recompute goes through the patched attention forward
    again (on autograd's thread on a GPU), so it calls the op too."""
    model, inputs = tiny_model("llama"), batch()
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    report = fastsft.patch(model, backend=backend, **ONLY_ROPE)
    patched.append(model)
    assert report.patched["rope"] == f"{backend}: {LAYERS} attention modules"
    logits, loss, grads = logits_loss_grads(model, inputs)
    assert len(op_calls) == 2 * LAYERS  # forward and recompute
    expected_logits, expected_loss, expected_grads = logits_loss_grads(reference, inputs)
    assert_close(logits, expected_logits, rtol=1e-5, name="logits")
    assert_close(loss, expected_loss, rtol=1e-5, name="loss")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-9, name=name)


def test_the_ops_output_is_what_attention_uses(monkeypatch, patched):
    # Guards the parity tests: an op giving other numbers must change the loss
    model, inputs = tiny_model("llama"), batch()
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    loss = model(**inputs).loss
    op = rope_patch.rope
    monkeypatch.setattr(rope_patch, "rope", lambda q, k, cos, sin, **kw: op(q, k, cos, -sin, **kw))
    assert not torch.allclose(model(**inputs).loss, loss)


def test_every_kernel_together_matches(op_calls, patched):
    model, inputs = tiny_model("qwen3"), batch()
    expected = model(**inputs).loss
    report = fastsft.patch(model)
    patched.append(model)
    assert {"rope", "attention", "rms_norm", "fused_cross_entropy"} <= report.patched.keys()
    assert_close(model(**inputs).loss, expected, rtol=1e-5)
    assert len(op_calls) == LAYERS


# --- scoping and unpatching ---------------------------------------------------------------------------------------

def test_an_unpatched_model_keeps_the_original(counted, op_calls, patched):
    module, original_calls = counted("llama")
    before = module.apply_rotary_pos_emb
    model, other, inputs = tiny_model("llama"), tiny_model("llama", seed=1), batch()
    expected = other(**inputs).logits
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    original_calls.clear()  # the patch's own check called it
    assert module.apply_rotary_pos_emb is before  # nothing of the process changes...
    torch.testing.assert_close(other(**inputs).logits, expected, rtol=0, atol=0)
    assert len(original_calls) == LAYERS and not op_calls  # ...and only patched models use the op
    model(**inputs)
    assert len(original_calls) == LAYERS and len(op_calls) == LAYERS


def test_unpatch_takes_the_forward_off(op_calls):
    from fastsft.patching.attention_forward import STATE_ATTR

    first, second = tiny_model("llama"), tiny_model("llama", seed=1)
    for model in (first, second):
        fastsft.patch(model, **ONLY_ROPE)
    assert fastsft.unpatch(first) is True
    attention = first.model.layers[0].self_attn
    assert "forward" not in attention.__dict__ and STATE_ATTR not in attention.__dict__
    first(**batch())
    assert not op_calls
    second(**batch())
    assert len(op_calls) == LAYERS
    assert fastsft.unpatch(second) is True
    second(**batch())
    assert len(op_calls) == LAYERS


def test_a_rotation_replaced_after_patching_is_what_runs(counted, op_calls, patched):
    """The patch checked the modeling module's function; one put there since (another library's) is called as
    the stock forward would call it, not bypassed."""
    module, _ = counted("llama")
    model, inputs = tiny_model("llama"), batch()
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    expected = model(**inputs).logits
    assert len(op_calls) == LAYERS
    theirs = []
    original = module.apply_rotary_pos_emb
    setattr(module, "apply_rotary_pos_emb", lambda *a, **kw: theirs.append(1) or original(*a, **kw))
    try:
        got = model(**inputs).logits
    finally:
        setattr(module, "apply_rotary_pos_emb", original)
    assert len(theirs) == LAYERS and len(op_calls) == LAYERS
    assert_close(got, expected, rtol=1e-5, name="logits")


def test_repatch_and_refresh_keep_one_forward(op_calls):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    fastsft.patch(model)
    fastsft.patch(model)  # re-patching unpatches first: one forward per module
    attention = model.model.layers[0].self_attn
    assert len(attention.__dict__["_fastsft_forwards"]) == 1
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    report = fastsft.patching.refresh(peft_model)
    assert "rope" in report.patched and "lora" in report.patched
    assert len(attention.__dict__["_fastsft_forwards"]) == 1  # RoPE and q/k/v LoRA share one forward
    peft_model(**batch()).loss.backward()
    assert len(op_calls) == LAYERS


# --- which families ----------------------------------------------------------------------------------------------

def test_cohere_is_skipped_with_the_reason(counted):
    module, _ = counted("cohere")
    before = module.apply_rotary_pos_emb
    model = tiny_model("cohere")
    report = fastsft.patch(model)
    assert "rope" not in report.patched
    assert "rotate-half" in report.skipped["rope"] and "modeling_cohere" in report.skipped["rope"], str(report)
    assert module.apply_rotary_pos_emb is before
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    assert {"fused_cross_entropy", "attention"} <= report.patched.keys()  # the other kernels are unaffected


def test_cos_sin_with_unequal_halves_are_refused(monkeypatch, counted):
    """The fast backward is the rotation by -sin: the transpose only when cos/sin repeat over the two halves."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    module, _ = counted("llama")
    before = module.apply_rotary_pos_emb
    forward = LlamaRotaryEmbedding.forward

    def skewed(self, x, position_ids):
        cos, sin = forward(self, x, position_ids)
        return cos, sin * torch.linspace(0.5, 1.5, sin.shape[-1])

    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", skewed)
    report = fastsft.patch(tiny_model("llama"))
    assert "halves differ" in report.skipped["rope"], str(report)
    assert module.apply_rotary_pos_emb is before


def test_switch_off_and_meta_device(counted):
    module, _ = counted("llama")
    before = module.apply_rotary_pos_emb
    report = fastsft.patch(tiny_model("llama"), rope=False)
    assert report.skipped["rope"] == "turned off" and module.apply_rotary_pos_emb is before
    with torch.device("meta"):
        meta = tiny_model("llama")
    assert "meta" in fastsft.patch(meta).skipped["rope"]


# --- calls the op does not take -------------------------------------------------------------------------------------

def test_float64_model_falls_back_to_the_original(counted, op_calls, patched):
    module, original_calls = counted("llama")
    model, inputs = tiny_model("llama").double(), batch()
    expected = copy.deepcopy(model)(**inputs).logits
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    original_calls.clear()
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert len(original_calls) == LAYERS and not op_calls


def qkcs(B=2, H=4, Hk=2, S=5, D=8, dtype=torch.float32, cos_batch=None):
    g = torch.Generator().manual_seed(3)
    angle = torch.rand(cos_batch or B, S, D // 2, generator=g, dtype=torch.float64) * 6.3
    angle = torch.cat((angle, angle), -1)
    return (torch.randn(B, H, S, D, generator=g).to(dtype), torch.randn(B, Hk, S, D, generator=g).to(dtype),
            angle.cos().to(dtype), angle.sin().to(dtype))


def call_cases():
    q, k, cos, sin = qkcs()
    return {
        "float64": tuple(t.double() for t in (q, k, cos, sin)),
        "cos [S, D]": (q, k, cos[0], sin[0]),
        "cos needs a gradient": (q, k, cos.clone().requires_grad_(), sin),
        "odd head_dim": (q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]),
        "partial rotary": (q, k, cos[..., :4], sin[..., :4]),
        "k head_dim differs": (q, k[..., :6], cos, sin),
        "cos batch 3 for q batch 2": (q, k) + qkcs(B=3)[2:],
        "3-D q": (q[0], k[0], cos, sin),
    }


@pytest.mark.parametrize("case", list(call_cases()))
def test_calls_it_does_not_take_go_to_the_original(case, op_calls):
    """``rotate`` declines (None: the patched forward calls the modeling module's function) what the op would not
    compute as the original does."""
    assert rope_patch.rotate(*call_cases()[case], "auto") is None and not op_calls


def test_a_call_it_does_not_take_runs_the_original_in_the_model(counted, op_calls, patched, monkeypatch):
    module, original_calls = counted("llama")
    model, inputs = tiny_model("llama"), batch()
    expected = copy.deepcopy(model)(**inputs).logits
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    original_calls.clear()
    monkeypatch.setattr(rope_patch, "_takes", lambda *a: False)
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert len(original_calls) == LAYERS and not op_calls


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float16, torch.bfloat16)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_calls_it_takes_give_the_originals_dtype_and_values(dtypes, op_calls):
    """q/k in one dtype, cos/sin in another (autocast): the original computes and returns the promoted dtype."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    qk_dtype, cs_dtype = dtypes
    q, k, cos, sin = qkcs(cos_batch=1)
    q, k, cos, sin = q.to(qk_dtype), k.to(qk_dtype), cos.to(cs_dtype), sin.to(cs_dtype)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    out = rope_patch.rotate(q, k, cos, sin, "auto")
    assert len(op_calls) == 1
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype
        # the op computes in float32; the original in bf16 rounds each product
        assert_close(o.float(), e.float(), rtol=1e-6 if e.dtype == torch.float32 else 1e-2)
