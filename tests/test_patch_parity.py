"""A patched model behaves as the same model unpatched: under autocast, with odd packed rows, behind accelerate's
offload hooks, beside models sharing its config, deep-copied, and in its tuple outputs (CPU, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastsft
from fastsft.patching import is_patched
from helpers import assert_close, tiny_model

VOCAB = 96


def ids(shape=(2, 12), seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model(seed=seed), LoraConfig(r=4, target_modules="all-linear",
                                                            init_lora_weights=False))


def output_dtypes(model, run) -> dict:
    """The dtype of every module's tensor output during ``run()`` (forward and checkpointed recompute)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        def hook(module, args, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                seen.setdefault(name, set()).add(out.dtype)
        handles.append(module.register_forward_hook(hook))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, seen


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_bf16_autocast_checkpointed_packed_step_follows_stock(with_lora, device):
    """float32 weights, bfloat16 autocast, non-reentrant checkpointing, packed rows (TRL's defaults on a float32
    model): every patched module's output has the dtype of the stock module's, and loss and gradients agree."""
    input_ids = ids((1, 12)).to(device)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]], device=device)
    results = {}
    for patched in (False, True):
        model = (lora_model() if with_lora else tiny_model()).to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if patched:
            report = fastsft.patch(model)
            assert {"attention", "rms_norm", "rope", "gated_activation"} <= report.patched.keys(), str(report)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids).loss
            loss.backward()
            return loss.detach()

        loss, dtypes = output_dtypes(model, step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[patched] = loss, dtypes, grads
    (loss, dtypes, grads), (ref_loss, ref_dtypes, ref_grads) = results[True], results[False]
    # stock modules that patched models do not call: the head (the fused loss builds no logits) and the
    # activation (a fused gated kernel)
    skipped = ("lm_head", "act_fn")
    assert {k: v for k, v in dtypes.items() if not k.endswith(skipped)} == \
        {k: v for k, v in ref_dtypes.items() if not k.endswith(skipped)}
    assert_close(loss, ref_loss, rtol=2e-2, name="loss")
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], rtol=5e-2, atol=1e-6, name=name)


def test_position_ids_not_starting_at_zero_match_stock():
    """Tokens before a row's first 0 are a sequence of their own, as stock's SDPA masks make them (stock splits
    packed rows only without a cache: use_cache=False, as in training)."""
    position_ids = torch.tensor([[3, 4, 0, 1, 0, 1]])
    input_ids = ids((1, 6))
    inputs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    model = tiny_model()
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_loss = model(**inputs, labels=input_ids).loss
        alone = torch.cat([model(input_ids=input_ids[:, i:i + 2], position_ids=position_ids[:, i:i + 2]).logits
                           for i in (0, 2, 4)], dim=1)
        torch.testing.assert_close(expected, alone, rtol=1e-5, atol=1e-5)  # stock: three sequences
        with pytest.MonkeyPatch.context() as env:  # fastsft's attention op: the CPU's default for dense rows is SDPA
            env.setenv(fastsft.transformers_attention.ENV, "reference")
            fastsft.patch(model)
        logits = model(**inputs).logits
        loss = model(**inputs, labels=input_ids).loss
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert_close(loss, expected_loss, rtol=1e-5)


@pytest.mark.parametrize("order", ["patch-then-dispatch", "dispatch-then-patch"])
def test_disk_offloaded_model_matches_unpatched(order, tmp_path):
    """accelerate's offload hooks load a module's weights before calling its forward: the patched forwards run
    inside them (a disk-offloaded layer's norm weights are on the meta device outside the hook)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    input_ids = ids()
    with torch.no_grad():
        expected = tiny_model()(input_ids=input_ids, labels=input_ids)
    model = tiny_model()
    if order == "patch-then-dispatch":
        report = fastsft.patch(model)
        model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
    else:
        model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
        report = fastsft.patch(model)
    norm = model.model.layers[1].input_layernorm
    assert norm.weight.device.type == "meta" and "_hf_hook" in norm.__dict__  # the case: weights on the disk
    assert {"fused_cross_entropy", "rms_norm", "attention", "rope"} <= report.patched.keys(), str(report)
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        logits = model(input_ids=input_ids).logits
    assert_close(loss, expected.loss, rtol=1e-5, name="loss")
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert fastsft.unpatch(model) and not is_patched(model)
    hooked = [m for m in model.modules() if "_hf_hook" in m.__dict__]
    assert hooked and all("forward" in m.__dict__ for m in hooked)  # accelerate's hooks stay in place
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_patch_leaves_a_model_sharing_the_config_alone():
    from transformers import LlamaForCausalLM

    config = tiny_model().config
    before = config._attn_implementation
    torch.manual_seed(0)
    patched, other = LlamaForCausalLM(config), LlamaForCausalLM(config)
    input_ids = ids()
    with torch.no_grad():
        expected = other(input_ids=input_ids).logits
    fastsft.patch(patched)
    assert patched.config._attn_implementation == "fastsft"
    assert patched.model.layers[0].self_attn.config._attn_implementation == "fastsft"  # what attention reads
    assert config._attn_implementation == before and other.config._attn_implementation == before
    assert other.model.layers[0].self_attn.config._attn_implementation == before
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=input_ids).logits, expected, rtol=0, atol=0)
    fastsft.unpatch(patched)
    assert patched.config._attn_implementation == before
    assert all(m.config is config for m in patched.modules() if "config" in m.__dict__)  # shared again


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_deepcopy_is_patched_and_unpatched_on_its_own(with_lora):
    model = lora_model() if with_lora else tiny_model()
    input_ids = ids()
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids)
    fastsft.patch(model)
    clone = copy.deepcopy(model)

    def patched_forwards(m):
        return [n for n, module in m.named_modules() if "forward" in module.__dict__]

    names = patched_forwards(model)
    assert names and patched_forwards(clone) == names
    assert fastsft.unpatch(clone) is True
    assert not is_patched(clone) and patched_forwards(clone) == []
    assert is_patched(model) and patched_forwards(model) == names
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
        assert out.logits is None  # the original is still patched...
        assert_close(out.loss, expected.loss, rtol=1e-5)
        unpatched = clone(input_ids=input_ids, labels=input_ids)
    assert unpatched.logits is not None  # ...and the copy is not
    torch.testing.assert_close(unpatched.logits, expected.logits, rtol=0, atol=0)
    assert fastsft.unpatch(model) is True and patched_forwards(model) == []


def test_return_dict_false_keeps_stock_tuple_layout():
    model, input_ids = tiny_model(), ids()
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids, return_dict=False)
        fastsft.patch(model)
        out = model(input_ids=input_ids, labels=input_ids, return_dict=False)
        as_dict = model(input_ids=input_ids, labels=input_ids)
    assert isinstance(out, tuple) and len(out) == len(expected)
    assert_close(out[0], expected[0], rtol=1e-5, name="loss")
    assert out[1] is None and as_dict.logits is None  # the logits' place, as in the ModelOutput: never built
    assert [type(v) for v in out[2:]] == [type(v) for v in expected[2:]]  # the cache, as stock returns it
