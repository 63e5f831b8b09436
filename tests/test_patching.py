"""fastsft.patch / unpatch on tiny causal LMs of every supported family (CPU, float32)."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fastsft
from fastsft.patching import FAMILIES, is_patched
from helpers import assert_close, tiny_model

def batch(vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad()
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patched_loss_and_grads_match_unpatched(model_type):
    model, inputs = tiny_model(model_type), batch()
    expected_loss, expected_grads = loss_and_grads(model, inputs)
    report = fastsft.patch(model)
    # every kernel the family has a place for (Cohere normalizes with LayerNorm, not RMSNorm, and rotates
    # interleaved pairs, not halves)
    expected = {"fused_cross_entropy", "attention", "gated_activation"} | ({"rms_norm", "rope"}
                                                                           if model_type != "cohere" else set())
    assert report.patched.keys() == expected, str(report)
    out = model(**inputs)
    assert out.logits is None  # the fused path never builds them
    loss, grads = loss_and_grads(model, inputs)
    assert_close(loss, expected_loss, rtol=1e-5, name="loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-9, name=name)


def test_softcap_is_applied():
    # Guards the table: the same weights without the soft-cap give a different loss
    model, inputs = tiny_model("gemma2"), batch()
    fastsft.patch(model)
    with_cap = model(**inputs).loss
    model.config.final_logit_softcapping = None
    fastsft.patch(model)  # re-patching re-reads the config
    assert not torch.allclose(with_cap, model(**inputs).loss)


def test_num_items_in_batch_shift_labels_and_logits_to_keep():
    model, inputs = tiny_model(), batch()
    expected = {"nib": model(**inputs, num_items_in_batch=torch.tensor(7)).loss}
    # transformers uses shift_labels (already shifted) in place of shifting labels; mask a few more so they differ
    shift = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    shift[:, 6:8] = -100
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    expected["shift"] = model(**inputs, shift_labels=shift).loss
    keep_labels = inputs["labels"][:, -5:]
    expected["keep"] = model(**no_labels, labels=keep_labels, logits_to_keep=5).loss
    fastsft.patch(model)
    assert_close(model(**inputs, num_items_in_batch=torch.tensor(7)).loss, expected["nib"], rtol=1e-5)
    assert_close(model(**inputs, shift_labels=shift).loss, expected["shift"], rtol=1e-5)
    assert_close(model(**no_labels, shift_labels=shift).loss, expected["shift"], rtol=1e-5)  # TRL passes only these
    assert not torch.allclose(expected["shift"], model(**inputs).loss)
    assert_close(model(**no_labels, labels=keep_labels, logits_to_keep=5).loss, expected["keep"], rtol=1e-5)


def test_without_labels_the_original_forward_runs():
    model, inputs = tiny_model(), batch()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**no_labels).logits
    generated = model.generate(inputs["input_ids"][:1], max_new_tokens=4, do_sample=False)
    # the head patch alone: without labels, exactly the original forward
    fastsft.patch(model, attention=False, rms_norm=False, gated_activation=False)
    torch.testing.assert_close(model(**no_labels).logits, logits, rtol=0, atol=0)
    # every kernel: the same logits on real tokens up to float32 rounding (pad positions are free to differ), and
    # the same generation
    fastsft.patch(model)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**no_labels).logits[real], logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.generate(inputs["input_ids"][:1], max_new_tokens=4, do_sample=False), generated)


def test_patch_unpatch_round_trip_is_per_instance():
    model, other = tiny_model(), tiny_model()
    class_forward = type(model).forward
    fastsft.patch(model)
    assert is_patched(model) and not is_patched(other)
    assert model(**batch()).logits is None and other(**batch()).logits is not None
    assert type(model).forward is class_forward
    assert fastsft.unpatch(model) is True
    assert "forward" not in model.__dict__ and not is_patched(model)
    assert model(**batch()).logits is not None
    assert fastsft.unpatch(model) is False


def test_switches_and_report():
    model = tiny_model()
    report = fastsft.patch(model, fused_cross_entropy=False)
    assert "fused_cross_entropy" not in report.patched and report.skipped["fused_cross_entropy"] == "turned off"
    assert "forward" not in model.__dict__  # the head is left alone
    off = {name: False for name in report.patched}
    report = fastsft.patch(model, fused_cross_entropy=False, **off)
    assert not report.patched and not is_patched(model)
    report = fastsft.patch(model, backend="reference")
    assert report.patched["fused_cross_entropy"] == "reference"
    assert report.patched["rms_norm"].startswith("reference: 5 modules")  # 2 layers x 2 norms + the final norm
    assert report.patched["attention"] == "reference (packed and dense rows)"
    assert "no PEFT LoRA layers" in report.skipped["lora"]  # a plain model: nothing to fuse
    assert report.patched["rope"] == "reference: 2 attention modules"
    text = str(report)
    assert "fused_cross_entropy" in text and "patched" in text and "backend reference" in text
    report = fastsft.patch(model, attention=False, rms_norm=False)
    assert report.skipped["attention"] == report.skipped["rms_norm"] == "turned off"
    assert model.config._attn_implementation != "fastsft"


def test_unsupported_architecture_warns_and_is_left_alone():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                  vocab_size=96))
    with pytest.warns(UserWarning, match="not a supported architecture"):
        report = fastsft.patch(model)
    assert not report.supported and not report.patched and "unsupported" in str(report)
    assert "forward" not in model.__dict__ and not is_patched(model)


def test_bad_input_raises_clearly(monkeypatch):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastsft.patch(torch.nn.Linear(2, 2))
    model = tiny_model()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastsft.backends.BackendUnavailable):
        fastsft.patch(model, backend="triton")
    assert not is_patched(model)  # decided before anything changed: never half-patched
    fastsft.patch(model)
    with pytest.raises(ValueError, match="need labels"):
        model(input_ids=batch()["input_ids"], return_token_stats=True)


def test_survives_train_eval_and_gradient_checkpointing():
    model, inputs = tiny_model(), batch()
    model.gradient_checkpointing_enable()
    model.train()
    expected_loss, expected_grads = loss_and_grads(model, inputs)
    fastsft.patch(model)
    model.eval()
    model.train()
    loss, grads = loss_and_grads(model, inputs)
    assert model.is_gradient_checkpointing and is_patched(model)
    assert_close(loss, expected_loss, rtol=1e-5)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-9, name=name)


def test_autocast_matches_unpatched_in_bfloat16():
    model, inputs = tiny_model(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**inputs).loss
        fastsft.patch(model)
        loss = model(**inputs).loss
    assert loss.dtype == torch.float32
    assert_close(loss, expected.float(), rtol=2e-2)


def test_peft_model_save_load_gives_same_outputs(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    inputs = batch()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    # init_lora_weights=False: random non-zero B, so the adapter changes the outputs and the test can fail
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    report = fastsft.patch(peft_model)
    assert report.patched and is_patched(peft_model)
    loss = peft_model(**inputs).loss
    logits = peft_model(**no_labels).logits
    peft_model.save_pretrained(tmp_path)

    plain = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert "forward" not in plain.get_base_model().__dict__
    real = inputs["attention_mask"].bool()  # pad positions are free to differ under fastsft attention
    torch.testing.assert_close(plain(**no_labels).logits[real], logits[real], rtol=1e-5, atol=1e-5)
    assert "lora" in report.patched  # the fused LoRA path produced those logits
    assert_close(plain(**inputs).loss, loss, rtol=1e-5)
    assert not torch.allclose(tiny_model()(**no_labels).logits, logits)  # the adapter matters


def test_float64_model_trains_patched():
    """Float64 is no kernel's dtype: every patched module must step to its reference, not fail (the distributed
    parity test trains in float64)."""
    model, inputs = tiny_model().double(), batch()
    expected_loss, expected_grads = loss_and_grads(model, inputs)
    report = fastsft.patch(model)
    assert {"fused_cross_entropy", "rms_norm", "attention"} <= report.patched.keys()
    loss, grads = loss_and_grads(model, inputs)
    # transformers' own loss casts the logits to float32 (here a downcast), the fused op stays in float64: the
    # unpatched side is the one at float32 precision
    assert_close(loss, expected_loss, rtol=1e-6, name="loss")
    assert loss.dtype == torch.float64
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-6, atol=1e-12, name=name)


def test_lora_mlp_fusion_follows_each_layers_checkpointing_flag(monkeypatch):
    """The fused LoRA MLP (which recomputes inside) runs where the MLP's own decoder layer does not checkpoint, and
    deciding that reads the layer's flag: the model-wide property walks every module per call when it is off."""
    from peft import LoraConfig, get_peft_model

    import fastsft.ops

    fused = []
    lora_mlp = fastsft.ops.lora_mlp
    monkeypatch.setattr(fastsft.ops, "lora_mlp", lambda x, *a, **k: fused.append(x) or lora_mlp(x, *a, **k))
    inputs = batch()
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fastsft.patch(model)
    base = model.get_base_model()
    walks = []
    prop = type(base).is_gradient_checkpointing
    monkeypatch.setattr(type(base), "is_gradient_checkpointing",
                        property(lambda self: walks.append(1) or prop.fget(self)))

    model(**inputs).loss.backward()
    layers = base.model.layers
    assert len(fused) == len(layers) and not walks
    layers[0].gradient_checkpointing = True  # as transformers 5.24's every_n_layers leaves some layers
    fused.clear()
    model.eval()  # the flag alone, without the layer running checkpoint (it has no checkpointing function here)
    with torch.no_grad():
        model(**inputs)
    assert len(fused) == len(layers) - 1 and not walks


def test_inference_mode_forward_and_generate_match_unpatched():
    model, inputs = tiny_model(), batch()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    prompt = inputs["input_ids"][:1]
    with torch.inference_mode():
        logits = model(**no_labels).logits
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    fastsft.patch(model)
    with torch.inference_mode():
        patched_logits = model(**no_labels).logits  # right padding: the padding-mask check runs under inference mode
        patched_generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(patched_logits[real], logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched_generated, generated)
