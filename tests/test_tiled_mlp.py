"""Sequence-tiled MLP (fastsft.tiled_mlp): the same loss, logits and gradients as the untiled model, with and
without gradient checkpointing and fastsft.patch, really computed in tiles; dropout masks reproduced in backward.

Every CPU test runs float64 with a tile size that divides neither the sequence nor the row count, and checks
through a spy on the call into the MLP's own forward that each tile ran once in forward (without a graph) and
once in backward (with one)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.llama.modeling_llama import LlamaMLP

import fastsft
from fastsft import tiled_mlp
from fastsft.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp
from helpers import assert_close, tiny_model

LAYERS = 2
BATCH, SEQ = 2, 24
TILE = 10  # divides neither SEQ nor BATCH * SEQ: tiles of 10, 10, 10, 10 and 8 rows, across the sequence boundary
TILE_ROWS = [10, 10, 10, 10, 8]
RTOL_AUTOCAST = 0.05  # measured 0.012 at most (a LoRA A gradient): bf16 rounding carried through the backward
RTOL = 1e-12  # float64: the same ops on the same rows; room for a GEMM that sums in another order for fewer rows


def lora_llama(*, lora_dropout: float = 0.0, checkpointing: bool = False):
    """A float64 tiny Llama with LoRA on every projection (B non-zero, so A's gradients are not all zero)."""
    model = tiny_model(num_hidden_layers=LAYERS).to(torch.float64)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=lora_dropout))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def run(model, *, input_grads: bool = True, seed: int = 0, autocast=None):
    """Loss, logits (None under the fused loss), LoRA gradients and the gradient of the input embeddings; the
    forward under ``autocast`` (a dtype, on the CPU) and the backward outside it, as a Trainer does."""
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(input_grads)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())  # every adapter weight gets a gradient
    logits = None if out.logits is None else out.logits.detach()
    return out.loss.detach(), logits, grads, embeds.grad


def assert_same(result, reference, rtol=RTOL):
    loss, logits, grads, dx = result
    ref_loss, ref_logits, ref_grads, ref_dx = reference
    assert_close(loss, ref_loss, rtol=rtol, name="loss")
    assert (logits is None) == (ref_logits is None)
    if logits is not None:
        assert_close(logits, ref_logits, rtol=rtol, name="logits")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], rtol=rtol, name=name)
    assert (dx is None) == (ref_dx is None)
    if dx is not None:
        assert_close(dx, ref_dx, rtol=rtol, name="inputs_embeds grad")


@pytest.fixture
def calls(monkeypatch):
    """Every call into the forward underneath the tiling: (module, that forward, rows, grad enabled)."""
    seen = []
    original = tiled_mlp._call_inner

    def spy(module, inner, x, *args, **kwargs):
        seen.append((module, inner, x.numel() // x.shape[-1], torch.is_grad_enabled()))
        return original(module, inner, x, *args, **kwargs)

    monkeypatch.setattr(tiled_mlp, "_call_inner", spy)
    return seen


def assert_tiled(calls, model, *, forwards: int = 1):
    """Each MLP ran in TILE_ROWS tiles ``forwards`` times without a graph (the forward, and checkpointing's
    recompute) and once with one (the backward's recompute), in that order."""
    mlps = tiled_mlps(model)
    assert len(mlps) == LAYERS
    for mlp in mlps:
        mine = [(rows, grad) for module, _, rows, grad in calls if module is mlp]
        assert mine == [(rows, False) for rows in TILE_ROWS] * forwards + [(rows, True) for rows in TILE_ROWS]


def tiled_mlps(model):
    return [m for m in model.modules() if isinstance(m, LlamaMLP) and type(m) is not LlamaMLP]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("input_grads", [True, False], ids=["input-grads", "no-input-grads"])
def test_matches_untiled(calls, checkpointing, input_grads):
    model = lora_llama(checkpointing=checkpointing)
    reference = run(model, input_grads=input_grads)
    assert not calls  # untiled: nothing went through the tiling
    report = enable_tiled_mlp(model, tile_tokens=TILE)
    assert report == f"tiled MLP: {LAYERS} MLPs in tiles of {TILE} tokens"
    assert_same(run(model, input_grads=input_grads), reference)
    assert_tiled(calls, model, forwards=2 if checkpointing else 1)
    if checkpointing:  # and the same as without checkpointing at all
        assert_same(run(lora_llama(), input_grads=input_grads), reference)


def test_short_calls_and_inference(calls):
    """A call of at most tile_tokens rows goes straight to the MLP's forward; without grad the tiles build no
    graph, and the logits are the untiled ones."""
    model = lora_llama()
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    enable_tiled_mlp(model, tile_tokens=BATCH * SEQ)
    model(input_ids=ids)
    assert [rows for _, _, rows, _ in calls] == [BATCH * SEQ] * LAYERS
    calls.clear()
    enable_tiled_mlp(model, tile_tokens=TILE)  # again: a new tile size, no second layer of tiling
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, reference, rtol=RTOL, name="logits")
    assert [(rows, grad) for _, _, rows, grad in calls] == [(rows, False) for rows in TILE_ROWS] * LAYERS


@pytest.mark.parametrize("order", ["tile-then-patch", "patch-then-tile"])
def test_with_fastsft_patch(calls, order):
    """fastsft.patch before or after: the tiles run patch's MLP forward, results equal the patched untiled model,
    unpatch leaves the tiling on the class forward, and disable leaves the instance as unpatch made it."""
    model = lora_llama()
    fastsft.patch(model)
    reference = run(model)
    fastsft.unpatch(model)
    assert not calls
    if order == "tile-then-patch":
        enable_tiled_mlp(model, tile_tokens=TILE)
        fastsft.patch(model)
    else:
        fastsft.patch(model)
        enable_tiled_mlp(model, tile_tokens=TILE)
    mlps = tiled_mlps(model)
    patched = [m.__dict__["forward"] for m in mlps]
    assert all(p.__func__.__module__ == "fastsft.patching.modules" for p in patched)
    assert_same(run(model), reference)
    assert_tiled(calls, model)
    assert all(inner is patched[mlps.index(module)] for module, inner, _, _ in calls)  # the tiles ran patch's forward

    calls.clear()
    fastsft.unpatch(model)
    assert all("forward" not in m.__dict__ for m in mlps) and tiled_mlps(model) == mlps
    run(model)
    assert_tiled(calls, model)
    assert all(inner.__func__ is LlamaMLP.forward for _, inner, _, _ in calls)
    assert disable_tiled_mlp(model) == LAYERS
    assert all(type(m) is LlamaMLP and "forward" not in m.__dict__ for m in mlps)


def test_disable_restores_forward():
    model = lora_llama()
    mlp = model.get_base_model().model.layers[0].mlp
    own = mlp.forward  # a bound method of the class's function
    mine = lambda x: LlamaMLP.forward(mlp, x)  # noqa: E731 - an instance forward someone installed before us
    mlp.forward = mine
    assert tiled_mlp.tiled_mlp_count(model) == 0
    enable_tiled_mlp(model, tile_tokens=TILE)
    assert tiled_mlp.tiled_mlp_count(model) == LAYERS
    assert mlp.forward is not mine and mlp.__dict__["forward"] is mine and type(mlp).forward is LlamaMLP.forward
    assert disable_tiled_mlp(model) == LAYERS and disable_tiled_mlp(model) == 0
    assert tiled_mlp.tiled_mlp_count(model) == 0
    assert type(mlp) is LlamaMLP and mlp.forward is mine and "_fastsft_tile_tokens" not in mlp.__dict__
    del mlp.forward
    assert mlp.forward.__func__ is own.__func__ is LlamaMLP.forward


def test_wrapper_reading_the_tiled_forward(calls):
    """A wrapper installed by reading ``mlp.forward`` (accelerate's hooks do) holds the tiled forward and calls it
    from inside; that call runs the class's forward on the tile instead of recursing."""
    model = lora_llama()
    reference = run(model)
    enable_tiled_mlp(model, tile_tokens=TILE)
    for mlp in tiled_mlps(model):
        held = mlp.forward
        mlp.forward = lambda x, held=held: held(x)
    assert_same(run(model), reference)
    assert_tiled(calls, model)


def test_dropout_masks_are_reproduced(calls, monkeypatch):
    """LoRA dropout > 0: the backward's recompute draws the forward's masks. The reference computes the MLP tile by
    tile with an ordinary graph, drawing the same masks in the same order: equal gradients mean equal masks."""
    tiled = lora_llama(lora_dropout=0.3)
    enable_tiled_mlp(tiled, tile_tokens=TILE)
    result = run(tiled)
    assert_tiled(calls, tiled)
    other_seed = run(tiled, seed=1)
    assert not torch.equal(other_seed[0], result[0])  # dropout is really on: another seed, another loss

    checkpointed = lora_llama(lora_dropout=0.3, checkpointing=True)
    enable_tiled_mlp(checkpointed, tile_tokens=TILE)
    assert_same(run(checkpointed), result)

    forward = LlamaMLP.forward

    def per_tile(self, x):
        rows = x.reshape(-1, x.shape[-1])
        tiles = [forward(self, rows[i:i + TILE][None]) for i in range(0, rows.shape[0], TILE)]
        return torch.cat(tiles, dim=1).reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(LlamaMLP, "forward", per_tile)
    assert_same(run(lora_llama(lora_dropout=0.3)), result)


def test_autocast_is_reentered_for_the_recompute(calls):
    """Under CPU bf16 autocast the backward's recompute runs in bf16 as the forward did (the engine runs backward
    without autocast, and a float32 recompute would differentiate other activations than the forward computed).
    Tiled and untiled bf16 differ by bf16 rounding only: a GEMM over 10 rows may round unlike one over 48."""
    model = lora_llama().float()
    dtypes = []
    for mlp in model.get_base_model().model.layers:
        mlp.mlp.down_proj.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    reference = run(model, autocast=torch.bfloat16)
    dtypes.clear()
    enable_tiled_mlp(model, tile_tokens=TILE)
    result = run(model, autocast=torch.bfloat16)
    assert_tiled(calls, model)
    assert dtypes == [torch.bfloat16] * (2 * LAYERS * len(TILE_ROWS))
    assert_same(result, reference, rtol=RTOL_AUTOCAST)


def test_argument_errors():
    model = lora_llama()
    for bad in (0, -8):
        with pytest.raises(ValueError, match="tile_tokens must be a positive int"):
            enable_tiled_mlp(model, tile_tokens=bad)
    for bad in (2.5, True, "8192", None):
        with pytest.raises(TypeError, match="tile_tokens must be a positive int"):
            enable_tiled_mlp(model, tile_tokens=bad)
    assert not tiled_mlps(model)
    with pytest.raises(LookupError, match="no gated MLP modules"):
        enable_tiled_mlp(torch.nn.Linear(4, 4))
    for fn in (enable_tiled_mlp, tiled_mlp.tiled_mlp_count, tiled_mlp.disable_tiled_mlp):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
            fn({"model": model})


# --- GPU ------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_8b_width_gradients_and_memory():
    """One MLP at Llama-3.1-8B widths (hidden 4096, intermediate 14336), LoRA r=16, bf16, 32k tokens on CUDA.

    Gradients: tiled and untiled bf16 each against a float32 run of the same weights; the tiled error must be at
    most twice the untiled one (plus a floor). The two differ only where the GEMMs pick another kernel or split for
    fewer rows, and where per-tile parameter-gradient sums are added (in float32): rounding of the same size as
    bf16's own, not a multiple of it. Memory: the peak of forward + backward drops by at least three
    [tokens, 14336] bf16 tensors (gate, up, and their activation product, which the untiled backward keeps; it also
    keeps silu(gate) and allocates the product's gradient at its peak), while the tiled run holds 1/8 of those."""
    from transformers import LlamaConfig

    tokens, tile = 32768, 4096
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, hidden_act="silu")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(config)

        def forward(self, x):
            return self.mlp(x)

    torch.manual_seed(0)
    block = Block()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = get_peft_model(block, LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    x32 = torch.randn(1, tokens, 4096, device="cuda")
    g32 = torch.randn(1, tokens, 4096, device="cuda")

    def step(dtype):
        model.zero_grad(set_to_none=True)
        x = x32.detach().clone().to(dtype).requires_grad_()  # a fresh leaf each step (also for float32)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(x).backward(g32.to(dtype))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return {**grads, "x": x.grad.float()}, peak

    model.to("cuda", torch.float32)
    expected, _ = step(torch.float32)
    model.to(torch.bfloat16)  # the LoRA weights too: then the float32 accumulation of their gradients matters
    untiled, untiled_peak = step(torch.bfloat16)
    assert enable_tiled_mlp(model, tile_tokens=tile) == f"tiled MLP: 1 MLPs in tiles of {tile} tokens"
    tiled, tiled_peak = step(torch.bfloat16)

    for name, grad in tiled.items():
        base_err = (untiled[name] - expected[name]).norm() / expected[name].norm()
        err = (grad - expected[name]).norm() / expected[name].norm()
        assert err <= 2 * base_err + 1e-3, f"{name}: tiled error {err:.3g}, untiled {base_err:.3g}"
    intermediate = tokens * 14336 * 2
    saved = untiled_peak - tiled_peak
    assert saved >= 3 * intermediate, (
        f"peak {untiled_peak / 2**20:.0f} MiB untiled vs {tiled_peak / 2**20:.0f} MiB tiled: saved "
        f"{saved / 2**20:.0f} MiB, one [tokens, intermediate] tensor is {intermediate / 2**20:.0f} MiB")
