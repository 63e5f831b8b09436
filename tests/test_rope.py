"""RoPE: every backend against the float64 reference, forward and backward; transformers' apply_rotary_pos_emb."""

import pytest
import torch

from fastsft import backends
from fastsft.ops import rope
from fastsft.reference import rope as ref
from helpers import DEVICES, assert_close, assert_close_to_baseline, backend_params, opcheck, opcheck_triton

OP = "rope"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]


def make(B, Hq, Hk, S, D, dtype, device, *, cos_batch=None, transposed=False):
    """q, k (optionally as transformers leaves them: [B, S, H, D] storage viewed as [B, H, S, D]), cos, sin."""
    def qk(H):
        if transposed:
            t = torch.randn(B, S, H, D, dtype=torch.float64).to(device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, S, D, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_()

    angle = torch.rand(cos_batch or B, S, D // 2, dtype=torch.float64) * 6.3
    angle = torch.cat((angle, angle), dim=-1)  # as transformers builds them: the halves repeat
    return qk(Hq), qk(Hk), angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype)


def run(backend, q, k, cos, sin, upstream):
    out = rope(q, k, cos, sin, backend=backend)
    total = sum((o.double() * u).sum() for o, u in zip(out, upstream))
    return out, torch.autograd.grad(total, (q, k))


def as_double(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def check(backend, q, k, cos, sin, rtol):
    upstream = [torch.randn(t.shape, dtype=torch.float64, device=t.device) for t in (q, k)]
    out, grads = run(backend, q, k, cos, sin, upstream)
    ref_out, ref_grads = run("reference", as_double(q), as_double(k), cos.double(), sin.double(), upstream)
    for name, o, ro in zip(("q", "k", "grad q", "grad k"), (*out, *grads), (*ref_out, *ref_grads)):
        assert o.dtype == q.dtype
        assert_close(o, ro, rtol=rtol, name=name)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("B,Hq,Hk,S,D,cos_batch", [
    (2, 4, 2, 37, 16, None),   # GQA, odd length
    (1, 6, 1, 37, 96, None),   # MQA, head_dim 96
    (3, 4, 4, 5, 64, 1),       # cos/sin shared over the batch
    (2, 3, 3, 0, 16, None),    # empty
])
def test_float32_against_float64_reference(device, backend, B, Hq, Hk, S, D, cos_batch):
    q, k, cos, sin = make(B, Hq, Hk, S, D, torch.float32, device, cos_batch=cos_batch)
    check(backend, q, k, cos, sin, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_general_cos_sin_halves(device, backend):
    """cos/sin whose two halves differ: the backward pass is the exact transpose, not merely a -sin rotation."""
    q, k, _, _ = make(2, 4, 2, 11, 32, torch.float32, device)
    cos, sin = torch.randn(2, 11, 32, device=device), torch.randn(2, 11, 32, device=device)
    check(backend, q, k, cos, sin, rtol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs(device, backend):
    q, k, cos, sin = make(2, 4, 2, 37, 16, torch.float32, device, transposed=True)
    assert not q.is_contiguous()
    check(backend, q, k, cos, sin, rtol=2e-6)
    wide = torch.randn(2, 37, 32, device=device)
    check(backend, q, k, wide[..., ::2], wide[..., 1::2], rtol=2e-6)  # strided cos/sin


@pytest.mark.parametrize("device", DEVICES)
def test_triton_outputs_keep_the_input_layout(device):
    """transformers' q/k are [B, S, H, D] storage seen as [B, H, S, D]: the Triton op writes its outputs (and the
    backward its gradients) in that layout, so each token's heads are one contiguous row; contiguous stays so."""
    if backends.unavailable_reason(OP, "triton", torch.device(device)):
        pytest.skip("the triton backend is not available")
    for transposed in (True, False):
        q, k, cos, sin = make(2, 4, 2, 9, 16, torch.float32, device, transposed=transposed)
        q.requires_grad_(), k.requires_grad_()
        out_q, out_k = rope(q, k, cos, sin, backend="triton")
        assert out_q.stride() == q.stride() and out_k.stride() == k.stride()
        want_q, want_k = rope(q.detach(), k.detach(), cos, sin, backend="reference")
        assert_close(out_q, want_q, rtol=2e-6)
        assert_close(out_k, want_k, rtol=2e-6)
        (out_q.sum() + 2 * out_k.sum()).backward()
        assert q.grad.stride() == q.stride()


@pytest.mark.parametrize("device,backend", CASES)
def test_float16_against_same_dtype_baseline(device, backend):
    q, k, cos, sin = make(2, 8, 2, 37, 64, torch.float16, device)
    upstream = [torch.randn(t.shape, dtype=torch.float64, device=device) for t in (q, k)]
    out, grads = run(backend, q, k, cos, sin, upstream)
    ref_out, ref_grads = run("reference", as_double(q), as_double(k), cos.double(), sin.double(), upstream)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    qb, kb = (t.detach().clone().requires_grad_() for t in (q, k))
    base = apply_rotary_pos_emb(qb, kb, cos, sin)
    base_grads = torch.autograd.grad(sum((o.double() * u).sum() for o, u in zip(base, upstream)), (qb, kb))
    for o, ro, bo in zip((*out, *grads), (*ref_out, *ref_grads), (*base, *base_grads)):
        assert_close_to_baseline(o, ro, bo)


@pytest.mark.parametrize("device,backend", CASES)
def test_matches_transformers_with_llama3_scaling_and_packed_positions(device, backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    rotary = LlamaRotaryEmbedding(config).to(device)
    # two packed rows: positions restart at the second sequence
    position_ids = torch.cat((torch.arange(20), torch.arange(17)))[None].to(device)
    q = torch.randn(1, 4, 37, 32, device=device, requires_grad=True)
    k = torch.randn(1, 2, 37, 32, device=device, requires_grad=True)
    cos, sin = rotary(q, position_ids)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = rope(q, k, cos, sin, backend=backend)
    upstream = [torch.randn_like(t) for t in want]
    want_grads = torch.autograd.grad(want, (q, k), upstream)
    got_grads = torch.autograd.grad(got, (q, k), upstream)
    for name, a, b in zip(("q", "k", "grad q", "grad k"), (*got, *got_grads), (*want, *want_grads)):
        assert_close(a, b, rtol=1e-6, name=name)
    # the second sequence's first token is rotated exactly as position 0
    assert_close(got[0][:, :, 20], q.detach()[:, :, 20], rtol=1e-6, name="position 0 is the identity")


def test_bad_input_is_rejected_clearly():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        rope(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="floating point"):
        rope(q.long(), k, cos, sin)
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="must agree"):
        rope(q, torch.randn(1, 2, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope(torch.randn(1, 4, 5, 7), torch.randn(1, 2, 5, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos and sin must be"):
        rope(q, k, torch.randn(1, 6, 8), torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="one shape"):
        rope(q, k, cos, sin[:, :4])
    with pytest.raises(ValueError, match="one device"):
        rope(q, k, cos.to("meta"), sin.to("meta"))
    backend = "triton" if backends.triton_available(q.device) is None else "cuda"
    with pytest.raises(TypeError, match="use backend='reference' for float64"):
        rope(q.double(), k.double(), cos, sin, backend=backend)


def _args(device, cos_batch=2, inverse=False):
    return (torch.randn(2, 4, 5, 16, device=device), torch.randn(2, 2, 5, 16, device=device),
            torch.randn(cos_batch, 5, 16, device=device), torch.randn(cos_batch, 5, 16, device=device), inverse)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_compiled(device):
    reason = backends.unavailable_reason(OP, "cuda", torch.device(device))
    if reason:
        pytest.skip(reason)
    opcheck(torch.ops.fastsft.rope.default, _args(device))
    opcheck(torch.ops.fastsft.rope.default, _args(device, cos_batch=1, inverse=True))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels.rope import rope as kernel  # noqa: F401 (registers the op)

    opcheck_triton(torch.ops.fastsft.rope_triton.default, _args(device))


@pytest.mark.parametrize("device,backend", CASES)
def test_traceable_by_torch_compile(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("Triton's CPU interpreter cannot run on traced tensors; the GPU run covers this case")
    q, k, cos, sin = make(2, 4, 2, 7, 16, torch.float32, device)
    want = rope(q, k, cos, sin, backend=backend)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def f(q, k, cos, sin):
        return rope(q, k, cos, sin, backend=backend)

    torch._dynamo.reset()
    for a, b in zip(f(q, k, cos, sin), want):
        assert_close(a, b, rtol=1e-6)


# --- GPU: Llama-3-8B shapes in bf16 ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bf16_8b_shapes(backend):
    q, k, cos, sin = make(1, 32, 8, 16384, 128, torch.bfloat16, "cuda", transposed=True)
    upstream = [torch.randn(t.shape, dtype=torch.float64, device="cuda") for t in (q, k)]
    out, grads = run(backend, q, k, cos, sin, upstream)
    ref_out, ref_grads = run("reference", as_double(q), as_double(k), cos.double(), sin.double(), upstream)
    base_out, base_grads = run("reference", q, k, cos, sin, upstream)  # float32 math, bf16 in and out
    for o, ro, bo in zip((*out, *grads), (*ref_out, *ref_grads), (*base_out, *base_grads)):
        assert_close_to_baseline(o, ro, bo, factor=2.0, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_64bit_indexing(backend):
    """q with more than 2**31 elements: offsets must be 64-bit; the last tokens are checked."""
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory (q, its output and gradient of 2**31 bf16 elements)")
    S = 2**31 // (32 * 128) + 16
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angle = torch.rand(1, S, 64, device="cuda") * 6.3
    angle = torch.cat((angle, angle), -1)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    qo, ko = rope(q, k, cos, sin, backend=backend)
    (qo.float().sum() + ko.float().sum()).backward()
    tail = slice(S - 16, S)
    want_q, want_k = ref.rope(q.detach()[:, :, tail].double(), k.detach()[:, :, tail].double(),
                              cos[:, tail].double(), sin[:, tail].double())
    assert_close(qo[:, :, tail], want_q, rtol=1e-2, name="q, last tokens")
    assert_close(ko[:, :, tail], want_k, rtol=1e-2, name="k, last tokens")
    qt = q.detach()[:, -1:, tail].double().requires_grad_()
    want = ref.rope(qt, qt, cos[:, tail].double(), sin[:, tail].double())[0]
    want.sum().backward()
    assert_close(q.grad[:, -1:, tail], qt.grad, rtol=2e-2, name="grad q, last head and tokens")
