"""fastsft.patch's RoPE: transformers' apply_rotary_pos_emb through fastsft.ops.rope, for patched models only.

Tiny float32 models on the CPU. Every parity test also counts the op's calls, so a patch that silently left the
original in place fails.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
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


def true_original(module):
    """The modeling module's own function, also when a patched model (of another test) has it replaced now."""
    current = module.apply_rotary_pos_emb
    entry = getattr(current, "_fastsft_rope", None)
    return entry.original if entry is not None else current


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of fastsft.ops.rope made by the patched global (each a (q, k) pair)."""
    calls = []
    op = rope_patch.rope
    monkeypatch.setattr(rope_patch, "rope", lambda q, k, *a, **kw: calls.append((q, k)) or op(q, k, *a, **kw))
    return calls


@pytest.fixture
def counted(monkeypatch):
    """``counted(model_type)``: puts a counting wrapper of the family's own function in the module global (before
    patching, so it is what the patch replaces and falls back to); returns (modeling module, calls list)."""
    def install(model_type):
        module = importlib.import_module(MODELING[model_type])
        original, calls = true_original(module), []

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


@contextlib.contextmanager
def flag(backend="auto"):
    """What a patched attention forward does around the class forward."""
    previous = getattr(rope_patch._local, "backend", None)
    rope_patch._local.backend = backend
    try:
        yield
    finally:
        rope_patch._local.backend = previous


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
    again (on autograd's thread on a GPU), so it sets the flag and calls the op too."""
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
    assert module.apply_rotary_pos_emb is not before  # replaced for the process...
    torch.testing.assert_close(other(**inputs).logits, expected, rtol=0, atol=0)
    assert len(original_calls) == LAYERS and not op_calls  # ...but only patched models use the op
    model(**inputs)
    assert len(original_calls) == LAYERS and len(op_calls) == LAYERS
    assert getattr(rope_patch._local, "backend", None) is None  # the flag is down again after the forward


@pytest.mark.parametrize("order", ["first_patched_first", "last_patched_first"])
def test_unpatch_restores_the_global_in_either_order(order, counted, op_calls):
    module, _ = counted("llama")
    qwen3, _ = counted("qwen3")
    before, before_qwen3 = module.apply_rotary_pos_emb, qwen3.apply_rotary_pos_emb
    first, second, third = tiny_model("llama"), tiny_model("llama", seed=1), tiny_model("qwen3")
    for model in (first, second, third):
        fastsft.patch(model, **ONLY_ROPE)
    replacement = module.apply_rotary_pos_emb
    assert replacement is not before and replacement._fastsft_rope.users == 2
    assert qwen3.apply_rotary_pos_emb is not before_qwen3
    one, two = (first, second) if order == "first_patched_first" else (second, first)

    assert fastsft.unpatch(one) is True
    assert module.apply_rotary_pos_emb is replacement  # the other llama still uses it
    assert "forward" not in one.model.layers[0].self_attn.__dict__
    two(**batch())
    assert len(op_calls) == LAYERS
    one(**batch())
    assert len(op_calls) == LAYERS

    assert fastsft.unpatch(two) is True
    assert module.apply_rotary_pos_emb is before
    assert qwen3.apply_rotary_pos_emb is not before_qwen3  # the qwen3 model is still patched
    fastsft.unpatch(third)
    assert qwen3.apply_rotary_pos_emb is before_qwen3


def test_repatch_refresh_and_garbage_collection_keep_the_count(counted, op_calls):
    from peft import LoraConfig, get_peft_model

    module, _ = counted("llama")
    before = module.apply_rotary_pos_emb
    model = tiny_model("llama")
    fastsft.patch(model)
    fastsft.patch(model)  # re-patching unpatches first
    assert module.apply_rotary_pos_emb._fastsft_rope.users == 1
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    report = fastsft.patching.refresh(peft_model)
    assert "rope" in report.patched and "lora" in report.patched
    assert module.apply_rotary_pos_emb._fastsft_rope.users == 1
    peft_model(**batch()).loss.backward()
    assert len(op_calls) == LAYERS
    del model, peft_model, report
    gc.collect()  # a patched model dropped without unpatch gives the global back too
    assert module.apply_rotary_pos_emb is before


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
    bshd = (q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, S, H, D], rotated with unsqueeze_dim=2
    return {
        "float64": (tuple(t.double() for t in (q, k, cos, sin)), {}),
        "unsqueeze_dim=2": (bshd, {"unsqueeze_dim": 2}),
        "unsqueeze_dim=2 positional": (bshd + (2,), {}),
        "cos [S, D]": ((q, k, cos[0], sin[0]), {}),
        "cos needs a gradient": ((q, k, cos.clone().requires_grad_(), sin), {}),
        "odd head_dim": ((q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]), {}),
        "partial rotary": ((q, k, cos[..., :4], sin[..., :4]), {}),
        "k head_dim differs": ((q, k[..., :6], cos, sin), {}),
        "cos batch 3 for q batch 2": ((q, k) + qkcs(B=3)[2:], {}),
        "3-D q": ((q[0], k[0], cos, sin), {}),
        "unknown keyword": ((q, k, cos, sin), {"position_ids": None}),  # 5.17's function has no position_ids
    }


@pytest.mark.parametrize("case", list(call_cases()))
def test_calls_it_does_not_take_go_to_the_original(case, counted, op_calls, patched):
    module, original_calls = counted("llama")
    model = tiny_model("llama")
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    original = true_original(module)
    args, kwargs = call_cases()[case]
    try:
        expected = original(*args, **kwargs)
    except Exception as exc:
        expected = exc
    original_calls.clear()
    with flag():
        if isinstance(expected, Exception):
            with pytest.raises(type(expected)):
                module.apply_rotary_pos_emb(*args, **kwargs)
        else:
            out = module.apply_rotary_pos_emb(*args, **kwargs)
            for o, e in zip(out, expected):
                torch.testing.assert_close(o, e, rtol=0, atol=0)
    assert len(original_calls) == 1 and not op_calls


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float16, torch.bfloat16)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_calls_it_takes_give_the_originals_dtype_and_values(dtypes, counted, op_calls, patched):
    """q/k in one dtype, cos/sin in another (autocast): the original computes and returns the promoted dtype."""
    module, original_calls = counted("llama")
    model = tiny_model("llama")
    fastsft.patch(model, **ONLY_ROPE)
    patched.append(model)
    qk_dtype, cs_dtype = dtypes
    q, k, cos, sin = qkcs(cos_batch=1)
    q, k, cos, sin = q.to(qk_dtype), k.to(qk_dtype), cos.to(cs_dtype), sin.to(cs_dtype)
    expected = true_original(module)(q, k, cos, sin)
    original_calls.clear()
    with flag():
        out = module.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    assert len(op_calls) == 1 and not original_calls
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype
        # the op computes in float32; the original in bf16 rounds each product
        assert_close(o.float(), e.float(), rtol=1e-6 if e.dtype == torch.float32 else 1e-2)


def test_the_flag_is_restored_when_the_forward_raises_and_when_nested(patched):
    model = tiny_model("llama")
    fastsft.patch(model, backend="reference", **ONLY_ROPE)
    patched.append(model)
    attention = model.model.layers[0].self_attn
    with pytest.raises(Exception):
        attention(torch.zeros(1, 3, 5), position_embeddings=None)  # wrong width
    assert getattr(rope_patch._local, "backend", None) is None
    with flag("outer"):
        hidden = torch.randn(1, 3, 32)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
        attention(hidden, position_embeddings=(cos, sin), attention_mask=None)
        assert rope_patch._local.backend == "outer"
