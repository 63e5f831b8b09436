"""RMSNorm: every backend against the float64 reference, forward and backward; transformers' own norms."""

import pytest
import torch

from fastsft import backends
from fastsft.ops import rms_norm
from fastsft.reference import rms_norm as ref
from helpers import DEVICES, assert_close, assert_close_to_baseline, backend_params, opcheck, opcheck_triton

OP = "rms_norm"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
FAST = [c for c in CASES if c.values[1] != "reference"]
EPS = 1e-6


def make(rows, hidden, dtype, device, *, residual=False, weight_grad=True, offset=0.0):
    x = torch.randn(rows, hidden, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    # Gemma keeps w near 0 (the scale is 1 + w); Llama near 1
    w = ((torch.randn(hidden, dtype=torch.float64) * 0.1) + (1.0 - offset)).to(device=device, dtype=dtype)
    w.requires_grad_(weight_grad)
    r = torch.randn(rows, hidden, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() if residual \
        else None
    return x, w, r


def run(backend, x, w, r, offset, upstream):
    """Outputs and gradients (x, weight if trainable, residual if given) of sum(outputs * upstream)."""
    leaves = [t for t in (x, w, r) if t is not None and t.requires_grad]
    out = rms_norm(x, w, EPS, offset=offset, residual=r, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(total, leaves)
    return outs, grads


def as_double(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def check(backend, x, w, r, offset, rtol):
    n_out = 1 if r is None else 2
    upstream = [torch.randn(x.shape, dtype=torch.float64, device=x.device) for _ in range(n_out)]
    outs, grads = run(backend, x, w, r, offset, upstream)
    ref_outs, ref_grads = run("reference", as_double(x), as_double(w), as_double(r), offset, upstream)
    for name, o, ro in zip(("y", "x + residual"), outs, ref_outs):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert_close(o, ro, rtol=rtol, name=name)
    assert len(grads) == len(ref_grads)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, rtol=rtol, name=f"grad {i}")
    return outs, grads


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("rows,hidden,offset,residual,weight_grad", [
    (37, 96, 0.0, False, True), (37, 96, 1.0, False, True), (37, 96, 0.0, True, True),
    (37, 96, 1.0, True, False), (5, 4001, 0.0, True, True), (3, 4001, 1.0, False, False), (0, 96, 0.0, True, True)])
def test_float32_against_float64_reference(device, backend, rows, hidden, offset, residual, weight_grad):
    x, w, r = make(rows, hidden, torch.float32, device, residual=residual, weight_grad=weight_grad, offset=offset)
    check(backend, x, w, r, offset, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_and_batched_inputs(device, backend):
    base = torch.randn(2, 96, 19, device=device)
    x = base.transpose(1, 2).requires_grad_()  # [2, 19, 96], inner stride 19
    r = torch.randn(2, 96, 19, device=device).transpose(1, 2).requires_grad_()
    w = torch.randn(96 * 2, device=device)[::2].requires_grad_()  # strided weight
    assert not x.is_contiguous() and not w.is_contiguous()
    check(backend, x, w, r, 1.0, rtol=2e-6)
    check(backend, x, w, None, 0.0, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_frozen_weight_gets_no_gradient(device, backend):
    x, w, r = make(9, 96, torch.float32, device, residual=True, weight_grad=False)
    y, s = rms_norm(x, w, EPS, residual=r, backend=backend)
    (y.sum() + s.sum()).backward()
    assert w.grad is None and x.grad is not None
    assert torch.equal(x.grad, r.grad)  # d(x + residual) reaches both addends unchanged


@pytest.mark.parametrize("device,backend", FAST)
def test_weight_gradient_is_deterministic(device, backend):
    x, w, _ = make(300, 96, torch.float32, device)
    g = torch.randn(300, 96, device=device)
    first = torch.autograd.grad(rms_norm(x, w, EPS, backend=backend), w, g)[0]
    second = torch.autograd.grad(rms_norm(x, w, EPS, backend=backend), w, g)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", CASES)
def test_float16_against_same_dtype_baseline(device, backend):
    x, w, r = make(33, 4001, torch.float16, device, residual=True)
    upstream = [torch.randn(33, 4001, dtype=torch.float64, device=device) for _ in range(2)]
    outs, grads = run(backend, x, w, r, 0.0, upstream)
    ref_outs, ref_grads = run("reference", as_double(x), as_double(w), as_double(r), 0.0, upstream)
    # baseline: transformers' LlamaRMSNorm math, the residual add in float16
    xb, wb, rb = (t.detach().clone().requires_grad_() for t in (x, w, r))
    sb = xb + rb
    h = sb.float()
    yb = wb * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.float16)
    base_grads = torch.autograd.grad((yb.double() * upstream[0]).sum() + (sb.double() * upstream[1]).sum(),
                                     (xb, wb, rb))
    assert_close_to_baseline(outs[0], ref_outs[0], yb, name="y")
    assert_close(outs[1], ref_outs[1], rtol=1e-3, name="x + residual")  # one rounding, exactly as the baseline
    for name, g, rg, bg in zip(("grad x", "grad w", "grad residual"), grads, ref_grads, base_grads):
        assert_close_to_baseline(g, rg, bg, name=name)


@pytest.mark.parametrize("device,backend", CASES)
def test_matches_transformers_llama_and_gemma_norms(device, backend):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 7, 96, device=device)
    llama = LlamaRMSNorm(96, eps=1e-5).to(device)
    gemma = GemmaRMSNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        llama.weight.normal_(1.0, 0.1)
        gemma.weight.normal_(0.0, 0.1)
    for module, offset, eps in ((llama, 0.0, 1e-5), (gemma, 1.0, 1e-6)):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        want = module(xa)
        got = rms_norm(xb, module.weight, eps, offset=offset, backend=backend)
        assert_close(got, want, rtol=1e-6, name=type(module).__name__)
        g = torch.randn_like(want)
        want_gx, want_gw = torch.autograd.grad(want, (xa, module.weight), g)
        got_gx, got_gw = torch.autograd.grad(got, (xb, module.weight), g)
        assert_close(got_gx, want_gx, rtol=1e-5, name="grad x")
        assert_close(got_gw, want_gw, rtol=1e-5, name="grad weight")


def test_bad_input_is_rejected_clearly():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(TypeError, match="share a floating dtype"):
        rms_norm(x, w.double(), EPS)
    with pytest.raises(TypeError, match="share a floating dtype"):
        rms_norm(x.long(), w.long(), EPS)
    with pytest.raises(ValueError, match="weight \\[H\\]"):
        rms_norm(x, torch.randn(9), EPS)
    with pytest.raises(ValueError, match="eps must be a positive"):
        rms_norm(x, w, 0.0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, EPS, residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.randn(8, device="meta"), EPS)
    with pytest.raises(TypeError, match="must be a tensor"):
        rms_norm([1.0], w, EPS)
    with pytest.raises(TypeError, match="use backend='reference' for float64"):
        rms_norm(x.double(), w.double(), EPS, backend="triton" if backends.triton_available(x.device) is None
                 else "cuda")


def _forward_args(device, residual=True):
    x = torch.randn(6, 40, device=device)
    return (x, torch.randn(40, device=device), torch.randn(6, 40, device=device) if residual else None, EPS, 1.0)


def _backward_args(device, grad_sum=True, dw=True):
    x = torch.randn(6, 40, device=device)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    return (torch.randn(6, 40, device=device), torch.randn(6, 40, device=device) if grad_sum else None, x,
            torch.randn(40, device=device), rstd, 0.0, dw)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_compiled(device):
    reason = backends.unavailable_reason(OP, "cuda", torch.device(device))
    if reason:
        pytest.skip(reason)
    for residual in (True, False):
        opcheck(torch.ops.fastsft.rms_norm_forward.default, _forward_args(device, residual))
    for grad_sum, dw in ((True, True), (False, False)):
        opcheck(torch.ops.fastsft.rms_norm_backward.default, _backward_args(device, grad_sum, dw))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels import rms_norm as kernels  # noqa: F401 (registers the ops)

    opcheck_triton(torch.ops.fastsft.rms_norm_forward_triton.default, _forward_args(device))
    opcheck_triton(torch.ops.fastsft.rms_norm_backward_triton.default, _backward_args(device))


@pytest.mark.parametrize("device,backend", CASES)
def test_traceable_by_torch_compile(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("Triton's CPU interpreter cannot run on traced tensors; the GPU run covers this case")
    x, w, r = make(8, 32, torch.float32, device, residual=True)
    want = rms_norm(x, w, EPS, residual=r, backend=backend)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def f(x, w, r):
        return rms_norm(x, w, EPS, residual=r, backend=backend)

    torch._dynamo.reset()
    got = f(x, w, r)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-6)


# --- GPU: Llama-3-8B shapes in bf16 ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("offset,residual", [(0.0, False), (1.0, True)])
def test_gpu_bf16_8b_shapes(backend, offset, residual):
    x, w, r = make(16384, 4096, torch.bfloat16, "cuda", residual=residual, offset=offset)
    upstream = [torch.randn(16384, 4096, dtype=torch.float64, device="cuda") for _ in range(1 + residual)]
    outs, grads = run(backend, x, w, r, offset, upstream)
    ref_outs, ref_grads = run("reference", as_double(x), as_double(w), as_double(r), offset, upstream)
    base_outs, base_grads = run("reference", x, w, r, offset, upstream)  # float32 math, bf16 in and out
    for o, ro, bo in zip(outs, ref_outs, base_outs):
        assert_close_to_baseline(o, ro, bo, factor=2.0, floor=1e-3, name="output")
    for g, rg, bg in zip(grads, ref_grads, base_grads):
        assert_close_to_baseline(g, rg, bg, factor=2.0, floor=1e-3, name="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_64bit_indexing(backend):
    """x with more than 2**31 elements: row offsets must be 64-bit; the last rows are checked."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory (x, y, grads of 2**31 bf16 elements)")
    rows, hidden = 2**31 // 4096 + 8, 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(hidden, device="cuda") * 0.1 + 1).to(torch.bfloat16).requires_grad_()
    y = rms_norm(x, w, EPS, backend=backend)
    g = torch.ones_like(y)
    y.backward(g)
    tail = x.detach()[-8:].double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    want = ref.rms_norm(tail, wd, EPS)
    want.backward(torch.ones_like(want))
    assert_close(y[-8:], want, rtol=1e-2, name="last rows")
    assert_close(x.grad[-8:], tail.grad, rtol=2e-2, name="grad of the last rows")


def test_row_width_past_the_triton_limit_falls_back_in_auto(monkeypatch):
    """A size the Triton kernel does not take is ``Unsupported``: ``auto`` runs the next backend for that call (a
    ValueError there propagated instead), an explicit request still raises."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on the CPU")
    import importlib

    rms_module = importlib.import_module("fastsft.ops.rms_norm")
    monkeypatch.setattr(rms_module, "MAX_TRITON_HIDDEN", 16)
    monkeypatch.setattr(backends, "_broken", {})
    x, w = torch.randn(3, 32), torch.randn(32)
    with pytest.raises(backends.Unsupported, match="hidden sizes up to 16"):
        rms_norm(x, w, EPS, backend="triton")
    monkeypatch.setattr(backends, "auto_order", lambda op, device: ["triton", "reference"])
    got = rms_norm(x, w, EPS, backend="auto")
    assert torch.equal(got, rms_norm(x, w, EPS, backend="reference")) and backends.fallbacks() == {}


def _second_derivatives(backend, x, w, r):
    """d/d(x, w) of |d(sum(sin(y) + s))/dx|^2: a double backward through the op."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = rms_norm(x, w, EPS, residual=r, backend=backend)
    y, s = out if r is not None else (out, x)
    (gx,) = torch.autograd.grad(y.sin().sum() + s.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), (x, w))


@pytest.mark.parametrize("device,backend", FAST)
@pytest.mark.parametrize("residual", [False, True])
def test_double_backward_matches_reference(device, backend, residual):
    """create_graph=True: the fast backends' gradients have a graph of their own (they returned 0 before)."""
    x, w, r = make(5, 24, torch.float32, device, residual=residual)
    r = None if r is None else r.detach()
    want = _second_derivatives("reference", x, w, r)
    got = _second_derivatives(backend, x, w, r)
    for name, a, b in zip(("x", "weight"), got, want):
        assert_close(a, b, rtol=1e-5, name=f"second derivative wrt {name}")
