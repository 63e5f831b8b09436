"""fastsft.ops.lora: every backend against the float64 reference and against PEFT, forward and backward; what the
autograd graph keeps; 4-bit (dequantizing) base weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastsft import backends
from fastsft.ops import fused_lora_forward, lora_eligibility, lora_linear, lora_mlp, lora_qkv
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
    from fastsft.ops.lora import lora_parts

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
