"""fastsft.ops.lora: every backend against the float64 reference and against PEFT, forward and backward; what the
autograd graph keeps; 4-bit (dequantizing) base weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastsft import backends
from fastsft.ops import lora_linear, lora_mlp, lora_qkv
from fastsft.patching.lora import fused_lora_forward, lora_eligibility
from fastsft.reference import lora as ref
from helpers import DEVICES, assert_close, assert_close_to_baseline, backend_params, opcheck_triton

OP = "lora"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


def make_proj(in_f, out_f, r, dtype, device, *, grad=True):
    """A frozen base weight and an adapter with non-zero B (PEFT initializes B to zero; tests must not)."""
    w = (torch.randn(out_f, in_f, dtype=torch.float64) / in_f**0.5).to(device=device, dtype=dtype)
    a = (torch.randn(r, in_f, dtype=torch.float64) / in_f**0.5).to(device=device, dtype=dtype)
    b = (torch.randn(out_f, r, dtype=torch.float64) / r**0.5).to(device=device, dtype=dtype)
    return w, a.requires_grad_(grad), b.requires_grad_(grad)


def make_x(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()


def double(t):
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def grads_of(outs, inputs, seed=1):
    """Forward outputs and gradients of ``sum(out * upstream)`` w.r.t. the inputs that require grad."""
    gen = torch.Generator().manual_seed(seed)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def compare(outs, grads, ref_outs, ref_grads, rtol, what):
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(o, r, rtol=rtol, name=f"{what} out {i}")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, rtol=rtol, name=f"{what} grad {i}")


# --- against the float64 reference ------------------------------------------------------------------------------

SIZES = [(96, 200, 1), (200, 96, 8), (96, 96, 16), (64, 130, 64), (130, 72, 128)]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("in_f,out_f,r", SIZES, ids=[f"{i}x{o}r{r}" for i, o, r in SIZES])
def test_linear_float32_against_float64_reference(device, backend, in_f, out_f, r):
    x = make_x((3, 13, in_f), torch.float32, device)
    w, a, b = make_proj(in_f, out_f, r, torch.float32, device)
    scaling = 16 / r
    out = lora_linear(x, w, a, b, scaling, backend=backend)
    assert out.shape == (3, 13, out_f) and out.dtype == torch.float32
    got = grads_of(out, (x, a, b))
    xd, wd, ad, bd = map(double, (x, w, a, b))
    want = grads_of(ref.lora_linear(xd, wd, ad, bd, scaling), (xd, ad, bd))
    compare(*got, *want, rtol=2e-5, what="lora_linear")


@pytest.mark.parametrize("device,backend", CASES)
def test_linear_float64_and_non_contiguous(device, backend):
    """float64 through every backend (the projections need no Triton kernel), a transposed input view and a
    sliced adapter; the upstream gradient of a non-contiguous view."""
    x = torch.randn(97, 40, dtype=torch.float64, device=device).t().requires_grad_()
    assert not x.is_contiguous()
    w, a, b = make_proj(97, 55, 8, torch.float64, device)
    a_view = torch.randn(97, 8, dtype=torch.float64, device=device).t().requires_grad_()
    scaling = 2 / math.sqrt(8)  # rsLoRA
    out = lora_linear(x, w, a_view, b, scaling, backend=backend)
    got = grads_of(out, (x, a_view, b))
    xd, ad, bd = map(double, (x, a_view, b))
    want = grads_of(ref.lora_linear(xd, w, ad, bd, scaling), (xd, ad, bd))
    compare(*got, *want, rtol=1e-12, what="float64")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("r", [1, 16])
def test_qkv_against_reference(device, backend, r):
    hidden, head_dim = 96, 8
    x = make_x((2, 11, hidden), torch.float32, device)
    q, k, v = (make_proj(hidden, n * head_dim, r, torch.float32, device) for n in (12, 4, 4))
    outs = lora_qkv(x, q, k, v, 2.0, backend=backend)
    assert [o.shape[-1] for o in outs] == [96, 32, 32]
    inputs = (x, *q[1:], *k[1:], *v[1:])
    got = grads_of(outs, inputs)
    xd = double(x)
    qd, kd, vd = (tuple(map(double, p)) for p in (q, k, v))
    want = grads_of(ref.lora_qkv(xd, qd, kd, vd, 2.0), (xd, *qd[1:], *kd[1:], *vd[1:]))
    compare(*got, *want, rtol=2e-5, what="lora_qkv")
    # each projection equals lora_linear alone
    for o, p in zip(outs, (q, k, v)):
        assert_close(o, lora_linear(x, *p, 2.0, backend=backend), rtol=1e-6, name="qkv vs linear")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_projections_of_one_input_against_reference(device, backend, n):
    """``lora_projections``: any number of projections of one input (an MLP's gate and up: 2), as one op."""
    from fastsft.ops import lora_projections

    x = make_x((2, 5, 64), torch.float32, device)
    projs = [make_proj(64, 40 + 8 * i, 4 + i, torch.float32, device) for i in range(n)]
    leaves = (x, *[t for p in projs for t in p[1:]])
    got = grads_of(lora_projections(x, projs, 0.7, backend=backend), leaves)
    want = grads_of(tuple(ref.lora_linear(x, *p, 0.7) for p in projs), leaves)
    compare(*got, *want, rtol=1e-5, what=f"{n} projections")


def test_ops_do_not_import_patching():
    """The import direction is patching -> ops -> kernels: importing the ops loads nothing of fastsft.patching."""
    import subprocess
    import sys

    code = "import sys, fastsft.ops; print(sorted(m for m in sys.modules if m.startswith('fastsft.patching')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("device,backend", CASES)
def test_qkv_unused_output_and_frozen_adapter(device, backend):
    """Only q reaches the loss (k, v get no gradient); k's adapter is frozen."""
    x = make_x((17, 64), torch.float32, device)
    q, k, v = (make_proj(64, n, 4, torch.float32, device) for n in (64, 32, 32))
    k[1].requires_grad_(False)
    k[2].requires_grad_(False)
    q_out, _, _ = lora_qkv(x, q, k, v, 0.5, backend=backend)
    got = grads_of(q_out, (x, *q[1:], *v[1:]))
    xd, qd = double(x), tuple(map(double, q))
    want = grads_of(ref.lora_linear(xd, *qd, 0.5), (xd, *qd[1:]))
    compare(got[0], got[1][:3], *want, rtol=2e-5, what="q only")
    for g in got[1][3:]:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden,inter,r", [(96, 200, 8), (64, 96, 1), (40, 130, 64)])
def test_mlp_float32_against_float64_reference(device, backend, activation, hidden, inter, r):
    x = (make_x((3, 7, hidden), torch.float32, device) * 2).detach().requires_grad_()
    gate, up = (make_proj(hidden, inter, r, torch.float32, device) for _ in range(2))
    down = make_proj(inter, hidden, r, torch.float32, device)
    scaling = 32 / r
    out = lora_mlp(x, gate, up, down, scaling, activation, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    inputs = (x, *gate[1:], *up[1:], *down[1:])
    got = grads_of(out, inputs)
    xd = double(x)
    gd, ud, dd = (tuple(map(double, p)) for p in (gate, up, down))
    want = grads_of(ref.lora_mlp(xd, gd, ud, dd, scaling, activation), (xd, *gd[1:], *ud[1:], *dd[1:]))
    compare(*got, *want, rtol=3e-5, what=f"lora_mlp {activation}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tile_tokens", [4096, 5, 1], ids=["one-tile", "tiles-of-5", "tiles-of-1"])
def test_mlp_gradients_only_against_float64_reference(device, backend, activation, tile_tokens):
    """compute_output=False: zeros forward, and the plain MLP's gradients (every tile size, a ragged last tile)."""
    hidden, inter, r = 40, 130, 8
    x = (make_x((3, 7, hidden), torch.float32, device) * 2).detach().requires_grad_()
    gate, up = (make_proj(hidden, inter, r, torch.float32, device) for _ in range(2))
    down = make_proj(inter, hidden, r, torch.float32, device)
    out = lora_mlp(x, gate, up, down, 2.0, activation, backend=backend, compute_output=False,
                   tile_tokens=tile_tokens)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not out.detach().any()
    got_grads = grads_of(out, (x, *gate[1:], *up[1:], *down[1:]))[1]
    xd = double(x)
    gd, ud, dd = (tuple(map(double, p)) for p in (gate, up, down))
    want_grads = grads_of(ref.lora_mlp(xd, gd, ud, dd, 2.0, activation), (xd, *gd[1:], *ud[1:], *dd[1:]))[1]
    assert len(got_grads) == len(want_grads) == 7
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, rtol=3e-5, name=f"lora_mlp gradients only, grad {i}")


@pytest.mark.parametrize("device,backend", CASES)
def test_mlp_gradients_only_frozen_parts_and_no_input_grad(device, backend):
    """Only the gradients asked for: a frozen adapter and an input without grad get none, the rest match."""
    x = make_x((11, 24), torch.float32, device).detach()
    gate, up = (make_proj(24, 36, 4, torch.float32, device) for _ in range(2))
    down = make_proj(36, 24, 4, torch.float32, device, grad=False)
    out = lora_mlp(x, gate, up, down, 0.5, backend=backend, compute_output=False, tile_tokens=4)
    leaves = (*gate[1:], *up[1:])
    got = torch.autograd.grad((out * 1.5).sum(), leaves)
    want = torch.autograd.grad((lora_mlp(x, gate, up, down, 0.5, backend="reference") * 1.5).sum(), leaves)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, rtol=3e-5, name=f"grad {i}")


def test_mlp_gradients_only_refuses_bad_settings():
    x = torch.randn(4, 8)
    p = make_proj(8, 8, 2, torch.float32, "cpu")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="tile_tokens"):
            lora_mlp(x, p, p, p, 1.0, compute_output=False, tile_tokens=bad)
    with pytest.raises(TypeError, match="compute_output"):
        lora_mlp(x, p, p, p, 1.0, compute_output="no")


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_input(device, backend):
    x = make_x((0, 32), torch.float32, device)
    p = make_proj(32, 48, 4, torch.float32, device)
    out = lora_linear(x, *p, 1.0, backend=backend)
    assert out.shape == (0, 48)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(p[1].grad) == 0


# --- low precision: against a same-dtype PyTorch baseline ---------------------------------------------------------

def peft_style(x, w, a, b, s):
    """What PEFT computes in the input dtype: base linear plus ``lora_B(lora_A(x)) * s``."""
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s


def peft_style_mlp(x, gate, up, down, s, activation):
    h = ref.gated(peft_style(x, *gate, s).float(), peft_style(x, *up, s).float(), activation).to(x.dtype)
    return peft_style(h, *down, s)


def _low_precision_case(device, backend, dtype, kind, activation="swiglu"):
    hidden, inter, r = 200, 136, 16
    x = make_x((64, hidden), dtype, device)
    projs = [make_proj(hidden, inter, r, dtype, device), make_proj(hidden, inter, r, dtype, device),
             make_proj(inter if kind == "mlp" else hidden, hidden if kind == "mlp" else 40, r, dtype, device)]
    s = 2.0
    if kind == "mlp":
        fn = lambda x_, p: lora_mlp(x_, *p, s, activation, backend=backend)  # noqa: E731
        base = lambda x_, p: peft_style_mlp(x_, *p, s, activation)  # noqa: E731
        reff = lambda x_, p: ref.lora_mlp(x_, *p, s, activation)  # noqa: E731
    else:
        fn = lambda x_, p: lora_qkv(x_, *p, s, backend=backend)  # noqa: E731
        base = lambda x_, p: tuple(peft_style(x_, *pi, s) for pi in p)  # noqa: E731
        reff = lambda x_, p: ref.lora_qkv(x_, *p, s)  # noqa: E731

    def leaves(x_, p):
        return (x_, *[t for pi in p for t in pi[1:]])

    got = grads_of(fn(x, projs), leaves(x, projs))
    xb = x.detach().clone().requires_grad_()
    pb = [tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in pi) for pi in projs]
    baseline = grads_of(base(xb, pb), leaves(xb, pb))
    xd = double(x)
    pd = [tuple(map(double, pi)) for pi in projs]
    want = grads_of(reff(xd, pd), leaves(xd, pd))
    for tag, idx in (("out", 0), ("grad", 1)):
        for i, (a, b_, c) in enumerate(zip(got[idx], baseline[idx], want[idx])):
            assert a.dtype == dtype
            assert_close_to_baseline(a, c, b_, factor=3.0, name=f"{kind} {tag} {i}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["qkv", "mlp"])
def test_float16_against_baseline(device, backend, kind):
    _low_precision_case(device, backend, torch.float16, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind,activation", [("qkv", "swiglu"), ("mlp", "swiglu"), ("mlp", "geglu"),
                                             ("mlp", "geglu_tanh")])
def test_bfloat16_against_baseline_gpu(backend, kind, activation):
    _low_precision_case("cuda", backend, torch.bfloat16, kind, activation)


def _half_devices():
    return [pytest.param("cpu", torch.float16, id="cpu-float16")] + (
        [pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=pytest.mark.gpu)]
        if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,dtype", _half_devices())
@pytest.mark.parametrize("kind", ["linear", "qkv", "mlp"])
def test_float32_master_adapters_with_half_input(device, dtype, kind):
    """float32 adapters with a half input (PEFT under autocast): the op casts them inside, as autocast casts PEFT's,
    and returns float32 gradients of the adapters; equal to the op on half adapters cast outside (differentiably)
    up to the half rounding the outside cast adds to the adapters' gradients."""
    if backends.unavailable_reason(OP, "triton", torch.device(device)):
        pytest.skip("the triton backend is not available")
    H, r = 64, 8
    sizes = {"linear": [(H, 96)], "qkv": [(H, 96), (H, 32), (H, 32)], "mlp": [(H, 160), (H, 160), (160, H)]}[kind]
    projs = [make_proj(i, o, r, torch.float32, device) for i, o in sizes]
    projs = [(w.to(dtype), a, b) for w, a, b in projs]
    x = make_x((2, 7, H), dtype, device)

    def run(ps, xx):
        if kind == "linear":
            return lora_linear(xx, *ps[0], 2.0, backend="triton")
        if kind == "qkv":
            return lora_qkv(xx, *ps, 2.0, backend="triton")
        return lora_mlp(xx, *ps, 2.0, backend="triton")

    adapters = [t for p in projs for t in p[1:]]
    outs, grads = grads_of(run(projs, x), (x, *adapters))
    assert all(g.dtype == torch.float32 for g in grads[1:])
    xb = x.detach().clone().requires_grad_()
    want_outs, want_grads = grads_of(run([(w, a.to(dtype), b.to(dtype)) for w, a, b in projs], xb),
                                     (xb, *adapters))
    for o, wo in zip(outs, want_outs):
        assert o.dtype == dtype and torch.equal(o, wo)  # the same half adapters, the same GEMMs
    assert torch.equal(grads[0], want_grads[0])
    for i, (g, wg) in enumerate(zip(grads[1:], want_grads[1:])):
        assert_close(g, wg, rtol=1e-2, name=f"{kind} adapter grad {i}")


def test_step_casts_reuse_and_invalidation():
    from fastsft.ops.lora import StepCasts

    casts = StepCasts()
    p = torch.nn.Parameter(torch.randn(4, 6))
    first = casts.get(p, torch.float16)
    assert first.dtype == torch.float16 and torch.equal(first, p.detach().half())
    assert casts.get(p, torch.float16) is first  # reused within the step
    assert casts.get(p, torch.bfloat16) is not first  # per dtype
    with torch.no_grad():
        p.add_(1.0)  # an optimizer's in-place update bumps the version
    second = casts.get(p, torch.float16)
    assert second is not first and torch.equal(second, p.detach().half())
    p.data.copy_(torch.zeros(4, 6))  # a write that bumps no version (bitsandbytes' 8-bit optimizers write so)
    assert casts.get(p, torch.float16) is second  # not seen within a step ...
    casts.new_step()
    third = casts.get(p, torch.float16)
    assert torch.equal(third, torch.zeros(4, 6, dtype=torch.float16))  # ... but at the next
    assert third is second  # refreshed in place, in one multi-tensor copy with the others at the step's start
    # a weight without memory at the step's start (FSDP2 frees unsharded parameters between uses): not read then,
    # copied when asked for after it is back
    p.untyped_storage().resize_(0)
    casts.new_step()
    p.untyped_storage().resize_(4 * 6 * 4)
    with torch.no_grad():
        p.copy_(torch.full((4, 6), 3.0))
    assert torch.equal(casts.get(p, torch.float16), torch.full((4, 6), 3.0, dtype=torch.float16))
    del p
    casts.new_step()  # a weight gone: its copy is dropped
    assert not casts._buffers and not casts._copies


def test_step_casts_keep_nothing_from_a_graphs_warm_up_run():
    """The eager run before a capture casts afresh and keeps no copy: the graph makes its own, and a kept one would
    be refreshed at every step for nothing."""
    from fastsft import _capture
    from fastsft.ops.lora import StepCasts

    casts = StepCasts()
    p = torch.nn.Parameter(torch.randn(4, 6))
    q = torch.nn.Parameter(torch.randn(2, 6))
    with _capture.warming_up():
        first = casts.get(p, torch.float16)
        assert torch.equal(first, p.detach().half()) and casts.get(p, torch.float16) is not first
        halves = [casts.get(t, torch.float16) for t in (p, q)]
        assert casts.joined((p, q), halves) is not casts.joined((p, q), halves)
    assert not casts._buffers and not casts._copies
    assert casts.get(p, torch.float16) is casts.get(p, torch.float16)  # after it: cached again
    assert len(casts._buffers) == 1


def test_patched_model_casts_adapters_once_per_step(monkeypatch):
    """A patched float16 PEFT model with float32 adapters under gradient checkpointing: each adapter weight is
    cast once per step (forward and recomputation share the copy), the gradients are float32 and equal the
    unpatched model's up to rounding, and a weight written without a version bump between steps is used anew."""
    import fastsft
    from fastsft.ops import lora as lora_ops

    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("the triton backend is not available")
    torch.manual_seed(0)
    model = tiny_peft_model()
    model.base_model.model.to(torch.float16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(adapters) == 14 and all(p.dtype == torch.float32 for p in adapters)

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in adapters]

    want_loss, want_grads = step()  # unpatched: PEFT's own path
    fastsft.patch(model, fused_cross_entropy=False, attention=False, rms_norm=False, gated_activation=False,
                  rope=False, backend="triton")
    fastsft.patching.refresh(model)
    made = []
    real_get = lora_ops.StepCasts.get

    def counting_get(self, t, dtype):
        out = real_get(self, t, dtype)
        made.append(out)
        return out

    monkeypatch.setattr(lora_ops.StepCasts, "get", counting_get)
    loss, grads = step()
    distinct = {id(t) for t in made}
    assert len(distinct) == len(adapters)  # one copy per adapter weight, reused by the recomputation and backward
    assert len(made) == 2 * len(adapters)  # asked for in the forward and the recomputation, not in backward
    # PEFT without autocast computes a float32 adapter's product in float32, the fused op in the input's half
    # dtype (as under autocast, where training runs): agreement up to half rounding
    assert_close(loss, want_loss, rtol=1e-3, name="loss")
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        assert_close(g, w, rtol=1e-2, name="adapter grad")
    stale_loss = loss
    for p in adapters:  # an update invisible to the version counter, between steps
        p.data.mul_(-3.0)
    casts = model.base_model.model.__dict__["_fastsft_adapter_casts"]
    assert casts._buffers
    fastsft.unpatch(model)
    assert not casts._buffers and not casts._copies  # unpatching drops the copies
    want_loss, _ = step()
    fastsft.patch(model, fused_cross_entropy=False, attention=False, rms_norm=False, gated_activation=False,
                  rope=False, backend="triton")
    fastsft.patching.refresh(model)
    loss, _ = step()
    assert_close(loss, want_loss, rtol=1e-3, name="loss after an unversioned update")
    assert abs(loss - want_loss) < abs(loss - stale_loss) / 10  # the halved weights were used, not last step's


def test_patched_model_runs_sibling_layers_as_one_op(monkeypatch):
    """A patched PEFT model runs each attention module's q, k and v LoRA layers as one op (in the patched
    attention forward), and each MLP's gate and up (in the patched MLP forward), with PEFT's outputs and
    gradients; the layers called on their own compute their own results and keep nothing; a layer made ineligible
    after patching sends its module back to the layers one by one for that call; a k layer left to PEFT keeps q and
    v on their own."""
    import fastsft
    from fastsft.ops import lora as lora_ops

    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("the triton backend is not available")
    torch.manual_seed(0)
    model = tiny_peft_model()
    # with checkpointing the MLP's projections run one by one (lora_mlp would recompute what is recomputed anyway)
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    adapters = [p for p in model.parameters() if p.requires_grad]
    want = grads_of(model(input_ids=ids).logits, adapters)
    switches = dict(fused_cross_entropy=False, attention=False, rms_norm=False, gated_activation=False, rope=False,
                    backend="triton")
    fastsft.patch(model, **switches)
    report = fastsft.patching.refresh(model)
    assert "q/k/v as one op in 1 attention modules" in report.patched["lora"], str(report)
    assert "gate/up LoRA as one op in 1" in report.patched["lora"], str(report)
    sizes = []
    real = lora_ops._LoraProjections.apply
    monkeypatch.setattr(lora_ops._LoraProjections, "apply",
                        lambda x, s, objs, casts, *t: sizes.append(len(t) // 3) or real(x, s, objs, casts, *t))
    got = grads_of(model(input_ids=ids).logits, adapters)
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 3, 3]  # q/k/v, o, gate/up, down; forward and recomputation
    compare(*got, *want, rtol=1e-5, what="patched model vs PEFT")

    attn = model.base_model.model.model.layers[0].self_attn
    mlp = model.base_model.model.model.layers[0].mlp
    x = make_x((2, 3, 96), torch.float32, "cpu")
    fastsft.unpatch(model)
    want_k, want_u = attn.k_proj(x), mlp.up_proj(x)
    fastsft.patch(model, **switches)
    fastsft.patching.refresh(model)
    sizes.clear()
    assert torch.equal(attn.k_proj(x), want_k) and torch.equal(mlp.up_proj(x), want_u)  # on their own
    assert sizes == [1, 1]
    assert not any(k.startswith("_fastsft") and "lora" not in k and "forwards" not in k
                   for m in (attn.k_proj, mlp.up_proj) for k in m.__dict__)  # nothing kept for a later call

    attn.k_proj.merge()  # ineligible after patching: this call runs q, k, v one by one (k through PEFT)
    sizes.clear()
    got = model(input_ids=ids).logits
    assert sizes.count(3) == 0 and sizes.count(1) >= 2, sizes
    attn.k_proj.unmerge()
    want_logits = got

    attn.k_proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
    report = fastsft.patching.refresh(model)
    assert "q/k/v" not in report.patched["lora"] and "dropout" in report.patched["lora"], str(report)
    attn.k_proj.lora_dropout["default"] = torch.nn.Dropout(0.0)
    fastsft.patching.refresh(model)
    assert_close(model(input_ids=ids).logits, want_logits, rtol=1e-5, name="logits after merge and unmerge")


# --- 4-bit base weights: an object that dequantizes on demand -----------------------------------------------------

class FakeNF4:
    """Stands in for a bitsandbytes Params4bit: int8 codes with a per-row absmax; ``dequantize()`` returns a new
    dense tensor every call and counts the calls."""

    def __init__(self, w: torch.Tensor):
        self.absmax = w.abs().amax(1, keepdim=True).clamp(min=1e-8)
        self.codes = torch.round(w / self.absmax * 7).to(torch.int8)
        self.dtype, self.calls = w.dtype, 0

    def dequantize(self):
        self.calls += 1
        return (self.codes.to(torch.float32) / 7 * self.absmax.float()).to(self.dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["linear", "qkv", "mlp"])
def test_fake_nf4_base_matches_dense(device, backend, kind):
    x = make_x((9, 96), torch.float32, device)
    dims = {"linear": [(96, 72)], "qkv": [(96, 64), (96, 32), (96, 32)], "mlp": [(96, 136), (96, 136), (136, 96)]}
    projs = [make_proj(i, o, 8, torch.float32, device) for i, o in dims[kind]]
    quant = [FakeNF4(p[0]) for p in projs]
    dense = [(q.dequantize(), a, b) for q, (_, a, b) in zip(quant, projs)]
    for q in quant:
        q.calls = 0
    as_quant = [(q, a, b) for q, (_, a, b) in zip(quant, projs)]

    def call(ps):
        if kind == "linear":
            return lora_linear(x, *ps[0], 1.5, backend=backend)
        if kind == "qkv":
            return lora_qkv(x, *ps, 1.5, backend=backend)
        return lora_mlp(x, *ps, 1.5, backend=backend)

    leaves = (x, *[t for p in projs for t in p[1:]])
    kept, out_q = saved_bytes(lambda: call(as_quant), leaves[1:])
    if backend == "triton":  # x and the rank-r products only: no dequantized weight is kept
        r_total = sum(p[1].shape[0] for p in projs)
        assert kept == (x.numel() + x.shape[0] * r_total) * 4
        assert [q.calls for q in quant] == [1] * len(quant)
    got = grads_of(out_q, leaves)
    want = grads_of(call(dense), leaves)
    compare(*got, *want, rtol=1e-6, what=f"nf4 {kind}")
    if backend == "triton":  # dequantized once in forward and once more in backward
        assert [q.calls for q in quant] == [2] * len(quant), [q.calls for q in quant]


# --- bitsandbytes 4-bit weights dequantized by fastsft's NF4 op (no bitsandbytes needed) ------------------------

NF4_CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES
             for b in backend_params("dequantize_nf4", d)]


def fake_params4bit(w: torch.Tensor, *, nested: bool, blocksize: int = 64):
    """A quantized bitsandbytes ``Params4bit`` stand-in made with fastsft's NF4 quantizer: the packed uint8 codes
    carrying a ``QuantState``-like ``quant_state`` (the offset a 0-d float32 tensor, as bitsandbytes keeps it).
    Returns it and the keyword arguments of the reference dequantization."""
    from types import SimpleNamespace

    from fastsft.ops.nf4 import quantize_nf4

    kw = quantize_nf4(w, blocksize=blocksize, nested=nested)
    n = kw["nested"]
    state = SimpleNamespace(absmax=kw["absmax"], shape=torch.Size(kw["shape"]), dtype=kw["dtype"],
                            blocksize=blocksize, quant_type="nf4", nested=n is not None, code=kw["code"],
                            offset=None if n is None else torch.tensor(n.offset, device=w.device),
                            state2=None if n is None else SimpleNamespace(absmax=n.absmax, code=n.code,
                                                                         blocksize=n.blocksize))
    param = kw["packed"].clone()
    param.quant_state = state
    return param, kw


@pytest.mark.parametrize("device,backend", NF4_CASES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype,blocksize", [(torch.bfloat16, 64), (torch.float32, 128), (torch.float16, 64)])
def test_bnb4bit_weight_nf4_is_fastsft_op_bit_exact(device, backend, nested, dtype, blocksize, monkeypatch):
    """An NF4 ``Params4bit`` dequantizes through fastsft's op, equal bit for bit to the reference (which equals
    bitsandbytes', tests/test_nf4.py), without bitsandbytes; its state is read once, when the weight is wrapped:
    no host sync (``.item()``) per call, in ``dequantize()`` or in the fused LoRA op's forward and backward."""
    import sys

    from fastsft.ops.lora import Bnb4bitWeight
    from fastsft.reference import nf4 as nf4_ref

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any use of bitsandbytes raises ImportError
    w = (torch.randn(72, 96, dtype=torch.float64) / 10).to(device=device, dtype=dtype)
    param, kw = fake_params4bit(w, nested=nested, blocksize=blocksize)
    want = nf4_ref.dequantize_nf4(**kw)
    items = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or item(self))
    weight = Bnb4bitWeight(param, backend=backend)
    assert len(items) == int(nested)  # the offset, read once here
    items.clear()
    for _ in range(3):
        got = weight.dequantize()
        assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)
    _, a, b = make_proj(96, 72, 4, dtype, device)
    x = make_x((5, 96), dtype, device)
    out = lora_linear(x, weight, a, b, 0.5)
    out.sum().backward()
    assert items == [], f"{len(items)} host syncs per call"
    assert torch.equal(weight.with_backend("reference").dequantize(), want)


def test_bnb4bit_weight_fp4_keeps_bitsandbytes(monkeypatch):
    """FP4 (and NF4 states fastsft's op does not take) are left to bitsandbytes' ``dequantize_4bit``."""
    import sys

    from fastsft.ops.lora import Bnb4bitWeight

    param, _ = fake_params4bit(torch.randn(8, 64), nested=False)
    param.quant_state.quant_type = "fp4"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError):
        Bnb4bitWeight(param).dequantize()


# --- what the autograd graph keeps -----------------------------------------------------------------------------

_saved: list = []


def _pack_record(t):
    _saved.append(t)
    return t


def _param_ptrs(tensors):
    return {t.data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def saved_bytes(fn, params):
    """Bytes of the tensors the autograd graph saves during ``fn()``, parameters (weights, adapters) excluded."""
    _saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(_pack_record, lambda t: t):
        out = fn()
    ptrs = _param_ptrs(params)
    seen, total = set(), 0
    for t in _saved:
        if t.data_ptr() not in ptrs and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()
    _saved.clear()
    return total, out


def test_saved_tensors_linear_and_qkv():
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("the triton backend is not available")
    T, H, r = 64, 96, 8
    x = make_x((T, H), torch.float32, "cpu")
    q, k, v = (make_proj(H, n, r, torch.float32, "cpu") for n in (96, 32, 32))
    params = [t for p in (q, k, v) for t in p]
    total, _ = saved_bytes(lambda: lora_linear(x, *q, 2.0, backend="triton"), params)
    assert total == (T * H + T * r) * 4  # x and x @ A.T; never [T, out]
    total, _ = saved_bytes(lambda: lora_qkv(x, q, k, v, 2.0, backend="triton"), params)
    assert total == (T * H + T * 3 * r) * 4
    peft_total, _ = saved_bytes(lambda: [peft_style(x, *p, 2.0) for p in (q, k, v)], params)
    assert peft_total == total  # PEFT without dropout keeps the same (x and each x @ A.T): the hook sees them


def test_saved_tensors_mlp():
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("the triton backend is not available")
    T, H, inter, r = 64, 96, 200, 8
    x = make_x((T, H), torch.float32, "cpu")
    gate, up = (make_proj(H, inter, r, torch.float32, "cpu") for _ in range(2))
    down = make_proj(inter, H, r, torch.float32, "cpu")
    params = [t for p in (gate, up, down) for t in p]
    total, _ = saved_bytes(lambda: lora_mlp(x, gate, up, down, 2.0, backend="triton"), params)
    assert total == (T * H + T * 2 * r + T * r) * 4  # x, x @ [A_g; A_u].T, h @ A_d.T: nothing [T, inter]
    peft_total, _ = saved_bytes(lambda: peft_style_mlp(x, gate, up, down, 2.0, "swiglu"), params)
    assert peft_total >= 4 * T * inter * 4 > total  # PEFT keeps gate, up, act(gate), h, ...


# --- the Triton ops ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_ops(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels import lora as kernels  # noqa: F401 (registers the ops)

    g, u, dh = (torch.randn(7, 33, device=device) for _ in range(3))
    opcheck_triton(torch.ops.fastsft.lora_gated_forward_triton.default, (g.clone(), u, "silu"))
    opcheck_triton(torch.ops.fastsft.lora_gated_backward_triton.default, (dh.clone(), g.clone(), u.clone(), "gelu_tanh"))
    # and the in-place results are what they claim
    g2, u2, dh2 = g.clone(), u.clone(), dh.clone()
    kernels.lora_gated_backward(dh2, g2, u2, "gelu")
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = F.gelu(gr) * ur
    dg, du = torch.autograd.grad(h, (gr, ur), dh)
    for name, a, b in (("h", dh2, h), ("dg", g2, dg), ("du", u2, du)):
        assert_close(a, b, rtol=1e-5, name=name)


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_input():
    x = torch.randn(5, 16)
    w, a, b = make_proj(16, 8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.clone().requires_grad_(), a, b, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        lora_linear(x, w, a.double(), b, 1.0)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(x, w, a[:, :8], b, 1.0)
    with pytest.raises(ValueError, match="weight"):
        lora_linear(x, w[:4], a, b, 1.0)
    with pytest.raises(TypeError, match="dequantize"):
        lora_linear(x, object(), a, b, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        lora_linear(x, w, a, b, float("nan"))
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, (w, a, b), (w, a, b), make_proj(8, 16, 2, torch.float32, "cpu"), 1.0, "relu")
    with pytest.raises(TypeError, match="triple"):
        lora_qkv(x, (w, a), (w, a, b), (w, a, b), 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        lora_linear(x, w, a, b, 1.0, backend="nope")


# --- against PEFT -----------------------------------------------------------------------------------------------

def tiny_peft_model(*, use_rslora=False, r=8, dropout=0.0, dtype=torch.float32, use_dora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=200, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    model = LlamaForCausalLM(cfg).to(dtype)
    lcfg = LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
                      init_lora_weights=False,  # random B: a zero B would hide errors in dA and dX
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lcfg)


def lora_modules(model):
    from peft.tuners.lora import Linear

    return {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, Linear)}


def peft_and_fused(module, x, backend):
    adapter = module.active_adapters[0]
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    results = []
    for fn in (lambda: module(x), lambda: fused_lora_forward(module, x, backend=backend)):
        out = fn()
        assert out is not None
        results.append(grads_of(out, (x, a, b)))
    return results


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_fused_lora_forward_matches_peft(device, backend, use_rslora):
    model = tiny_peft_model(use_rslora=use_rslora).to(device)
    mods = lora_modules(model)
    assert len(mods) == 7
    expected = 16 / math.sqrt(8) if use_rslora else 16 / 8
    for name, m in mods.items():
        assert lora_eligibility(m) is None, name
        assert m.scaling["default"] == pytest.approx(expected)
        x = make_x((2, 5, m.in_features), torch.float32, device)
        (peft_out, peft_grads), (out, grads) = peft_and_fused(m, x, backend)
        compare(out, grads, peft_out, peft_grads, rtol=1e-5, what=name)


@pytest.mark.parametrize("device,backend", CASES)
def test_qkv_and_mlp_match_peft(device, backend):
    from fastsft.patching.lora import lora_parts

    model = tiny_peft_model().to(device)
    layer = model.base_model.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = make_x((2, 5, 96), torch.float32, device)
    parts = {n: lora_parts(getattr(attn, n), x.dtype) for n in ("q_proj", "k_proj", "v_proj")}
    s = parts["q_proj"][1]
    outs = lora_qkv(x, *(parts[n][0] for n in ("q_proj", "k_proj", "v_proj")), s, backend=backend)
    adapters = [t for n in ("q_proj", "k_proj", "v_proj") for t in parts[n][0][1:]]
    got = grads_of(outs, (x, *adapters))
    want = grads_of(tuple(getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")), (x, *adapters))
    compare(*got, *want, rtol=1e-5, what="qkv vs peft")

    mparts = [lora_parts(getattr(mlp, n), x.dtype)[0] for n in ("gate_proj", "up_proj", "down_proj")]
    adapters = [t for p in mparts for t in p[1:]]
    got = grads_of(lora_mlp(x, *mparts, s, "swiglu", backend=backend), (x, *adapters))
    want = grads_of(mlp(x), (x, *adapters))
    compare(*got, *want, rtol=1e-5, what="mlp vs peft")


def test_eligibility_follows_peft_state():
    model = tiny_peft_model()
    m = lora_modules(model)["q_proj"]
    x = make_x((3, 96), torch.float32, "cpu")
    assert lora_eligibility(m) is None
    m.merge()
    assert "merged" in lora_eligibility(m)
    assert fused_lora_forward(m, x) is None
    m.unmerge()
    assert lora_eligibility(m) is None
    (peft_out, _), (out, _) = peft_and_fused(m, x, "reference")
    assert_close(out[0], peft_out[0], rtol=1e-5, name="after unmerge")
    with model.disable_adapter():
        assert "disabled" in lora_eligibility(m)
        assert fused_lora_forward(m, x) is None
    assert lora_eligibility(m) is None
    assert "not a PEFT LoRA" in lora_eligibility(torch.nn.Linear(4, 4))
    assert fused_lora_forward(m, x.to(torch.float16)) is None  # base weight of another dtype: PEFT's path

    dropped = lora_modules(tiny_peft_model(dropout=0.1))["q_proj"]
    assert "dropout" in lora_eligibility(dropped)
    dora = lora_modules(tiny_peft_model(use_dora=True))["q_proj"]
    assert "variant" in lora_eligibility(dora)


def test_cached_plan_follows_every_state_change():
    """lora_parts caches each layer's plan; after every change PEFT or a user can make on the same module the
    fused path agrees with the uncached eligibility check, and when it runs it matches PEFT's forward."""
    from peft import LoraConfig

    from fastsft.patching.lora import lora_parts

    model = tiny_peft_model()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]))
    m = lora_modules(model)["q_proj"]
    x = make_x((3, 96), torch.float32, "cpu")

    def check(what):
        fused = lora_parts(m, x.dtype) is not None
        assert fused == (lora_eligibility(m) is None), what
        if fused:
            (peft_out, _), (out, _) = peft_and_fused(m, x, "reference")
            assert_close(out[0], peft_out[0], rtol=1e-5, name=what)
        return fused

    assert check("initial")
    model.base_model.set_adapter("second")
    assert check("second adapter active") and lora_parts(m, x.dtype)[1] == pytest.approx(2.0)
    model.base_model.set_adapter("default")
    m.set_scale("default", 0.5)  # scaling is read on every call, not cached
    assert check("rescaled") and lora_parts(m, x.dtype)[1] == pytest.approx(0.5 * 16 / 8)
    m.lora_dropout["default"] = torch.nn.Dropout(0.2)
    assert not check("dropout added")
    m.lora_dropout["default"] = torch.nn.Dropout(0.0)
    assert check("dropout 0")
    m.lora_dropout["default"].p = 0.3  # the same module, its rate changed
    assert not check("dropout rate changed in place")
    m.lora_dropout["default"].p = 0.0
    assert check("dropout rate back to 0")
    m.get_base_layer().weight.requires_grad_(True)
    assert not check("base weight unfrozen")
    m.get_base_layer().weight.requires_grad_(False)
    m.get_base_layer().weight = torch.nn.Parameter(torch.randn(96, 96), requires_grad=False)
    assert check("base weight replaced")
    model.base_model.set_adapter(["default", "second"])
    assert not check("two active adapters")
    model.base_model.set_adapter("default")
    m.merge()
    assert not check("merged")
    m.unmerge()
    assert check("unmerged")


# --- bitsandbytes NF4 base weights under PEFT's Linear4bit (QLoRA) -------------------------------------------------
# The base weight both PEFT (through bitsandbytes) and the fused path compute with is the dequantized NF4 weight, so
# the float64 reference is built from it: these tests measure the LoRA computation, not the quantization error.

NF4_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama 3 8B: attention, gate/up, down
NF4_TOKENS = 2048
MiB = 2**20


def peft_nf4_linear(in_f, out_f, device, dtype=torch.bfloat16, *, r=16, alpha=32):
    """A bitsandbytes ``Linear4bit`` quantized as ``fastsft.load(load_in_4bit=True)`` does (NF4, double quantization,
    bfloat16 compute) under PEFT's LoRA ``Linear4bit`` (no dropout, random B); the weight is quantized when it moves
    to ``device``, the adapters are in ``dtype``."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from fastsft.ops.lora import Bnb4bitWeight
    from fastsft.patching.lora import lora_parts

    w = (torch.randn(out_f, in_f, dtype=torch.float64) / in_f**0.5).to(dtype)
    base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    base = base.to(device)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)
    module = LoraLinear4bit(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.0,
                            init_lora_weights=False)
    module.lora_A["default"].to(device=device, dtype=dtype)
    module.lora_B["default"].to(device=device, dtype=dtype)
    assert base.weight.quant_state is not None and base.weight.dtype == torch.uint8  # really quantized
    assert lora_eligibility(module) is None and module.scaling["default"] == alpha / r
    assert isinstance(lora_parts(module, dtype)[0][0], Bnb4bitWeight)  # the fused path takes the 4-bit branch
    return module


def nf4_dense(module) -> torch.Tensor:
    """bitsandbytes' own dequantization of the layer's weight, which the fused path's (fastsft's NF4 op) equals."""
    import bitsandbytes.functional as bnb_functional

    from fastsft.ops.lora import Bnb4bitWeight

    weight = module.base_layer.weight
    dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(Bnb4bitWeight(weight).dequantize(), dense)
    return dense


def adapter_weights(module):
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def nf4_linear_case(module, x, backend):
    """[out, dX, dA, dB] of the fused path, of PEFT's own forward (the same-dtype baseline) and of the float64
    reference on the dequantized weight."""
    a, b = adapter_weights(module)
    (peft_outs, peft_grads), (outs, grads) = peft_and_fused(module, x, backend)
    xd, wd, ad, bd = map(double, (x, nf4_dense(module), a, b))
    want_outs, want_grads = grads_of(ref.lora_linear(xd, wd, ad, bd, module.scaling["default"]), (xd, ad, bd))
    return [*outs, *grads], [*peft_outs, *peft_grads], [*want_outs, *want_grads]


@pytest.mark.gpu
@pytest.mark.parametrize("in_f,out_f", NF4_SHAPES, ids=[f"{i}x{o}" for i, o in NF4_SHAPES])
def test_nf4_lora_linear_matches_peft_gpu(in_f, out_f):
    """PEFT's Linear4bit fused: output and the gradients of x, A and B within 3x the error PEFT itself makes in
    bfloat16 (the factor of the other bfloat16 tests: both round the same GEMM outputs once, the fused path adds the
    adapter in float32 inside addmm_ where PEFT rounds it separately)."""
    module = peft_nf4_linear(in_f, out_f, "cuda")
    x = make_x((NF4_TOKENS, in_f), torch.bfloat16, "cuda")
    got, baseline, want = nf4_linear_case(module, x, "triton")
    for name, g, b, w in zip(("out", "dX", "dA", "dB"), got, baseline, want):
        assert g.dtype == torch.bfloat16, name
        assert_close_to_baseline(g, w, b, factor=3.0, name=f"nf4 {in_f}x{out_f} {name}")


def nf4_mlp_case(hidden, inter, tokens, device):
    """[out, dX, dA and dB of gate, up, down] of ``lora_mlp`` on three 4-bit projections, of Llama's MLP on PEFT's
    layers ``down(silu(gate(x)) * up(x))`` (the same-dtype baseline), and of the float64 reference."""
    from fastsft.patching.lora import lora_parts

    mods = (peft_nf4_linear(hidden, inter, device), peft_nf4_linear(hidden, inter, device),
            peft_nf4_linear(inter, hidden, device))
    gate, up, down = mods
    parts = [lora_parts(m, torch.bfloat16)[0] for m in mods]
    x = make_x((tokens, hidden), torch.bfloat16, device)
    adapters = [t for m in mods for t in adapter_weights(m)]
    got = grads_of(lora_mlp(x, *parts, 2.0, "swiglu", backend="triton"), (x, *adapters))
    baseline = grads_of(down(F.silu(gate(x)) * up(x)), (x, *adapters))
    xd = double(x)
    dense = [tuple(map(double, (nf4_dense(m), *adapter_weights(m)))) for m in mods]
    want = grads_of(ref.lora_mlp(xd, *dense, 2.0, "swiglu"), (xd, *[t for p in dense for t in p[1:]]))
    return [[*outs, *grads] for outs, grads in (got, baseline, want)]


@pytest.mark.gpu
def test_nf4_lora_mlp_matches_peft_gpu():
    """The gated MLP with all three projections 4-bit (Llama 3 8B's sizes), same tolerance as the projections."""
    names = ["out", "dX"] + [f"{p} d{t}" for p in ("gate", "up", "down") for t in "AB"]
    for name, g, b, w in zip(names, *nf4_mlp_case(4096, 14336, NF4_TOKENS, "cuda")):
        assert g.dtype == torch.bfloat16, name
        assert_close_to_baseline(g, w, b, factor=3.0, name=f"nf4 mlp {name}")


@pytest.mark.gpu
def test_nf4_lora_linear_keeps_no_dequantized_weight_gpu(monkeypatch):
    """The dequantized weight (112 MiB at 4096x14336 in bfloat16) is a temporary: after the forward the graph holds
    the output and x @ A.T only, and forward and backward each have at most one dequantized weight alive at a time.
    The bound's slack (16 MiB) covers a dequantized absmax (3.5 MiB here) and the caching allocator
    rounding a few blocks up by at most 1 MiB each; it is well under the weight itself."""
    from fastsft.ops.lora import Bnb4bitWeight

    in_f, out_f, r, T = 4096, 14336, 16, NF4_TOKENS
    module = peft_nf4_linear(in_f, out_f, "cuda", r=r)
    x = make_x((T, in_f), torch.bfloat16, "cuda")
    dy = torch.randn(T, out_f, device="cuda", dtype=torch.bfloat16)
    weight_bytes, out_bytes, slack = out_f * in_f * 2, T * out_f * 2, 16 * MiB
    fused_lora_forward(module, x, backend="triton").backward(dy)  # warm-up: cuBLAS workspace, kernels loaded
    params = [x, *adapter_weights(module)]
    for p in params:
        p.grad = None
    calls = []
    dequantize = Bnb4bitWeight.dequantize
    monkeypatch.setattr(Bnb4bitWeight, "dequantize", lambda self: calls.append(1) or dequantize(self))

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fused_lora_forward(module, x, backend="triton")
    kept = torch.cuda.memory_allocated() - before
    forward_peak = torch.cuda.max_memory_allocated() - before
    assert len(calls) == 1
    assert kept < weight_bytes, f"the forward keeps {kept / MiB:.1f} MiB, a weight is {weight_bytes / MiB:.1f}"
    assert kept <= out_bytes + T * r * 2 + slack, f"kept {kept / MiB:.1f} MiB beyond the output and x @ A.T"
    assert forward_peak <= kept + weight_bytes + slack, f"forward peak {forward_peak / MiB:.1f} MiB"

    torch.cuda.reset_peak_memory_stats()
    out.backward(dy)
    backward_peak = torch.cuda.max_memory_allocated() - before
    assert len(calls) == 2  # dequantized once more for dX
    # alive at most: the output, one dequantized weight, dX and the rank-r products and adapter gradients
    assert backward_peak <= kept + weight_bytes + T * in_f * 2 + slack, f"backward peak {backward_peak / MiB:.1f} MiB"
    del out
    left = torch.cuda.memory_allocated() - before
    grad_bytes = sum(p.numel() for p in params) * 2
    assert left <= grad_bytes + slack, f"{left / MiB:.1f} MiB left after backward, gradients are {grad_bytes / MiB:.1f}"


def nf4_llama_pair(tmp_path, device):
    """A random two-layer Llama (hidden 512, bfloat16) saved and loaded back twice: in NF4 as ``fastsft.load``
    quantizes, and dense in float32 with each quantized weight replaced by its dequantized value, so that the float32
    model computes exactly what the 4-bit one approximates in bfloat16. Both get the same LoRA adapter on every
    projection (r 16, alpha 32, no dropout, random B; PEFT keeps the adapters in float32)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16, quantization_config=nf4,
                                                     device_map={"": 0 if device == "cuda" else "cpu"})
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).to(device)
    import bitsandbytes.functional as bnb_functional

    n4 = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = module.weight
            dense.get_submodule(name).weight.data.copy_(bnb_functional.dequantize_4bit(weight.data,
                                                                                       weight.quant_state).float())
            n4 += 1
    assert n4 == 14  # every projection of both layers; lm_head stays dense
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    quantized = get_peft_model(quantized, LoraConfig(**lora))
    dense = get_peft_model(dense, LoraConfig(**lora))
    adapters = {n: p for n, p in quantized.named_parameters() if p.requires_grad}
    assert len(adapters) == 28 and all("lora_" in n for n in adapters)
    for name, p in dense.named_parameters():
        if p.requires_grad:
            p.data.copy_(adapters[name].float())
    # training mode, as in fine-tuning (no dropout anywhere: the same numbers); in eval mode bitsandbytes would repack
    # CPU weights for its inference kernel on the first forward without grad (test_nf4_patch_report_follows_switch)
    return quantized.train(), dense.train()


def loss_logits_grads(model, ids):
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = model(input_ids=ids, labels=ids)
    grads = torch.autograd.grad(out.loss, list(adapters.values()))
    return out.loss.detach().double(), out.logits.detach(), dict(zip(adapters, grads))


def nf4_patched_against_unpatched(tmp_path, device, monkeypatch):
    """The 4-bit model unpatched (PEFT and bitsandbytes), then patched with the 4-bit LoRA switch on (the LoRA kernel
    only, so every difference is the fused LoRA path), each against the float32 model on the dequantized weights."""
    import fastsft
    from fastsft.ops.lora import Bnb4bitWeight
    from fastsft.patching.modules import LORA_4BIT_ENV

    quantized, dense = nf4_llama_pair(tmp_path, device)
    ids = torch.randint(0, 1024, (2, 128), device=device)
    unpatched = loss_logits_grads(quantized, ids)
    want = loss_logits_grads(dense, ids)

    monkeypatch.setenv(LORA_4BIT_ENV, "1")
    report = fastsft.patch(quantized, fused_cross_entropy=False, attention=False, rms_norm=False,
                           gated_activation=False, rope=False, backend="triton")
    assert "14 LoRA layers fused (14 on a 4-bit base)" in report.patched["lora"], str(report)
    assert "2 MLPs (LoRA-fused without checkpointing)" in report.patched["lora"], str(report)
    calls = []
    dequantize = Bnb4bitWeight.dequantize
    monkeypatch.setattr(Bnb4bitWeight, "dequantize", lambda self: calls.append(1) or dequantize(self))
    patched = loss_logits_grads(quantized, ids)
    # 14 in forward; 11 in backward: layer 0's q, k, v see a hidden state without gradient (frozen embeddings),
    # so their dX, the only backward use of the weight in a projection, is not computed
    assert len(calls) == 14 + 11, len(calls)
    return patched, unpatched, want


def check_nf4_llama(patched, unpatched, want):
    """Loss, logits and all 28 adapter gradients of the patched 4-bit model within 3x the error of the unpatched one
    against the float32 model on the same (dequantized) weights. PEFT computes the adapters in float32 and rounds
    their output once; the fused path computes them in bfloat16 (one more rounding of A, B and x @ A.T, ~0.1% each),
    which is small beside the bfloat16 rounding both accumulate through two layers. The loss, a scalar that may land
    close to the reference by chance, gets a floor of 1e-3 relative (0.007: a fifth of a bfloat16 step at 6.9)."""
    (loss, logits, grads), (base_loss, base_logits, base_grads), (ref_loss, ref_logits, ref_grads) = \
        patched, unpatched, want
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= 3 * abs(base_loss - ref_loss) + 1e-3 * ref_loss, \
        (loss.item(), base_loss.item(), ref_loss.item())
    assert_close_to_baseline(logits, ref_logits, base_logits, factor=3.0, name="logits")
    assert grads.keys() == ref_grads.keys() == base_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name
        assert_close_to_baseline(g, ref_grads[name], base_grads[name], factor=3.0, name=name)


@pytest.mark.gpu
def test_nf4_llama_patched_matches_unpatched_gpu(tmp_path, monkeypatch):
    check_nf4_llama(*nf4_patched_against_unpatched(tmp_path, "cuda", monkeypatch))


def test_nf4_patch_report_follows_switch(tmp_path, monkeypatch):
    """On the CPU (bitsandbytes 0.50 quantizes and dequantizes NF4 there): 4-bit LoRA layers are fused by default,
    giving PEFT's logits, and left to PEFT, with the reason, when the switch turns them off."""
    import fastsft
    from fastsft.patching.modules import LORA_4BIT_ENV, LORA_4BIT_OFF

    quantized, _ = nf4_llama_pair(tmp_path, "cpu")
    ids = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        unpatched = quantized(input_ids=ids).logits
    monkeypatch.setenv(LORA_4BIT_ENV, "0")
    report = fastsft.patch(quantized, fused_cross_entropy=False)
    assert f"0 LoRA layers fused; left to PEFT: 14 ({LORA_4BIT_OFF})" in report.patched["lora"], str(report)
    assert LORA_4BIT_ENV in LORA_4BIT_OFF
    fastsft.unpatch(quantized)
    monkeypatch.delenv(LORA_4BIT_ENV)
    report = fastsft.patch(quantized, fused_cross_entropy=False, rms_norm=False, attention=False,
                           gated_activation=False)
    assert "14 LoRA layers fused (14 on a 4-bit base)" in report.patched["lora"], str(report)
    assert "2 MLPs (LoRA-fused without checkpointing)" in report.patched["lora"], str(report)
    assert "left to PEFT" not in report.patched["lora"]
    with torch.no_grad():
        fused = quantized(input_ids=ids).logits
    # PEFT's base GEMM runs in bitsandbytes' bfloat16 compute dtype like the fused one; they differ where the
    # adapters (float32 in PEFT, bfloat16 here) are rounded
    assert_close(fused.float(), unpatched.float(), rtol=2e-2, name="logits")
    assert not torch.equal(fused, unpatched)  # the fused path did run

    # An eval-mode forward without grad through PEFT (unpatched) may repack the weights for bitsandbytes' CPU kernel,
    # which dequantize_4bit cannot read: the patched layers must then leave them to PEFT, not compute garbage.
    fastsft.unpatch(quantized)
    quantized.eval()
    with torch.no_grad():
        evaluated = quantized(input_ids=ids).logits
        fastsft.patch(quantized, fused_cross_entropy=False, rms_norm=False, attention=False, gated_activation=False)
        assert_close(quantized(input_ids=ids).logits.float(), evaluated.float(), rtol=2e-2, name="eval logits")
    fastsft.unpatch(quantized)
