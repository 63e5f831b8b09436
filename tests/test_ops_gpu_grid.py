"""Liger-Kernel's op-test grids on fastsft's ops: every CUDA-capable backend, forward and backward, on a GPU.

The shapes, dtypes and options are those of Liger-Kernel's ``test/transformers/test_rms_norm.py``, ``test_rope.py``,
``test_swiglu.py``, ``test_geglu.py`` and ``test_fused_linear_cross_entropy.py`` (their odd sizes included), limited
to the options fastsft's ops have. Where Liger compares against a same-dtype model implementation with loose
per-dtype ``atol``/``rtol``, these tests compare each backend with the float64 reference (``backend="reference"`` on
upcast inputs) and require its error to be at most twice that of a same-dtype PyTorch baseline, plus a small floor
per dtype. Every buffer PyTorch allocates uninitialized starts as NaN (``poisoned``), so an element a kernel forgets
to write fails the test instead of passing by luck.

All tests are ``@pytest.mark.gpu`` and ``@pytest.mark.grid`` (``scripts/gpu_check.sh``'s ``test-grid`` stage; the
quick GPU cases of each op are in its own test file). ``FASTSFT_GRID_DEVICE=cpu`` runs the same test code on the
CPU (Triton in its interpreter, the ``cuda`` backend as the extension's C++ kernels), float32 and small cases only:
a check of the tests themselves, not of the kernels' GPU code.
"""

import math
import os
import warnings

import pytest
import torch

from fastsft import backends
from fastsft.ops import geglu, linear_cross_entropy, rms_norm, rope, swiglu
from helpers import assert_close_to_baseline

DEVICE = os.environ.get("FASTSFT_GRID_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
# conftest skips gpu-marked tests without a GPU; the CPU override must not be skipped
pytestmark = [] if ON_CPU else [pytest.mark.gpu, pytest.mark.grid]
# the interpreter is slow and computes bf16 dots wrongly: on the CPU only float32 and small cases run
CPU_MAX_ELEMENTS = 1 << 15

# floors of the baseline-relative tolerance (norm-wise relative error): float32 kernels differ from the float32
# baseline only by summation order and approximate transcendentals; half precision by one rounding more or less
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
LOSS_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def fast_backends(op):
    """pytest params for every backend of ``op`` that runs on CUDA (all but the reference)."""
    return [pytest.param(b, id=b) for b in backends.registered(op) if b != "reference"]


def skip_unless_runnable(op, backend, dtype, elements):
    """On the CPU override: skip what the interpreter cannot check (bf16/fp16, large cases, a missing extension).
    On a GPU nothing is skipped: an unavailable backend fails the test."""
    if not ON_CPU:
        return
    if dtype != F32:
        pytest.skip("CPU check of the test code: float32 only (the interpreter's bf16 dot is wrong)")
    if elements > CPU_MAX_ELEMENTS:
        pytest.skip(f"CPU check of the test code: {elements} elements is too slow in the interpreter")
    reason = backends.unavailable_reason(op, backend, torch.device(DEVICE))
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def poisoned():
    """Uninitialized allocations (``torch.empty``, ``empty_like``, ``new_empty``, in Python, the extension and the
    Triton launchers alike) are filled with NaN (integers with their largest value): PyTorch does this while
    deterministic algorithms are on. ``warn_only``: the ops that have no deterministic implementation (cuBLAS
    without a fixed workspace config) only warn, and those warnings are silenced here."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*determinis.*")
        yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def randn(*shape, dtype, scale=1.0, grad=False):
    """Random values drawn in float64 on the CPU (the same numbers for every dtype), then cast and moved."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def as_double(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def as_is(t):
    """A fresh leaf with the same values and requires_grad (each run gets its own gradients)."""
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


def outputs_and_grads(fn, leaves, upstream):
    """``fn()``'s outputs and the gradients of ``sum(out * upstream)`` (float64) w.r.t. the leaves that require
    grad."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return outs, torch.autograd.grad(total, wanted)


def check_all(names, got, want, base, dtype, floors=None):
    """Each of ``got`` against the float64 ``want`` within twice the error of the same-dtype ``base``."""
    assert len(got) == len(want) == len(base) == len(names)
    for i, (name, g, w, b) in enumerate(zip(names, got, want, base)):
        floor = (floors or {}).get(name, FLOOR[dtype])
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert_close_to_baseline(g, w, b, factor=2.0, floor=floor, name=name)


# --- RMSNorm: Liger's test_rms_norm.py ----------------------------------------------------------------------------
# (bs, sl, hd) of Liger's test_correctness and test_correctness_functional, and the odd ones of its earlier grid;
# float32 and bfloat16; its Llama (offset 0) and Gemma (offset 1, ``1 + w``) modes. The weight always trains, as
# Liger's module does. fastsft's fused residual add has no Liger counterpart: a few of the shapes take it too.

RMS_SHAPES = [(2, 128, 512), (5, 123, 123), (2, 2, 8), (9, 7, 41), (4, 256, 1024), (3, 423, 213)]
RMS_EPS = 1e-6


def _rms_case(backend, bs, sl, hd, dtype, offset, residual, weight_grad=True):
    skip_unless_runnable("rms_norm", backend, dtype, bs * sl * hd)
    x = randn(bs, sl, hd, dtype=dtype, grad=True)
    w = (torch.randn(hd, dtype=torch.float64) * 0.1 + (1.0 - offset)).to(device=DEVICE, dtype=dtype)
    w.requires_grad_(weight_grad)
    r = randn(bs, sl, hd, dtype=dtype, grad=True) if residual else None
    upstream = [torch.randn(bs, sl, hd, dtype=torch.float64, device=DEVICE) for _ in range(1 + residual)]

    def call(be, x_, w_, r_):
        return lambda: rms_norm(x_, w_, RMS_EPS, offset=offset, residual=r_, backend=be)

    results = []
    for be, cast in ((backend, as_is), ("reference", as_double), ("reference", as_is)):
        leaves = [cast(t) for t in (x, w, r)]
        results.append(outputs_and_grads(call(be, *leaves), leaves, upstream))
    (outs, grads), (ref_outs, ref_grads), (base_outs, base_grads) = results
    for o in outs:
        assert o.dtype == dtype and o.shape == x.shape
    names = ["y", "x + residual"][:len(outs)] + ["grad x"] + ["grad weight"] * weight_grad
    names += ["grad residual"] * residual
    check_all(names, (*outs, *grads), (*ref_outs, *ref_grads), (*base_outs, *base_grads), dtype)


@pytest.mark.parametrize("backend", fast_backends("rms_norm"))
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bs,sl,hd", RMS_SHAPES)
def test_rms_norm(backend, bs, sl, hd, dtype, offset):
    _rms_case(backend, bs, sl, hd, dtype, offset, residual=False)


@pytest.mark.parametrize("backend", fast_backends("rms_norm"))
@pytest.mark.parametrize("offset,weight_grad", [(0.0, True), (1.0, False)], ids=["llama", "gemma-frozen-weight"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bs,sl,hd", [(5, 123, 123), (9, 7, 41)])
def test_rms_norm_fused_residual(backend, bs, sl, hd, dtype, offset, weight_grad):
    _rms_case(backend, bs, sl, hd, dtype, offset, residual=True, weight_grad=weight_grad)


# --- RoPE: Liger's test_rope.py -------------------------------------------------------------------------------------
# (bsz, seq_len, num_q_heads, num_kv_heads, head_dim) of its test_correctness (q and k as transformers leaves them:
# [B, S, H, D] storage seen as [B, H, S, D]; more k heads than q heads in the weird shapes) and of its
# test_functional_correctness (contiguous); expand_position_ids as cos/sin for every batch row or one shared row.
# Liger's functional head dim 41 is odd, which rotate_half (and so fastsft's rope) does not take: 40 here.

ROPE_STRIDED = [(1, 128, 32, 32, 64), (2, 128, 32, 32, 64), (1, 128, 32, 8, 64), (2, 128, 32, 8, 64),
                (3, 423, 73, 213, 92), (3, 423, 73, 155, 92)]
ROPE_CONTIGUOUS = [(1, 2, 2, 2, 8), (1, 2, 1, 2, 8), (9, 7, 41, 41, 40)]
ROPE_CASES = ([pytest.param(*s, True, id="strided-" + "-".join(map(str, s))) for s in ROPE_STRIDED]
              + [pytest.param(*s, False, id="contiguous-" + "-".join(map(str, s))) for s in ROPE_CONTIGUOUS])


def _rope_tables(cos_batch, S, D, dtype):
    """cos/sin as transformers' LlamaRotaryEmbedding builds them (both halves repeat), at positions 0..S-1."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None]
    angle = torch.cat((angle, angle), dim=-1).expand(cos_batch, S, D)
    return angle.cos().to(device=DEVICE, dtype=dtype), angle.sin().to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", fast_backends("rope"))
@pytest.mark.parametrize("expand_position_ids", [True, False], ids=["per-row-cos", "shared-cos"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bsz,seq_len,num_q_heads,num_kv_heads,head_dim,strided", ROPE_CASES)
def test_rope(backend, bsz, seq_len, num_q_heads, num_kv_heads, head_dim, strided, dtype, expand_position_ids):
    skip_unless_runnable("rope", backend, dtype, bsz * seq_len * (num_q_heads + num_kv_heads) * head_dim)

    def heads(h):
        if strided:
            return randn(bsz, seq_len, h, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
        return randn(bsz, h, seq_len, head_dim, dtype=dtype, grad=True)

    q, k = heads(num_q_heads), heads(num_kv_heads)
    assert q.is_contiguous() != strided
    cos, sin = _rope_tables(bsz if expand_position_ids else 1, seq_len, head_dim, dtype)
    upstream = [torch.randn(t.shape, dtype=torch.float64, device=DEVICE) for t in (q, k)]
    results = []
    for be, cast, tables in ((backend, as_is, (cos, sin)), ("reference", as_double, (cos.double(), sin.double())),
                             ("reference", as_is, (cos, sin))):
        leaves = [cast(q), cast(k)]
        results.append(outputs_and_grads(lambda: rope(*leaves, *tables, backend=be), leaves, upstream))
    (outs, grads), (ref_outs, ref_grads), (base_outs, base_grads) = results
    for o, t in zip(outs, (q, k)):
        assert o.dtype == dtype and o.shape == t.shape
    check_all(("q", "k", "grad q", "grad k"), (*outs, *grads), (*ref_outs, *ref_grads), (*base_outs, *base_grads),
              dtype)


# --- SwiGLU and GeGLU: Liger's test_swiglu.py and test_geglu.py -----------------------------------------------------
# The activation's input [bsz, seq_len, intermediate] of Liger's MLP tests ((2, 256, 256 -> 512), (6, 42, 123 -> 431)
# for SwiGLU; (2, 2048, 2048 -> 4096), (9, 41, 341 -> 4231) for GeGLU) and of its functional tests ((2, 8, 8) /
# (2, 2, 8), (9, 7, 41)), float32 and bfloat16; GeGLU in Liger's tanh form and fastsft's exact one too. Then the rows
# of Liger's wide-row GeGLU test (n_cols 8193 ... 16384) in float32, float16 and bfloat16, for every activation.

GATED = {"silu": lambda g, u, be: swiglu(g, u, backend=be),
         "gelu": lambda g, u, be: geglu(g, u, backend=be),
         "gelu_tanh": lambda g, u, be: geglu(g, u, "tanh", backend=be)}
GATED_CASES = ([pytest.param("silu", s, id=f"swiglu-{'x'.join(map(str, s))}")
                for s in [(2, 256, 512), (6, 42, 431), (2, 8, 8), (9, 7, 41)]]
               + [pytest.param(act, s, id=f"{act}-{'x'.join(map(str, s))}") for act in ("gelu_tanh", "gelu")
                  for s in [(2, 2048, 4096), (9, 41, 4231), (2, 2, 8), (9, 7, 41)]])
WIDE_ROWS = [(4, 8193), (4, 11009), (3, 14337), (4, 16384)]


def _gated_case(backend, activation, shape, dtype):
    skip_unless_runnable("gated_activation", backend, dtype, math.prod(shape))
    gate, up = randn(*shape, dtype=dtype, scale=3.0, grad=True), randn(*shape, dtype=dtype, grad=True)
    upstream = [torch.randn(shape, dtype=torch.float64, device=DEVICE)]
    fn = GATED[activation]
    results = []
    for be, cast in ((backend, as_is), ("reference", as_double), ("reference", as_is)):
        leaves = [cast(gate), cast(up)]
        results.append(outputs_and_grads(lambda: fn(*leaves, be), leaves, upstream))
    (outs, grads), (ref_outs, ref_grads), (base_outs, base_grads) = results
    assert outs[0].dtype == dtype and outs[0].shape == gate.shape
    check_all(("out", "grad gate", "grad up"), (*outs, *grads), (*ref_outs, *ref_grads), (*base_outs, *base_grads),
              dtype)


@pytest.mark.parametrize("backend", fast_backends("gated_activation"))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation,shape", GATED_CASES)
def test_gated_activation(backend, activation, shape, dtype):
    _gated_case(backend, activation, shape, dtype)


@pytest.mark.parametrize("backend", fast_backends("gated_activation"))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("activation", list(GATED))
@pytest.mark.parametrize("rows,cols", WIDE_ROWS)
def test_gated_activation_wide_rows(backend, rows, cols, activation, dtype):
    _gated_case(backend, activation, (rows, cols), dtype)


# --- Fused linear cross-entropy: Liger's test_fused_linear_cross_entropy.py -----------------------------------------
# (B, T, H, V) of its test_correctness ((8, 128, 1024, 4096), (4, 47, 31, 123)) with every reduction, float32 and
# bfloat16, with and without bias, and its two option sets: the defaults, and every non-default value once (here:
# ignore_index 42, softcap 30, and fastsft's logit_scale; fastsft has no class weights, label smoothing or z-loss).
# Then its functional shapes ((2, 2, 8, 8), (9, 7, 41, 41)) and its mixed-precision ones in float16. As in Liger the
# weight (torch.rand: every logit positive and large) and the bias train; some labels are ignore_index.

LCE_OPTIONS = {"defaults": dict(ignore_index=-100),
               "non-default": dict(ignore_index=42, softcap=30.0, logit_scale=0.5)}


def _lce_baseline(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", softcap=None,
                  logit_scale=None):
    """What transformers does: logits in the input dtype, upcast, then the cross-entropy in float32."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    losses = torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


def _lce_case(backend, B, T, H, V, dtype, reduction, bias, options):
    skip_unless_runnable("linear_cross_entropy", backend, dtype, B * T * V + V * H)
    tokens = B * T
    hidden = randn(tokens, H, dtype=dtype, grad=True)
    weight = torch.rand(V, H, dtype=torch.float64).to(device=DEVICE, dtype=dtype).requires_grad_()
    b = torch.rand(V, dtype=torch.float64).to(device=DEVICE, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (tokens,), device=DEVICE)
    ignored = torch.randperm(tokens)[:int(torch.randint(1, max(2, tokens // 2), (1,)))]
    labels[ignored.to(DEVICE)] = options["ignore_index"]
    # the per-token upstream gradient of reduction="none" is not uniform, so a token's weight matters
    upstream = [torch.ones((), dtype=torch.float64, device=DEVICE) if reduction != "none"
                else torch.linspace(0.5, 1.5, tokens, dtype=torch.float64, device=DEVICE)]

    def fused(be, leaves):
        return lambda: linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], reduction=reduction,
                                            backend=be, **options)

    results = []
    for fn, cast in ((lambda lv: fused(backend, lv), as_is), (lambda lv: fused("reference", lv), as_double),
                     (lambda lv: lambda: _lce_baseline(*lv[:2], labels, lv[2], reduction=reduction, **options),
                      as_is)):
        leaves = [cast(t) for t in (hidden, weight, b)]
        results.append(outputs_and_grads(fn(leaves), leaves, upstream))
    (outs, grads), (ref_outs, ref_grads), (base_outs, base_grads) = results
    assert outs[0].dtype == torch.float32 and outs[0].shape == ((tokens,) if reduction == "none" else ())
    for g, t in zip(grads, (hidden, weight, b)):
        assert g.dtype == dtype and g.shape == t.shape
    names = ("loss", "grad hidden", "grad weight", "grad bias")[:1 + len(grads)]
    check_all(names, (*outs, *grads), (*ref_outs, *ref_grads), (*base_outs, *base_grads), dtype,
              floors={"loss": LOSS_FLOOR[dtype]})


@pytest.mark.parametrize("backend", fast_backends("linear_cross_entropy"))
@pytest.mark.parametrize("options", list(LCE_OPTIONS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B,T,H,V", [(8, 128, 1024, 4096), (4, 47, 31, 123)])
def test_linear_cross_entropy(backend, B, T, H, V, dtype, reduction, bias, options):
    _lce_case(backend, B, T, H, V, dtype, reduction, bias, LCE_OPTIONS[options])


@pytest.mark.parametrize("backend", fast_backends("linear_cross_entropy"))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B,T,H,V", [(2, 2, 8, 8), (9, 7, 41, 41)])
def test_linear_cross_entropy_functional_shapes(backend, B, T, H, V, dtype, bias):
    # Liger's functional test: softcap 30 (its label smoothing and z-loss have no fastsft counterpart)
    _lce_case(backend, B, T, H, V, dtype, "mean", bias, dict(ignore_index=-100, softcap=30.0))


@pytest.mark.parametrize("backend", fast_backends("linear_cross_entropy"))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("B,T,H,V", [(8, 128, 1024, 4096), (4, 47, 31, 123)])
def test_linear_cross_entropy_float16(backend, B, T, H, V, bias):
    # Liger's test_amp casts to float16 under autocast; fastsft's op takes float16 inputs directly
    _lce_case(backend, B, T, H, V, F16, "mean", bias, dict(ignore_index=-100))
