"""SwiGLU and GeGLU: every backend against the float64 reference, forward and backward; transformers' MLP math."""

import pytest
import torch
import torch.nn.functional as F

from fastsft import backends
from fastsft.ops import geglu, swiglu
from fastsft.reference import gated_activation as ref
from helpers import DEVICES, assert_close, assert_close_to_baseline, backend_params, opcheck_triton

OP = "gated_activation"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
ACTS = {
    "silu": lambda g, u, backend: swiglu(g, u, backend=backend),
    "gelu": lambda g, u, backend: geglu(g, u, backend=backend),
    "gelu_tanh": lambda g, u, backend: geglu(g, u, "tanh", backend=backend),
}


def make(shape, dtype, device, scale=3.0):
    gate = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_()
    up = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    return gate, up


def run(activation, backend, gate, up, upstream):
    out = ACTS[activation](gate, up, backend)
    return out, torch.autograd.grad((out.double() * upstream).sum(), (gate, up))


def as_double(t):
    return t.detach().double().requires_grad_()


def check(activation, backend, gate, up, rtol):
    upstream = torch.randn(gate.shape, dtype=torch.float64, device=gate.device)
    out, grads = run(activation, backend, gate, up, upstream)
    ref_out, ref_grads = run(activation, "reference", as_double(gate), as_double(up), upstream)
    assert out.dtype == gate.dtype and out.shape == gate.shape
    for name, a, b in zip(("out", "grad gate", "grad up"), (out, *grads), (ref_out, *ref_grads)):
        assert_close(a, b, rtol=rtol, name=f"{activation} {name}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("shape", [(3, 4001), (2, 37, 96), (0, 96)], ids=["4001", "37x96", "empty"])
def test_float32_against_float64_reference(device, backend, activation, shape):
    gate, up = make(shape, torch.float32, device)
    check(activation, backend, gate, up, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_non_contiguous_inputs(device, backend, activation):
    fused = torch.randn(37, 2 * 96, device=device) * 3  # a fused gate_up projection, split in two views
    gate, up = (t.requires_grad_() for t in fused.detach().chunk(2, dim=-1))
    assert not gate.is_contiguous()
    check(activation, backend, gate, up, rtol=2e-6)
    gate_t = (torch.randn(96, 37, device=device) * 3).t().requires_grad_()
    check(activation, backend, gate_t, torch.randn(37, 96, device=device).requires_grad_(), rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_extreme_gates_stay_finite(device, backend, activation):
    gate = torch.tensor([-100.0, -20.0, -5.0, 0.0, 5.0, 20.0, 100.0], device=device).requires_grad_()
    up = torch.ones(7, device=device, requires_grad=True)
    check(activation, backend, gate, up, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_float16_against_same_dtype_baseline(device, backend, activation):
    gate, up = make((33, 1000), torch.float16, device)
    upstream = torch.randn(gate.shape, dtype=torch.float64, device=device)
    out, grads = run(activation, backend, gate, up, upstream)
    ref_out, ref_grads = run(activation, "reference", as_double(gate), as_double(up), upstream)
    # baseline: transformers' MLP, act_fn(gate_proj(x)) * up_proj(x) in float16
    from transformers.activations import ACT2FN

    act = ACT2FN[{"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[activation]]
    gb, ub = (t.detach().clone().requires_grad_() for t in (gate, up))
    base = act(gb) * ub
    base_grads = torch.autograd.grad((base.double() * upstream).sum(), (gb, ub))
    for name, a, r, b in zip(("out", "grad gate", "grad up"), (out, *grads), (ref_out, *ref_grads),
                             (base, *base_grads)):
        assert_close_to_baseline(a, r, b, name=name)


@pytest.mark.parametrize("device,backend", CASES)
def test_only_requested_gradients(device, backend):
    gate, up = make((4, 96), torch.float32, device)
    up.requires_grad_(False)
    swiglu(gate, up, backend=backend).sum().backward()
    assert gate.grad is not None and up.grad is None


def test_bad_input_is_rejected_clearly():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="share a floating dtype"):
        swiglu(g, u.half())
    with pytest.raises(TypeError, match="share a floating dtype"):
        geglu(g.long(), u.long())
    with pytest.raises(ValueError, match="one shape"):
        swiglu(g, torch.randn(4, 9))
    with pytest.raises(ValueError, match="one device"):
        swiglu(g, u.to("meta"))
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(g, u, approximate="erf")
    with pytest.raises(TypeError, match="must be a tensor"):
        swiglu(g, 1.0)
    if backends.triton_available(g.device) is None:
        with pytest.raises(TypeError, match="use backend='reference' for float64"):
            swiglu(g.double(), u.double(), backend="triton")


def test_reference_matches_torch_definitions():
    g, u = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.allclose(ref.swiglu(g, u), g * torch.sigmoid(g) * u)
    assert torch.allclose(ref.geglu(g, u), 0.5 * g * (1 + torch.erf(g / 2**0.5)) * u)
    inner = (2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)
    assert torch.allclose(ref.geglu(g, u, "tanh"), 0.5 * g * (1 + torch.tanh(inner)) * u)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels import gated_activation as kernels  # noqa: F401 (registers the ops)

    g, u, dy = (torch.randn(5, 70, device=device) for _ in range(3))
    for activation in ("silu", "gelu_tanh"):
        opcheck_triton(torch.ops.fastsft.gated_activation_forward_triton.default, (g, u, activation))
        opcheck_triton(torch.ops.fastsft.gated_activation_backward_triton.default, (dy, g, u, activation))


# --- GPU: Llama-3-8B MLP shapes in bf16 ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("activation", list(ACTS))
def test_gpu_bf16_8b_shapes(activation):
    gate, up = make((16384, 14336), torch.bfloat16, "cuda", scale=1.0)
    upstream = torch.randn(gate.shape, dtype=torch.float64, device="cuda")
    out, grads = run(activation, "triton", gate, up, upstream)
    ref_out, ref_grads = run(activation, "reference", as_double(gate), as_double(up), upstream)
    base_out, base_grads = run(activation, "reference", gate, up, upstream)  # float32 math, bf16 in and out
    for a, r, b in zip((out, *grads), (ref_out, *ref_grads), (base_out, *base_grads)):
        assert_close_to_baseline(a, r, b, factor=2.0, floor=1e-3)


@pytest.mark.gpu
def test_gpu_64bit_indexing():
    """More than 2**31 elements: offsets must be 64-bit; the last elements are checked."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip("needs 30 GiB of free GPU memory (six bf16 tensors of 2**31 elements)")
    n = 2**31 + 4096
    gate = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = swiglu(gate, up, backend="triton")
    out.backward(torch.ones_like(out))
    tail = slice(n - 4096, n)
    gt, ut = as_double(gate[tail]), as_double(up[tail])
    want = F.silu(gt) * ut
    want.sum().backward()
    assert_close(out[tail], want, rtol=1e-2, name="out, last elements")
    assert_close(gate.grad[tail], gt.grad, rtol=2e-2, name="grad gate, last elements")
    assert_close(up.grad[tail], ut.grad, rtol=2e-2, name="grad up, last elements")
