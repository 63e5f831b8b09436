"""Captured decoder layers against the eager checkpointed layers: on the CPU through the emulated graphs (the same
static buffers, padding, chaining and autograd as the CUDA graphs, the layers re-run at each replay), and
GPU-marked with real CUDA graphs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastsft
from fastsft import captured_layers as cl
from helpers import tiny_model

LAYERS = 3


# on a GPU: head dims the Triton attention takes (the reference attention cannot be captured)
GPU_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def lora_model(seed=0, dropout=0.0, device="cpu", dtype=torch.float32, family="llama"):
    from peft import LoraConfig, get_peft_model

    dims = GPU_DIMS if device == "cuda" else {}
    model = tiny_model(family, seed=seed, num_hidden_layers=LAYERS, **dims).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B: the adapters' gradients all matter
            p.data.normal_(0, 0.1)
    fastsft.patch(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def packed_batch(lengths, vocab=96, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    position_ids = torch.cat([torch.arange(k) for k in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(input_ids=ids, labels=labels, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=max(lengths), max_length_k=max(lengths))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def train(model, batches, *, accumulate=1, lr=1e-2):
    """Losses and, after each optimizer step, the adapters' gradients (SGD: updates change the weights every step,
    so a graph reading stale weights or stale casts shows)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], []
    for i in range(0, len(batches), accumulate):
        for batch in batches[i:i + accumulate]:
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
        grads.append(adapter_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


BATCHES = [[7, 5, 9], [12, 3, 2, 4], [1, 16, 3], [6, 6, 6, 2]]  # different boundaries and token counts


def assert_same_training(got, expected, tol=1e-6):
    (losses, grads), (ref_losses, ref_grads) = got, expected
    assert losses == pytest.approx(ref_losses, rel=tol, abs=tol)
    for g, r in zip(grads, ref_grads):
        assert g.keys() == r.keys()
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=tol, atol=tol, msg=name)


def run(lengths_list, *, captured: dict | None, accumulate=1, seed=0, family="llama"):
    model = lora_model(seed, family=family)
    layers = None
    if captured is not None:
        layers = cl.enable_captured_layers(model, graphs="emulated", **captured)
    batches = [packed_batch(lengths, seed=i) for i, lengths in enumerate(lengths_list)]
    return train(model, batches, accumulate=accumulate), layers, model


def test_emulated_graphs_train_like_the_eager_layers_across_sequence_boundaries():
    expected, _, _ = run(BATCHES, captured=None)
    got, layers, _ = run(BATCHES, captured={"token_budget": 32, "max_length": 16})
    assert_same_training(got, expected)
    # one capture for every batch: the layers were captured once and replayed at every step
    assert layers.captures == 1 and layers.stats["captured"] == LAYERS
    assert layers.stats["replayed"] == LAYERS * len(BATCHES) and layers.stats["eager"] == 0
    assert (layers.set.T, layers.set.L) == (32, 16)


@pytest.mark.parametrize("family,gradients_only", [("llama", True), ("mistral", True), ("qwen2", True),
                                                    ("qwen3", True), ("gemma", True), ("gemma2", False)])
def test_the_mlp_ending_a_layer_computes_only_its_gradients_in_the_backward_graph(family, gradients_only):
    """Where nothing reads the MLP's result in the backward graph (it is added to the residual as the layer's
    output) it runs lora_mlp(compute_output=False); Gemma 2 normalizes that result first, so it must not; either
    way the training matches the eager layers'."""
    expected, _, _ = run(BATCHES[:2], captured=None, family=family)
    got, layers, _ = run(BATCHES[:2], captured={"token_budget": 32, "max_length": 16}, family=family)
    assert_same_training(got, expected)
    assert layers.stats["replayed"] > 0 and layers.stats["eager"] == 0
    assert ("MLP gradients only" in layers.summary()) is gradients_only
    assert all(g.mlp_gradients_only is gradients_only for g in layers.set.layers.values())


@pytest.mark.parametrize("lora_backend", ["reference", "triton"])  # triton: under TRITON_INTERPRET on the CPU
def test_the_mlp_gradients_in_row_tiles(lora_backend, monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND_LORA", lora_backend)
    expected, _, _ = run(BATCHES[:2], captured=None)
    got, layers, model = run(BATCHES[:2], captured={"token_budget": 32, "max_length": 16, "mlp_tile_tokens": 5})
    assert_same_training(got, expected, tol=1e-5)
    assert "MLP gradients only in backward (tiles of 5 tokens)" in layers.summary()
    mlp = model.get_base_model().model.layers[0].mlp
    assert mlp.__dict__["_fastsft_mlp"].backend["lora"].backend == lora_backend


def test_the_mlp_recomputed_in_full_when_told():
    expected, _, _ = run(BATCHES[:2], captured=None)
    got, layers, _ = run(BATCHES[:2], captured={"token_budget": 32, "max_length": 16, "mlp_gradients_only": False})
    assert_same_training(got, expected)
    assert "MLP gradients only" not in layers.summary()
    assert not any(g.mlp_gradients_only for g in layers.set.layers.values())


def test_gradient_accumulation_sums_the_micro_batches():
    expected, _, _ = run(BATCHES, captured=None, accumulate=2)
    got, layers, _ = run(BATCHES, captured={"token_budget": 32, "max_length": 16}, accumulate=2)
    assert_same_training(got, expected)
    assert layers.stats["replayed"] == LAYERS * len(BATCHES)


def test_bounds_inferred_from_the_first_batch_and_recaptured_when_a_batch_outgrows_them(caplog):
    batches = [[7, 5], [30, 40], [3, 3]]  # 12 tokens, then 70 (over the first budget of 256? no: longest 40 > 8)
    expected, _, _ = run(batches, captured=None)
    with caplog.at_level(logging.INFO, logger="fastsft.captured_layers"):
        got, layers, _ = run(batches, captured={})
    assert_same_training(got, expected)
    assert layers.captures == 2  # the second batch's longest sequence outgrew the first bounds
    assert layers.set.L == 64 and layers.set.T == 256
    assert sum("capturing for" in r.message for r in caplog.records) == 2


def test_a_batch_that_fits_no_capture_runs_eagerly_with_one_log_line(caplog):
    batches = [[7, 5], [20, 20], [3, 4], [30, 2]]
    expected, _, _ = run(batches, captured=None)
    with caplog.at_level(logging.WARNING, logger="fastsft.captured_layers"):
        got, layers, _ = run(batches, captured={"token_budget": 16, "max_captures": 1})
    assert_same_training(got, expected)
    assert layers.stats["replayed"] == LAYERS * 2 and layers.stats["eager"] == LAYERS * 2
    lines = [r.message for r in caplog.records if "fits none" in r.message]
    assert len(lines) == 1, lines  # one line per reason, however often it applies


def test_sequence_boundaries_with_the_padding_split_into_sequences_of_at_most_the_longest():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=40, max_length=8)
    seen = []
    original = cl._GraphSet.start_forward

    def spy(self, call, generation):
        original(self, call, generation)
        seen.append(self.cu.tolist())

    cl._GraphSet.start_forward = spy
    try:
        model(**packed_batch([5, 8, 3])).loss.backward()
    finally:
        cl._GraphSet.start_forward = original
    s = layers.set.S
    # 16 tokens, 24 rows of padding in sequences of 8, then empty sequences up to S
    assert seen == [[0, 5, 13, 16, 24, 32, 40] + [40] * (s + 1 - 7)]


def _own_checkpoint(function, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("case", ["dense rows", "hooks", "dropout", "another checkpointing function"])
def test_what_cannot_be_captured_runs_the_eager_layers(case, caplog):
    model = lora_model(dropout=0.1 if case == "dropout" else 0.0)
    if case == "another checkpointing function":
        for layer in model.get_base_model().model.layers:
            layer._gradient_checkpointing_func = _own_checkpoint
    layers = cl.enable_captured_layers(model, graphs="emulated")
    if case == "hooks":
        model.get_base_model().model.layers[1].mlp.register_forward_hook(lambda *a: None)
    batch = packed_batch([5, 7])
    if case == "dense rows":
        batch = dict(input_ids=batch["input_ids"].view(2, 6), labels=batch["labels"].view(2, 6))
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="fastsft.captured_layers"):
        model(**batch).loss.backward()
    expected = {"dense rows": "only packed rows", "hooks": "hooks on", "dropout": "dropout (p=0.1)",
                "another checkpointing function": "not torch.utils.checkpoint or fastsft's offloaded"}[case]
    assert any(expected in why for why in layers.reasons), layers.reasons
    assert layers.stats["eager"] >= 1
    if case != "hooks":
        assert layers.stats["replayed"] == 0


def run_offloaded(lengths_list, *, captured: dict | None, min_bytes=0, accumulate=1):
    model = lora_model()
    offloader = fastsft.enable_offloaded_checkpointing(model, min_bytes=min_bytes)
    layers = cl.enable_captured_layers(model, graphs="emulated", **captured) if captured is not None else None
    batches = [packed_batch(lengths, seed=i) for i, lengths in enumerate(lengths_list)]
    return train(model, batches, accumulate=accumulate), layers, offloader


@pytest.mark.parametrize("accumulate", [1, 2])
def test_offloaded_checkpointing_is_captured_with_two_output_buffers_and_the_inputs_on_the_host(accumulate):
    expected, _, _ = run(BATCHES, captured=None, accumulate=accumulate)
    eager_offloaded, _, offloader = run_offloaded(BATCHES, captured=None, accumulate=accumulate)
    assert offloader.stats["offloaded"] > 0
    got, layers, offloader = run_offloaded(BATCHES, captured={"token_budget": 32, "max_length": 16},
                                           accumulate=accumulate)
    assert_same_training(eager_offloaded, expected)
    assert_same_training(got, expected)
    gs = layers.set
    assert gs.offload and layers.stats["replayed"] == LAYERS * len(BATCHES) and layers.stats["eager"] == 0
    assert "inputs offloaded" in layers.summary()
    graphs = list(gs.layers.values())
    # the layers' outputs take turns in two buffers; what a layer recomputes from is its host copy
    assert {g.output.data_ptr() for g in graphs} == {b.data_ptr() for b in gs.outputs}
    assert {g.recompute_input.data_ptr() for g in graphs} == {b.data_ptr() for b in gs.recompute_inputs}
    assert all(g.host.device.type == "cpu" and g.host.shape == (1, 32, g.input.shape[2]) for g in graphs)
    assert offloader.stats["offloaded"] == 0  # the eager offloader never ran


def test_offloading_turned_on_after_the_capture_was_enabled_is_captured_too():
    expected, _, _ = run(BATCHES, captured=None)
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32, max_length=16)
    model(**packed_batch([5, 7])).loss.backward()  # the layers' functions are wrapped now
    model.zero_grad(set_to_none=True)
    fastsft.enable_offloaded_checkpointing(model, min_bytes=0)
    batches = [packed_batch(lengths, seed=i) for i, lengths in enumerate(BATCHES)]
    assert_same_training(train(model, batches), expected)
    assert layers.set.offload and not layers.reasons


def test_a_recompute_buffer_holding_another_layer_is_fetched_again():
    """Backward out of the decoder order (here: the last layer's backward run twice) still recomputes each layer
    from its own input."""
    (losses, _), layers, _ = run_offloaded([[7, 5, 9]], captured={"token_budget": 32, "max_length": 16})
    gs = layers.set
    last, first = list(gs.layers.values())[-1], list(gs.layers.values())[0]
    assert gs.holds[first.index % 2] == (gs.generation, first.index)
    gs.restore(list(gs.layers.values())[2 % LAYERS])  # layer 2 shares layer 0's recompute buffer
    assert gs.holds[first.index % 2] == (gs.generation, 2)
    gs.restore(first)
    torch.testing.assert_close(gs.recompute_inputs[0], first.host)
    assert last.index == LAYERS - 1


def test_offloaded_checkpointing_below_its_size_threshold_is_captured_keeping_the_inputs():
    expected, _, _ = run(BATCHES, captured=None)
    got, layers, _ = run_offloaded(BATCHES, captured={"token_budget": 32, "max_length": 16}, min_bytes=1 << 20)
    assert_same_training(got, expected)
    assert not layers.set.offload and layers.stats["replayed"] == LAYERS * len(BATCHES)
    assert len({g.output.data_ptr() for g in layers.set.layers.values()}) == LAYERS


def test_a_second_forward_before_the_first_backward_runs_eagerly():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32, max_length=16)
    ref = lora_model()
    a, b = packed_batch([5, 7], seed=0), packed_batch([9, 3], seed=1)
    la, lb = model(**a).loss, model(**b).loss  # b must not overwrite a's static inputs
    (la + lb).backward()
    ra, rb = ref(**a).loss, ref(**b).loss
    (ra + rb).backward()
    assert la.item() == pytest.approx(ra.item(), rel=1e-6) and lb.item() == pytest.approx(rb.item(), rel=1e-6)
    got, expected = adapter_grads(model), adapter_grads(ref)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)
    assert "a forward ran before the backward of the one before it" in layers.reasons
    assert layers.stats["replayed"] == LAYERS  # the first forward


def test_a_forward_whose_graph_was_dropped_does_not_block_the_next():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32, max_length=16)
    model(**packed_batch([5, 7]))  # no backward: its autograd graph is freed
    model(**packed_batch([4, 4])).loss.backward()
    assert layers.stats["replayed"] == 2 * LAYERS and not layers.reasons


def test_layers_re_enabled_by_the_trainer_stay_captured_and_disable_restores_them():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # new functions
    model(**packed_batch([5, 7])).loss.backward()
    assert layers.stats["replayed"] == LAYERS
    decoder = model.get_base_model().model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, cl._CapturedCheckpoint) for layer in decoder)
    assert cl.disable_captured_layers(model) and cl.captured_layers_of(model) is None
    assert not any(isinstance(layer._gradient_checkpointing_func, cl._CapturedCheckpoint) for layer in decoder)
    model(**packed_batch([5, 7])).loss.backward()
    assert layers.stats["replayed"] == LAYERS
    assert not cl.disable_captured_layers(model)


def test_deepcopy_gets_captured_layers_of_its_own():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32)
    model(**packed_batch([5, 7])).loss.backward()
    twin = copy.deepcopy(model)
    twin_layers = cl.captured_layers_of(twin)
    assert twin_layers is not layers and twin_layers.set is None and twin_layers.stats["replayed"] == 0
    twin.zero_grad()
    twin(**packed_batch([3, 9])).loss.backward()
    assert twin_layers.stats["replayed"] == LAYERS and layers.stats["replayed"] == LAYERS


def test_evaluation_and_no_grad_run_eagerly_without_a_log_line():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32)
    with torch.no_grad():
        model(**packed_batch([5, 7]))
    model.eval()
    model(**packed_batch([5, 7]))
    assert layers.stats == {"replayed": 0, "eager": 0, "captured": 0}


def test_bad_settings_are_refused():
    model = lora_model()
    with pytest.raises(ValueError, match="token_budget"):
        cl.enable_captured_layers(model, token_budget=0)
    with pytest.raises(ValueError, match="graphs"):
        cl.enable_captured_layers(model, graphs="sometimes")
    with pytest.raises(ValueError, match="max_captures"):
        cl.enable_captured_layers(model, max_captures=-1)
    with pytest.raises(TypeError, match="mlp_gradients_only"):
        cl.enable_captured_layers(model, mlp_gradients_only="yes")
    with pytest.raises(ValueError, match="mlp_tile_tokens"):
        cl.enable_captured_layers(model, mlp_tile_tokens=0)
    with pytest.raises(TypeError, match="transformers model"):
        cl.enable_captured_layers("meta-llama/Llama-3.2-1B")


def test_on_the_cpu_cuda_graphs_leave_the_layers_eager_with_the_reason():
    model = lora_model()
    layers = cl.enable_captured_layers(model)
    model(**packed_batch([5, 7])).loss.backward()
    assert layers.stats["replayed"] == 0 and any("not a CUDA device" in why for why in layers.reasons)


# --- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_graphs_train_like_the_eager_layers(offload):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def go(captured):
        model = lora_model(device="cuda")
        if offload:
            fastsft.enable_offloaded_checkpointing(model, min_bytes=0)
        layers = cl.enable_captured_layers(model, token_budget=64, max_length=32) if captured else None
        batches = [packed_batch(lengths, seed=i, device="cuda") for i, lengths in enumerate(BATCHES)]
        return train(model, batches), layers

    expected, _ = go(False)
    got, layers = go(True)
    assert_same_training(got, expected, tol=1e-5)
    assert layers.stats["replayed"] == LAYERS * len(BATCHES) and layers.stats["eager"] == 0, layers.summary()
    assert layers.captures == 1 and layers.set.offload == offload


@pytest.mark.gpu
def test_bf16_graphs_keep_no_adapter_casts_outside_them():
    """float32 adapters of a bf16 model are cast inside the graphs; the warm-up run before each capture keeps no
    copy either, so the per-step refresh of the model's casts has nothing to copy."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = lora_model(device="cuda", dtype=torch.bfloat16)
    assert any(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    layers = cl.enable_captured_layers(model, token_budget=64, max_length=32)
    for lengths in BATCHES[:3]:
        model(**packed_batch(lengths, device="cuda")).loss.backward()
    assert layers.stats["eager"] == 0 and layers.stats["replayed"] == 3 * LAYERS, layers.summary()
    casts = model.get_base_model().model.layers[0].mlp.__dict__["_fastsft_mlp"].casts
    assert not casts._buffers


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_no_host_sync_in_replayed_layers(offload):
    """The decoder loop over replayed layers, forward and backward, under the sync debug mode "error" (the
    backbone's own mask preparation, which reads the position ids on the host, stays outside)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = lora_model(device="cuda")
    if offload:
        fastsft.enable_offloaded_checkpointing(model, min_bytes=0)
    layers = cl.enable_captured_layers(model, token_budget=64, max_length=32)
    for lengths in BATCHES[:2]:  # the first captures
        model(**packed_batch(lengths, device="cuda")).loss.backward()
    decoder = model.get_base_model().model
    batch = packed_batch(BATCHES[2], device="cuda")
    hidden = decoder.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
    position_embeddings = decoder.rotary_emb(hidden, batch["position_ids"])
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    layers._on_forward(decoder, ())  # what the stack's forward pre-hook does
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = hidden
        for layer in decoder.layers:
            out = layer(out, attention_mask=None, position_embeddings=position_embeddings, past_key_values=None,
                        use_cache=False, **kwargs)
        out.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layers.stats["eager"] == 0 and layers.stats["replayed"] == 3 * LAYERS, layers.summary()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


# --- through fastsft.SFTTrainer ---------------------------------------------------------------------------------

def _trainer(tmp_path, capture_layers, **config):
    import trl
    from peft import LoraConfig

    from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
    from helpers import SMALL_DEMO

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                         max_length=64, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                         disable_tqdm=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                         **{"gradient_checkpointing": True, **config})
    return fastsft.SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(40),
                              processing_class=demo_tokenizer(), capture_layers=capture_layers,
                              peft_config=LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


def test_sft_trainer_packing_replays_the_layers_with_the_eager_losses(tmp_path):
    eager = _trainer(tmp_path / "eager", False, packing=True)
    assert eager.captured_layers is None
    eager.train()
    trainer = _trainer(tmp_path / "captured", {"graphs": "emulated"}, packing=True)
    layers = trainer.captured_layers
    assert (layers.token_budget, layers.max_length) == (128, 64)  # batch size x max_length, max_length
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    expected = [log["loss"] for log in eager.state.log_history if "loss" in log]
    assert losses == pytest.approx(expected, rel=1e-6) and len(losses) == 4
    layer_count = trainer.model.config.num_hidden_layers
    assert layers.stats["replayed"] == 4 * layer_count and not layers.reasons, layers.summary()
    assert layers.captures == 1


def test_sft_trainer_with_offloaded_checkpointing_replays_the_layers(tmp_path):
    eager = _trainer(tmp_path / "eager", False, packing=True)
    eager.train()
    trainer = _trainer(tmp_path / "offloaded", {"graphs": "emulated"}, packing=True, gradient_checkpointing="offload")
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    expected = [log["loss"] for log in eager.state.log_history if "loss" in log]
    assert losses == pytest.approx(expected, rel=1e-6) and len(losses) == 4
    layers = trainer.captured_layers
    assert layers.stats["replayed"] == 4 * trainer.model.config.num_hidden_layers and not layers.reasons
    inner = trainer.model.get_base_model().model.layers[0]._gradient_checkpointing_func.inner
    assert isinstance(inner.func, fastsft.offload_checkpointing.OffloadedCheckpoint)


def test_sft_trainer_without_packing_leaves_the_layers_eager(tmp_path):
    assert _trainer(tmp_path, True).captured_layers is None  # padded rows: nothing to capture
    with pytest.raises(TypeError, match="capture_layers"):
        _trainer(tmp_path, "yes", packing=True)


def test_a_parameter_replaced_after_the_capture_sends_the_layer_to_the_eager_path():
    model = lora_model()
    layers = cl.enable_captured_layers(model, graphs="emulated", token_budget=32)
    model(**packed_batch([5, 7])).loss.backward()
    proj = model.get_base_model().model.layers[1].self_attn.o_proj
    proj.base_layer.weight = torch.nn.Parameter(proj.base_layer.weight.detach().clone(), requires_grad=False)
    model(**packed_batch([5, 7])).loss.backward()
    assert "the layer's parameters changed since it was captured" in layers.reasons
    # the next layer reads its input from that layer's graph output: given the eager output, it runs eagerly too
    assert "the layer was given a tensor other than the previous layer's output" in layers.reasons
    assert layers.stats["replayed"] == 2 * LAYERS - 2


def test_sft_trainer_offloads_the_captured_layers_inputs_by_default_and_keeps_them_when_told(tmp_path):
    from fastsft import SFTConfig
    from fastsft.offload_checkpointing import OffloadedCheckpoint

    def offloader_of(trainer):
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        func = trainer.model.get_base_model().model.layers[0]._gradient_checkpointing_func
        return isinstance(func.func, OffloadedCheckpoint)

    captured = _trainer(tmp_path / "a", {"graphs": "emulated"}, packing=True)
    assert captured.offloaded_checkpointing and offloader_of(captured)
    eager = _trainer(tmp_path / "b", False, packing=True)  # eager layers: their inputs stay on the device
    assert not eager.offloaded_checkpointing and not offloader_of(eager)
    padded = _trainer(tmp_path / "c", True)
    assert padded.captured_layers is None and not padded.offloaded_checkpointing

    import fastsft as fs
    from peft import LoraConfig

    from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
    from helpers import SMALL_DEMO

    config = SFTConfig(output_dir=str(tmp_path / "d"), max_steps=1, per_device_train_batch_size=2, max_length=64,
                       report_to="none", use_cpu=True, packing=True, gradient_checkpointing=True,
                       gradient_checkpointing_offload=False)
    kept = fs.SFTTrainer(model=demo_model(**SMALL_DEMO), args=config, train_dataset=demo_dataset(8),
                         processing_class=demo_tokenizer(), peft_config=LoraConfig(r=8),
                         capture_layers={"graphs": "emulated"})
    assert kept.captured_layers is not None and not kept.offloaded_checkpointing and not offloader_of(kept)
    with pytest.raises(ValueError, match="gradient_checkpointing_offload=False"):
        SFTConfig(output_dir=str(tmp_path), gradient_checkpointing="offload", gradient_checkpointing_offload=False)
    with pytest.raises(TypeError, match="True, False or None"):
        SFTConfig(output_dir=str(tmp_path), gradient_checkpointing_offload="yes")
