"""fastsft.ops.flash_attention_varlen: every backend against the float64 reference, forward and q/k/v gradients.

On the CPU the Triton kernels run in Triton's interpreter (slow), so the CPU cases are few and small (about 150
tokens, a few heads, small blocks so that every sequence spans several); the GPU cases (``@pytest.mark.gpu``)
take bfloat16, every head dim and 8k packed tokens.
"""


import pytest
import torch

from fastsft import backends
from fastsft.ops import flash_attention_varlen
from fastsft.reference import attention as ref
from helpers import (DEVICES, assert_close, assert_close_to_baseline, backend_params, eager_attention,
                     opcheck_triton)

OP = "flash_attention_varlen"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
# norm-wise relative tolerance on the CPU (float64 reference); GPU tests use a same-dtype baseline instead
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.float64: 1e-10}


def lengths_to_cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def random_lengths(total, seed, *, max_len=80):
    """Random segment lengths summing to ``total``, starting with a sequence of length 1."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [1], total - 1
    while left > 0:
        n = min(left, int(torch.randint(2, max_len + 1, (1,), generator=g)))
        lengths.append(n)
        left -= n
    perm = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[i] for i in perm]


def make_inputs(lengths, hq, hkv, d, dtype, device):
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    return q, k, v, lengths_to_cu(lengths, device), max(lengths, default=0)


def run(backend, q, k, v, cu, max_seqlen, **kw):
    """Output and (dq, dk, dv) of sum(out * upstream) with a fixed non-uniform upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = flash_attention_varlen(q, k, v, cu, max_seqlen, backend=backend, **kw)
    upstream = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64, device=out.device).view_as(out)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, q.grad, k.grad, v.grad


def reference_of(q, k, v, cu, max_seqlen, **kw):
    return run("reference", *(t.detach().double() for t in (q, k, v)), cu, max_seqlen, **kw)


def check(backend, q, k, v, cu, max_seqlen, *, rtol, **kw):
    got = run(backend, q, k, v, cu, max_seqlen, **kw)
    want = reference_of(q, k, v, cu, max_seqlen, **kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype and g.shape == w.shape
        assert_close(g, w, rtol=rtol, atol=1e-9, name=name)
        # element-wise too, so one unwritten or wrong row cannot hide in the norm
        scale = w.abs().max().item() + 1e-30
        worst = (g.double() - w).abs().max().item()
        assert worst <= 50 * rtol * scale, f"{name}: max abs error {worst:.3g} (max |value| {scale:.3g})"


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN: an element the kernels forget stays NaN."""
    from fastsft.triton_kernels import flash_attention as fa

    def nan_empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype if dtype is None else dtype)

    monkeypatch.setattr(fa, "_empty", nan_empty)


# (lengths seed, Hq, Hkv, D, dtype, options): GQA 1/4/8, head dims 64, 96 and odd ones, window, softcap, scale
CPU_CASES = [
    pytest.param(1, 4, 4, 64, torch.float32, {}, id="mha-d64-f32"),
    pytest.param(2, 4, 1, 96, torch.float32, {}, id="gqa4-d96-f32"),
    pytest.param(3, 8, 1, 64, torch.float32, {"window": 7}, id="gqa8-d64-window7-f32"),
    pytest.param(4, 4, 2, 64, torch.float32, {"softcap": 5.0, "softmax_scale": 0.3}, id="gqa2-softcap-scale-f32"),
    pytest.param(5, 2, 1, 40, torch.float32, {"window": 33, "softcap": 2.0}, id="d40-window33-softcap-f32"),
    pytest.param(6, 2, 1, 64, torch.float32, {"causal": False}, id="noncausal-f32"),
    pytest.param(7, 4, 1, 64, torch.float16, {"window": 16}, id="gqa4-d64-window16-f16"),
    pytest.param(8, 2, 2, 96, torch.float16, {"softcap": 3.0}, id="d96-softcap-f16"),
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("seed,hq,hkv,d,dtype,opts", CPU_CASES)
def test_matches_reference(device, backend, seed, hq, hkv, d, dtype, opts, poisoned):
    lengths = random_lengths(150, seed)
    q, k, v, cu, max_seqlen = make_inputs(lengths, hq, hkv, d, dtype, device)
    check(backend, q, k, v, cu, max_seqlen, rtol=RTOL[dtype], **opts)


@pytest.mark.parametrize("device,backend", CASES)
def test_head_dim_128_with_zero_length_and_single_token_sequences(device, backend, poisoned):
    lengths = [1, 0, 33, 1, 0, 50, 1]
    q, k, v, cu, _ = make_inputs(lengths, 2, 1, 128, torch.float32, device)
    # max_seqlen larger than needed is allowed (only launches blocks that exit at once)
    check(backend, q, k, v, cu, 70, rtol=RTOL[torch.float32], window=20)


@pytest.mark.parametrize("device,backend", CASES)
def test_one_long_sequence_matches_reference(device, backend, poisoned):
    q, k, v, cu, max_seqlen = make_inputs([131], 2, 1, 64, torch.float32, device)
    check(backend, q, k, v, cu, max_seqlen, rtol=RTOL[torch.float32])


# (fwd, dkdv, dq) blocks as (BLOCK_M queries, BLOCK_N keys): the GPU defaults' shapes, scaled down, and both
# orders of M and N, so the block-range logic is checked with the shapes the tuner may pick
BLOCK_SHAPES = {"gpu-d128": ((128, 64), (32, 128), (128, 32)), "gpu-d256": ((64, 32), (32, 32), (32, 32)),
                "m-lt-n": ((16, 64), (16, 64), (32, 64)), "m-gt-n": ((64, 16), (64, 16), (64, 16))}


@pytest.mark.parametrize("shape", list(BLOCK_SHAPES))
@pytest.mark.parametrize("opts", [{}, {"window": 70, "softcap": 6.0}, {"causal": False}],
                         ids=["causal", "window-softcap", "noncausal"])
def test_other_block_sizes(shape, opts, poisoned, monkeypatch):
    """The block-range logic with the GPU's block shapes (and BLOCK_M < BLOCK_N), in the interpreter."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("needs the triton backend on the CPU")
    from fastsft.triton_kernels import flash_attention as fa

    blocks = dict(zip(("fwd", "dkdv", "dq"), BLOCK_SHAPES[shape]))
    monkeypatch.setattr(fa, "kernel_config", lambda kernel, *a: dict(BLOCK_M=blocks[kernel][0],
                                                                     BLOCK_N=blocks[kernel][1], num_warps=4,
                                                                     num_stages=1))
    q, k, v, cu, m = make_inputs([1, 200, 129, 64, 2], 2, 1, 64, torch.float32, "cpu")
    check("triton", q, k, v, cu, m, rtol=RTOL[torch.float32], **opts)


@pytest.fixture
def tma_launches(monkeypatch):
    """The interpreter's configs with ``tma`` on; counts the launches that took the TMA kernels."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")):
        pytest.skip("needs the triton backend on the CPU")
    from fastsft.triton_kernels import flash_attention as fa
    from fastsft.triton_kernels import flash_attention_tma as fa_tma

    counts = {}
    for name in ("launch_fwd_tma", "launch_dq_tma", "launch_dkdv_tma"):
        def counted(*args, _launch=getattr(fa_tma, name), _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _launch(*args)

        monkeypatch.setattr(fa_tma, name, counted)
    monkeypatch.setattr(fa, "kernel_config", lambda kernel, *a: dict(fa._INTERPRETER[kernel], tma=True))
    return counts


@pytest.mark.parametrize("hq,hkv,d,dtype,opts", [
    (4, 1, 64, torch.float32, {}),
    (4, 2, 32, torch.float16, {"window": 21, "softcap": 4.0}),
    (2, 2, 64, torch.float32, {"causal": False}),
    (2, 1, 96, torch.float32, {}),  # not a power of two: the pointer kernels
], ids=["gqa4-d64", "gqa2-d32-window-softcap-f16", "noncausal", "d96-pointer"])
def test_tma_kernels_match_reference(hq, hkv, d, dtype, opts, tma_launches, poisoned):
    q, k, v, cu, m = make_inputs(random_lengths(150, 12), hq, hkv, d, dtype, "cpu")
    check("triton", q, k, v, cu, m, rtol=RTOL[dtype], **opts)
    want = {} if d == 96 else {"launch_fwd_tma": 1, "launch_dq_tma": 1, "launch_dkdv_tma": 1}
    assert tma_launches == want


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the poisoned sequence's rows
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_inf_in_a_neighbouring_sequence_stays_there(tma, tma_launches, poisoned, monkeypatch):
    """A tile that runs past its sequence's end reads the next sequence's rows (TMA fetches whole tiles): inf
    there must not reach this sequence's outputs or gradients."""
    from fastsft.triton_kernels import flash_attention as fa

    if not tma:
        monkeypatch.setattr(fa, "kernel_config", lambda kernel, *a: dict(fa._INTERPRETER[kernel]))
    lengths = [37, 50, 29]
    q, k, v, cu, m = make_inputs(lengths, 4, 2, 32, torch.float32, "cpu")
    poisoned_rows = slice(37, 87)
    bad = [t.detach().clone() for t in (q, k, v)]
    for t in bad:
        t[poisoned_rows] = float("inf")
    got = run("triton", *bad, cu, m)
    want = reference_of(q, k, v, cu, m)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        for rows in (slice(0, 37), slice(87, 116)):
            assert torch.isfinite(g[rows]).all(), f"{name}: inf/NaN outside the poisoned sequence"
            assert_close(g[rows], w[rows], rtol=RTOL[torch.float32], atol=1e-9, name=name)
    assert bool(tma_launches) == tma


@pytest.mark.parametrize("device,backend", CASES)
def test_window_sizes_around_block_edges(device, backend, poisoned):
    """Windows whose edges fall just before, on and after block boundaries (blocks of 16 and 32 on the CPU)."""
    q, k, v, cu, m = make_inputs([100, 37], 1, 1, 16, torch.float32, device)
    for window in (2, 3, 15, 16, 17, 18, 31, 32, 33, 34, 64, 65, 99, 100):
        check(backend, q, k, v, cu, m, rtol=RTOL[torch.float32], window=window)


@pytest.mark.parametrize("device,backend", CASES)
def test_backward_is_deterministic(device, backend):
    q, k, v, cu, max_seqlen = make_inputs(random_lengths(120, 11), 4, 1, 64, torch.float32, device)
    first = run(backend, q, k, v, cu, max_seqlen, softcap=4.0)
    second = run(backend, q, k, v, cu, max_seqlen, softcap=4.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", CASES)
def test_no_tokens(device, backend):
    for lengths in ([], [0, 0]):
        q, k, v, cu, max_seqlen = make_inputs(lengths, 2, 1, 64, torch.float32, device)
        out, dq, dk, dv = run(backend, q, k, v, cu, max_seqlen)
        assert out.shape == (0, 2, 64) and dq.shape == (0, 2, 64) and dk.shape == (0, 1, 64)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs(device, backend):
    # q, k, v as views of one fused qkv projection (strided heads), as models produce them
    lengths = [5, 40, 20]
    total, d = sum(lengths), 64
    qkv = torch.randn(total, 4 + 1 + 1, d, dtype=torch.float32, device=device)
    q, k, v = qkv[:, :4], qkv[:, 4:5], qkv[:, 5:6]
    cu = lengths_to_cu(lengths, device)
    got = flash_attention_varlen(q, k, v, cu, max(lengths), backend=backend)
    want = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu)
    assert_close(got, want, rtol=RTOL[torch.float32], name="out")


def test_reference_matches_sdpa_per_sequence():
    """The reference against torch's SDPA run one sequence at a time (float64, GQA repeated by hand)."""
    lengths = [1, 9, 30]
    q, k, v, cu, _ = make_inputs(lengths, 4, 2, 16, torch.float64, "cpu")
    got = ref.flash_attention_varlen(q, k, v, cu, softmax_scale=0.2)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0), is_causal=True, scale=0.2)
        assert_close(got[s:e], want.transpose(0, 1), rtol=1e-12, name=f"tokens {s}:{e}")


def test_reference_window_and_softcap_masks():
    keep = ref.attention_mask(5, window=2)
    assert keep.tolist() == [[j in (i - 1, i) for j in range(5)] for i in range(5)]
    q, k, v, cu, _ = make_inputs([6], 1, 1, 4, torch.float64, "cpu")
    got = ref.flash_attention_varlen(q, k, v, cu, window=1)
    assert_close(got, v.detach(), rtol=1e-12, name="window 1 attends to itself only")
    big = ref.flash_attention_varlen(q * 100, k, v, cu, softcap=1.0)
    scores = torch.tanh(100 * (q[:, 0] @ k[:, 0].T) / 2.0).masked_fill(~ref.attention_mask(6), float("-inf"))
    assert_close(big[:, 0], torch.softmax(scores, -1) @ v[:, 0], rtol=1e-12, name="softcap")


def test_bad_input_is_rejected_clearly():
    q, k, v, cu, m = make_inputs([3, 4], 4, 2, 64, torch.float32, "cpu")
    fa = flash_attention_varlen
    with pytest.raises(TypeError, match="share a floating dtype"):
        fa(q, k.half(), v, cu, m)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        fa(q[:, :3], k, v, cu, m)
    with pytest.raises(ValueError, match="expected q"):
        fa(q[0], k, v, cu, m)
    with pytest.raises(ValueError, match="matching q"):
        fa(q, k[:5], v[:5], cu, m)
    with pytest.raises(TypeError, match="int32"):
        fa(q, k, v, cu.long(), m)
    with pytest.raises(ValueError, match="start at 0 and end"):
        fa(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), m)
    with pytest.raises(ValueError, match="non-decreasing"):
        fa(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        fa(q, k, v, cu, 3)
    with pytest.raises(TypeError, match="Python int"):
        fa(q, k, v, cu, torch.tensor(4))
    with pytest.raises(ValueError, match="window"):
        fa(q, k, v, cu, m, window=0)
    with pytest.raises(ValueError, match="needs causal"):
        fa(q, k, v, cu, m, window=4, causal=False)
    with pytest.raises(ValueError, match="softcap"):
        fa(q, k, v, cu, m, softcap=-1.0)
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="reference"):
            fa(q.double(), k.double(), v.double(), cu, m, backend="triton")
        big = torch.randn(7, 1, 512)
        with pytest.raises(backends.Unsupported, match="head dims up to 256"):
            fa(big, big, big, cu, m, backend="triton")


def test_grid_limits_fall_back_instead_of_failing(monkeypatch):
    """More sequences or blocks than a CUDA grid axis holds: the triton backend declines before the forward (its
    backward could not fall back), with the reason, and ``auto`` runs the next backend."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on the CPU")
    from fastsft.triton_kernels import flash_attention as fa_kernels

    monkeypatch.setattr(fa_kernels, "MAX_GRID_YZ", 3)
    q, k, v = (torch.randn(60, 2, 16) for _ in range(3))
    many = torch.tensor([0, 15, 30, 45, 60], dtype=torch.int32)  # 4 sequences > 3
    with pytest.raises(backends.Unsupported, match="4 sequences in one call"):
        flash_attention_varlen(q, k, v, many, 15, backend="triton")
    long = torch.tensor([0, 60], dtype=torch.int32)  # 60 tokens: 4 blocks of 16 (the interpreter's smallest) > 3
    with pytest.raises(backends.Unsupported, match="a sequence of 60 tokens"):
        flash_attention_varlen(q, k, v, long, 60, backend="triton")
    flash_attention_varlen(q[:48], k[:48], v[:48], long.clamp(max=48), 48, backend="triton")  # 3 blocks: runs
    monkeypatch.setattr(backends, "auto_order", lambda op, device: ["triton", "reference"])
    got = flash_attention_varlen(q, k, v, many, 15, backend="auto")
    assert torch.equal(got, flash_attention_varlen(q, k, v, many, 15, backend="reference"))


def test_no_configuration_has_a_grid_block_below_min_block():
    """unsupported_reason skips the config lookups when max_seqlen fits MIN_BLOCK-sized blocks: that needs every
    configuration's grid blocks (forward and dQ query blocks, dK/dV key blocks) at least that large."""
    from fastsft import card_table
    from fastsft.triton_kernels import flash_attention as fa_kernels

    configs = [(kernel, cfg) for (kernel, _), cfg in [*fa_kernels._DEFAULTS.items(), *fa_kernels._FLOAT32.items()]]
    configs += list(fa_kernels._INTERPRETER.items())
    configs += [(key.split("/")[0], cfg) for entry in card_table.table().values()
                for key, cfg in entry.get("attention_kernels", {}).items()]
    for kernel, cfg in configs:
        assert cfg["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"] >= fa_kernels.MIN_BLOCK, (kernel, cfg)


def test_cu_seqlens_changed_in_place_is_checked_again():
    """Layers share one cu_seqlens, so a tensor checked once is not checked again, unless it changed since."""
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    flash_attention_varlen(q, k, v, cu, 4, backend="reference")
    flash_attention_varlen(q, k, v, cu, 4, backend="reference")  # the cached pass
    cu[1] = 5  # still from 0 to 7, but lengths 5 and 2 now exceed max_seqlen 4
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attention_varlen(q, k, v, cu, 4, backend="reference")


def _op_args(device, dtype=torch.float32, d=64):
    lengths = [1, 20, 9]
    q, k, v, cu, m = make_inputs(lengths, 4, 2, d, dtype, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    return q, k, v, cu, m


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_ops(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels import flash_attention  # registers the ops

    q, k, v, cu, m = _op_args(device)
    fwd_config, dq_config, dkdv_config = (flash_attention.config_args(flash_attention.kernel_config(
        kernel, q.shape[-1], q.device, q.element_size(), m)) for kernel in ("fwd", "dq", "dkdv"))
    fwd_args = (q, k, v, cu, m, 0.125, True, 5, 3.0, fwd_config)
    opcheck_triton(torch.ops.fastsft.flash_attn_varlen_fwd_triton.default, fwd_args)
    out, lse = torch.ops.fastsft.flash_attn_varlen_fwd_triton(*fwd_args)
    dout = torch.randn_like(out)
    opcheck_triton(torch.ops.fastsft.flash_attn_varlen_bwd_triton.default,
            (dout, q, k, v, out, lse, cu, m, 0.125, True, 5, 3.0, dq_config, dkdv_config))


@pytest.mark.parametrize("device,backend", CASES)
def test_traceable_by_torch_compile(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("Triton's CPU interpreter cannot run on traced tensors; the GPU run covers this case")
    q, k, v, cu, m = _op_args(device)
    expected = flash_attention_varlen(q, k, v, cu, m, backend=backend)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def f(q, k, v, cu):
        return flash_attention_varlen(q, k, v, cu, m, backend=backend)

    torch._dynamo.reset()
    assert_close(f(q, k, v, cu), expected, rtol=1e-6, name="compiled")


# --- GPU: the sizes that matter ------------------------------------------------------------------------------

def same_dtype_baseline(q, k, v, cu, **kw):
    """What eager attention does in the input dtype (:func:`helpers.eager_attention`), forward and q/k/v
    gradients of the same upstream gradient as :func:`run`."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = eager_attention(q, k, v, cu, **kw)
    upstream = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64, device=out.device).view_as(out)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, q.grad, k.grad, v.grad


def check_gpu(q, k, v, cu, max_seqlen, *, factor=2.0, **kw):
    got = run("triton", q, k, v, cu, max_seqlen, **kw)
    want = reference_of(q, k, v, cu, max_seqlen, **kw)
    base = same_dtype_baseline(q, k, v, cu, **kw)
    for name, g, w, b in zip(("out", "dq", "dk", "dv"), got, want, base):
        assert_close_to_baseline(g, w, b, factor=factor, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_gpu_packed_8k(dtype, d, poisoned):
    lengths = random_lengths(8192, 100 + d, max_len=2000)
    q, k, v, cu, m = make_inputs(lengths, 8, 2, d, dtype, "cuda")
    check_gpu(q, k, v, cu, m)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 1), (32, 8)])
@pytest.mark.parametrize("opts", [{"window": 300}, {"softcap": 30.0}, {"softcap": 20.0, "window": 1000,
                                                                       "softmax_scale": 0.05}],
                         ids=["window", "softcap", "both"])
def test_gpu_gqa_window_softcap_bf16(hq, hkv, opts, poisoned):
    lengths = random_lengths(4096, 7, max_len=1500)
    q, k, v, cu, m = make_inputs(lengths, hq, hkv, 128, torch.bfloat16, "cuda")
    check_gpu(q, k, v, cu, m, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dense_8k(d, poisoned):
    q, k, v, cu, m = make_inputs([8192], 4, 1, d, torch.bfloat16, "cuda")
    check_gpu(q, k, v, cu, m)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_gpu_float32_and_odd_lengths(d, poisoned):
    lengths = [1, 127, 129, 1, 1025, 97, 64, 63]
    q, k, v, cu, m = make_inputs(lengths, 4, 2, d, torch.float32, "cuda")
    check("triton", q, k, v, cu, m, rtol=1e-5, window=100)
    check("triton", q, k, v, cu, m, rtol=1e-5, softcap=10.0)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_bf16():
    q, k, v, cu, m = make_inputs(random_lengths(8192, 3, max_len=2000), 32, 8, 128, torch.bfloat16, "cuda")
    first = run("triton", q, k, v, cu, m)
    second = run("triton", q, k, v, cu, m)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_kernel_config_is_the_tuned_entry_or_the_default(monkeypatch):
    """The launch configuration on a CUDA card is the card table's entry for (kernel, head dim, dtype width, row
    kind) where it has one, else the kernels' default; worked out once per case by the op's launch (the plan's),
    which the kernels take as arguments. No GPU needed: the card is named."""
    from fastsft import card_table
    from fastsft.ops.attention import KernelLaunch
    from fastsft.triton_kernels import flash_attention as fa

    card = "NVIDIA H200"
    monkeypatch.setattr(card_table, "card_of", lambda device: card if device.type == "cuda" else None)
    tuned = card_table.table()[card]["attention_kernels"]
    assert tuned, "the H200 entry lists tuned attention kernels"
    launch = KernelLaunch(torch.device("cuda", 0))
    asked = []
    real = fa.kernel_config
    monkeypatch.setattr(fa, "kernel_config", lambda *a: asked.append(a) or real(*a))
    for head_dim in (64, 96, 128, 256):
        for element_size in (2, 4):
            for max_seqlen in (2048, fa.LONG_SEQLEN + 1):
                got = launch.configs(head_dim, element_size, max_seqlen)
                for kernel, args in zip(("fwd", "dq", "dkdv"), got):
                    entry = tuned.get(fa.table_key(kernel, head_dim, element_size, max_seqlen))
                    want = dict(entry) if entry is not None else fa.default_config(kernel, head_dim, element_size)
                    assert fa.config_of(args) == dict(want, tma=bool(want.get("tma"))), (kernel, head_dim)
                assert launch.configs(head_dim, element_size, max_seqlen) is got  # once per case
    assert len(asked) == 4 * 2 * 2 * 3
    assert "(tuned)" in launch.describe(128)


def test_head_dim_past_the_triton_limit_falls_back_in_auto(monkeypatch):
    """Head dims over 256 are ``Unsupported`` by the triton backend: ``auto`` runs the reference for that call (a
    ValueError there propagated instead), an explicit request still raises."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on the CPU")
    monkeypatch.setattr(backends, "_broken", {})
    q = torch.randn(5, 1, 264)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(backends.Unsupported, match="head dims up to 256"):
        flash_attention_varlen(q, q, q, cu, 3, backend="triton")
    monkeypatch.setattr(backends, "auto_order", lambda op, device: ["triton", "reference"])
    got = flash_attention_varlen(q, q, q, cu, 3, backend="auto")
    assert torch.equal(got, flash_attention_varlen(q, q, q, cu, 3, backend="reference"))
    assert backends.fallbacks() == {}


def test_triton_double_backward_raises_clearly():
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on the CPU")
    q = torch.randn(5, 1, 16, requires_grad=True)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = flash_attention_varlen(q, q, q, cu, 3, backend="triton")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
