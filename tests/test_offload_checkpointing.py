"""Offloaded gradient checkpointing (fastsft.offload_checkpointing): same gradients as plain non-reentrant
checkpointing, the layer inputs really go through the offloader, and the facade and trainer switches.

On the CPU the offloader keeps each input as it is (there is no device memory to free) but runs the same
pack/prefetch/restore bookkeeping; the GPU test checks the copies and the memory saved."""

from __future__ import annotations

import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint

import fastsft
from fastsft import offload_checkpointing
from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
from fastsft.offload_checkpointing import OffloadedCheckpoint, disable_offloaded_checkpointing
from helpers import SMALL_DEMO, assert_close, tiny_model

LAYERS = 3
MODES = ("none", "plain", "offload")


def lora_llama(mode: str, *, dtype=torch.float64, input_grads: bool = True, lora_dropout: float = 0.0, **config):
    """A tiny Llama with LoRA on every projection (B non-zero, so A's gradients are not all zero) and checkpointing
    ``mode``; with ``input_grads=False`` the embedding output does not require grad."""
    model = tiny_model(num_hidden_layers=LAYERS, **config).to(dtype)
    model = randomize_lora_b(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear",
                                                                lora_dropout=lora_dropout)))
    if mode == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "offload":
        fastsft.enable_offloaded_checkpointing(model, min_bytes=0)
    if mode != "none" and not input_grads:
        model.disable_input_require_grads()  # transformers' enable hooks the embedding output to require grad
    return model.train()


def randomize_lora_b(model, std: float = 0.1):
    """LoRA B starts at zero, which leaves A's gradients zero: a comparison of them would say nothing."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def loss_and_grads(model, seed: int = 0, batch=None):
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1)) if batch is None else batch
    model.train()  # transformers checkpoints in training mode only
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())  # every adapter weight gets a gradient
    return loss.detach(), grads


def offloader_of(model) -> OffloadedCheckpoint:
    funcs = {m._gradient_checkpointing_func for m in model.modules() if "_gradient_checkpointing_func" in m.__dict__}
    assert funcs and all(isinstance(f, functools.partial) for f in funcs)
    offloaders = {f.func for f in funcs}
    assert len(offloaders) == 1, funcs
    return offloaders.pop()


@pytest.mark.parametrize("input_grads", [True, False], ids=["input-grads", "no-input-grads"])
def test_gradients_equal_plain_checkpointing(input_grads):
    """Bit-identical to plain non-reentrant checkpointing: the recompute sees the same input values and runs the
    same ops in the same order. Against no checkpointing the ops are the same too; float64 and a 1e-12 norm-wise
    bound only leave room for a different summation order, should a kernel pick one for the recompute."""
    results = {mode: loss_and_grads(lora_llama(mode, input_grads=input_grads)) for mode in MODES}
    loss, grads = results["offload"]
    plain_loss, plain_grads = results["plain"]
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    ref_loss, ref_grads = results["none"]
    assert_close(loss, ref_loss, rtol=1e-12, name="loss")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], rtol=1e-12, name=name)


def test_dropout_rng_state_is_preserved():
    """LoRA dropout draws random masks: the recompute must draw the same ones (checkpoint's preserve_rng_state)."""
    results = {mode: loss_and_grads(lora_llama(mode, lora_dropout=0.3)) for mode in MODES}
    other_seed, _ = loss_and_grads(lora_llama("none", lora_dropout=0.3), seed=1)
    assert not torch.equal(other_seed, results["none"][0])  # dropout is really on: another seed, another loss
    for name, grad in results["offload"][1].items():
        assert torch.equal(grad, results["plain"][1][name]), name
        assert_close(grad, results["none"][1][name], rtol=1e-12, name=name)


def test_each_layer_input_is_offloaded_and_restored_in_reverse(monkeypatch):
    """The spy sees every decoder layer's input packed in forward order, and restored in reverse order with the
    next one prefetched before it is needed: the tests above cannot pass by never offloading anything."""
    events = []
    cls = offload_checkpointing._Offloaded
    for method in ("__init__", "prefetch", "restore"):
        original = getattr(cls, method)

        def spy(self, *args, _original=original, _method=method):
            if _method == "__init__":
                events.append(("pack", args[1], args[0]))
            elif _method == "prefetch" and self._device_copy is None:
                events.append(("prefetch", self.index, None))
            result = _original(self, *args)
            if _method == "restore":
                events.append(("restore", self.index, None))
            return result

        monkeypatch.setattr(cls, method, spy)
    model = lora_llama("offload")
    layer_inputs = []
    for layer in model.get_base_model().model.layers:
        layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0]))
    loss_and_grads(model)

    packs = [e for e in events if e[0] == "pack"]
    assert [index for _, index, _ in packs] == list(range(LAYERS))
    for (_, _, packed), layer_input in zip(packs, layer_inputs):
        assert packed is layer_input  # the hidden states, not a mask or the position embeddings
    backward = [(kind, index) for kind, index, _ in events if kind != "pack"]
    # the last layer's input is fetched when needed; each restore starts the prefetch of the one before it
    expected = [("prefetch", 2), ("restore", 2), ("prefetch", 1), ("restore", 1), ("prefetch", 0), ("restore", 0)]
    assert backward == expected
    assert offloader_of(model).stats == {"offloaded": LAYERS, "prefetched": LAYERS - 1, "restored": LAYERS}


def test_direct_call_contract():
    """The checkpoint() calling contract: keyword arguments, tuple outputs, an input without grad, parameters that
    need gradients; small and integer tensors stay as they are; use_reentrant=True is refused."""
    linear = torch.nn.Linear(16, 16, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64)  # requires no grad: only the parameters get gradients
    big = torch.randn(8, 16, dtype=torch.float64)
    ids = torch.arange(8)

    def block(x, ids, *, scale):
        h = torch.tanh(linear(x)) * scale
        return h, h[ids].sum()

    grads = {}
    for name, fn in (("plain", functools.partial(checkpoint, use_reentrant=False)), ("offload", None)):
        offloader = OffloadedCheckpoint(min_bytes=big.numel() * big.element_size())
        fn = fn or functools.partial(offloader, use_reentrant=False)
        linear.zero_grad()
        h, total = fn(block, x, ids, scale=big)
        (h.square().sum() + total).backward()
        grads[name] = [p.grad.clone() for p in linear.parameters()]
    assert offloader.stats["offloaded"] == 1  # x; ids is an integer tensor, and the kwarg is not saved by checkpoint
    for a, b in zip(grads["offload"], grads["plain"]):
        assert torch.equal(a, b)
    small = OffloadedCheckpoint(min_bytes=x.numel() * x.element_size() + 1)
    small(block, x, ids, scale=big)[1].backward()
    assert small.stats["offloaded"] == 0
    with pytest.raises(ValueError, match="use_reentrant"):
        offloader(block, x, ids, scale=big, use_reentrant=True)


def test_stays_offloaded_through_later_enable_calls_until_disabled():
    model = lora_llama("offload")
    offloader = offloader_of(model)
    # what a Trainer does in train(): transformers resets every layer's function, the wrapper puts ours back
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert offloader_of(model) is offloader
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    disable_offloaded_checkpointing(model)
    assert "gradient_checkpointing_enable" not in model.__dict__
    assert offloader_of(model) is checkpoint and model.get_base_model().is_gradient_checkpointing


def test_facade_offload(model_dir):
    """FastLanguageModel.get_peft_model(use_gradient_checkpointing="offload"): the same gradients as "unsloth"
    (plain non-reentrant), through the offloader."""
    from fastsft import FastLanguageModel

    batch = demo_tokenizer()(["What is 11 minus 0? 11 minus 0 is 11.", "Hugo has three white foxes."],
                             return_tensors="pt", padding=True)["input_ids"]
    grads = {}
    for mode in ("unsloth", "offload"):
        model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64)
        model = randomize_lora_b(FastLanguageModel.get_peft_model(model, use_gradient_checkpointing=mode))
        assert model.get_base_model().is_gradient_checkpointing and not model.config.use_cache
        if mode == "offload":
            offloader_of(model).min_bytes = 0  # the demo's inputs are smaller than the default threshold
        grads[mode] = loss_and_grads(model, batch=batch)
    assert offloader_of(model).stats["restored"] == SMALL_DEMO["num_hidden_layers"]
    assert torch.equal(grads["offload"][0], grads["unsloth"][0])
    for name, grad in grads["offload"][1].items():
        assert torch.equal(grad, grads["unsloth"][1][name]), name


def test_sftconfig_offload_values(tmp_path):
    config = fastsft.SFTConfig(output_dir=str(tmp_path), gradient_checkpointing="offload", report_to="none",
                               use_cpu=True)
    assert config.gradient_checkpointing is True and config.gradient_checkpointing_offload
    plain = fastsft.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert plain.gradient_checkpointing is True and not plain.gradient_checkpointing_offload
    with pytest.raises(ValueError, match="'offload'"):
        fastsft.SFTConfig(output_dir=str(tmp_path), gradient_checkpointing="unsloth")
    with pytest.raises(ValueError, match="non-reentrant"):
        fastsft.SFTConfig(output_dir=str(tmp_path), gradient_checkpointing="offload",
                          gradient_checkpointing_kwargs={"use_reentrant": True})


def test_trainer_offload_matches_plain_checkpointing(tmp_path, monkeypatch):
    """fastsft.SFTTrainer with gradient_checkpointing="offload" (on fastsft.SFTConfig, and as a string on a plain
    trl.SFTConfig): the same losses and adapter as plain checkpointing, step for step, through the offloader."""
    import trl

    monkeypatch.setattr(offload_checkpointing, "DEFAULT_MIN_BYTES", 0)  # the demo's inputs are below 1 MiB

    def train(config_class, gradient_checkpointing):
        args = config_class(output_dir=str(tmp_path / str(gradient_checkpointing)), max_steps=3,
                            per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none",
                            seed=0, use_cpu=True, disable_tqdm=True, max_length=64, learning_rate=1e-3,
                            gradient_checkpointing=gradient_checkpointing)
        trainer = fastsft.SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(12),
                                     processing_class=demo_tokenizer(),
                                     peft_config=LoraConfig(r=4, target_modules="all-linear"))
        assert args.gradient_checkpointing == gradient_checkpointing or config_class is fastsft.SFTConfig
        assert trainer.args.gradient_checkpointing is True  # what TRL and transformers see
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        return trainer, losses, adapter

    _, plain_losses, plain_adapter = train(fastsft.SFTConfig, True)
    for config_class in (fastsft.SFTConfig, trl.SFTConfig):
        trainer, losses, adapter = train(config_class, "offload")
        stats = offloader_of(trainer.model).stats  # installed by the Trainer's own enable call in train()
        assert stats["offloaded"] == stats["restored"] == 3 * SMALL_DEMO["num_hidden_layers"]
        assert len(losses) == 3 and losses == plain_losses
        for name, weight in adapter.items():
            assert torch.equal(weight, plain_adapter[name]), name


# --- GPU ------------------------------------------------------------------------------------------------------------

GPU_CONFIG = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                  attn_implementation="eager")  # eager: a deterministic backward, so "bit-identical" can be checked


@pytest.mark.gpu
def test_gpu_bf16_gradients_equal_and_memory_saved():
    """bf16 on CUDA: the copies through pinned memory and side streams give plain checkpointing's gradients, and
    the peak memory drops by most of the layer inputs (batch x tokens x hidden per layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    batch, tokens = 2, 4096
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**GPU_CONFIG)).to("cuda", torch.bfloat16)
    model = randomize_lora_b(get_peft_model(model, LoraConfig(r=16, target_modules="all-linear")), std=0.02)
    model.train()
    ids = torch.randint(0, GPU_CONFIG["vocab_size"], (batch, tokens), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, peak

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain, plain_again = step(), step()
    offloader = fastsft.enable_offloaded_checkpointing(model)
    offloaded = step()
    assert offloader.stats["offloaded"] == offloader.stats["restored"] == GPU_CONFIG["num_hidden_layers"]
    assert offloader.stats["prefetched"] == GPU_CONFIG["num_hidden_layers"] - 1

    assert torch.equal(offloaded[0], plain[0]) or not torch.equal(plain_again[0], plain[0])
    for name, grad in offloaded[1].items():
        noise = (plain_again[1][name].float() - plain[1][name].float()).abs().max().item()
        diff = (grad.float() - plain[1][name].float()).abs().max().item()
        # bit-identical where plain checkpointing is itself run-to-run deterministic
        assert diff <= 2 * noise, f"{name}: offload vs plain {diff:.3g}, plain vs plain {noise:.3g}"

    input_bytes = batch * tokens * GPU_CONFIG["hidden_size"] * 2
    saved = plain[2] - offloaded[2]
    layers = GPU_CONFIG["num_hidden_layers"]
    # plain holds all inputs at its peak (the first layer of backward), offload ~2 (the one being recomputed and the
    # prefetched one) plus what a D2H copy still holds; 4 leaves room for allocator noise
    assert saved >= (layers - 4) * input_bytes, (
        f"peak {plain[2] / 2**20:.0f} MiB plain vs {offloaded[2] / 2**20:.0f} MiB offloaded: saved "
        f"{saved / 2**20:.0f} MiB, layer inputs {layers} x {input_bytes / 2**20:.0f} MiB")
