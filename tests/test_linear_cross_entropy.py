"""fastsft.ops.linear_cross_entropy: every backend against the float64 reference, forward and backward."""

import importlib
import warnings

import pytest
import torch

from fastsft import backends
from fastsft.ops import linear_cross_entropy
from fastsft.reference import linear_cross_entropy as ref
from helpers import DEVICES, assert_close, assert_close_to_baseline, backend_params, opcheck, opcheck_triton

OP = "linear_cross_entropy"
lce_module = importlib.import_module("fastsft.ops.linear_cross_entropy")  # the package exports a function of that name
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def make_inputs(T, H, V, dtype, device, *, ignore_frac=0.25, weight_grad=False, bias=False, hidden_scale=1.0):
    hidden = (torch.randn(T, H, dtype=torch.float64) * hidden_scale).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (T,), device=device)
    labels[torch.rand(T, device=device) < ignore_frac] = -100
    b = (torch.randn(V, dtype=torch.float64) * 0.1).to(device=device, dtype=dtype) if bias else None
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    if b is not None:
        b.requires_grad_(True)
    return hidden, weight, labels, b


def run(fn_backend, hidden, weight, labels, bias=None, **kw):
    """Loss and gradients (hidden, weight, bias) of one call; the upstream gradient is random for 'none'."""
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, backend=fn_backend, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    upstream = torch.ones_like(loss) if loss.dim() == 0 else torch.linspace(0.5, 1.5, loss.numel(),
                                                                             device=loss.device).view_as(loss)
    (loss * upstream).sum().backward()
    grads = [t.grad.clone() for t in leaves]
    return out, grads


def reference_of(hidden, weight, labels, bias=None, **kw):
    """The same call on the reference backend in float64."""
    h = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    b = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    return run("reference", h, w, labels, b, **kw)


def unfused_baseline(hidden, weight, labels, bias=None, **kw):
    """What transformers does: logits in the input dtype, upcast, cross-entropy in float32 (the baseline whose
    error sets the tolerance for low-precision inputs)."""
    h = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    b = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    softcap, scale = kw.get("softcap"), kw.get("logit_scale")
    z = torch.nn.functional.linear(h, w, b).float()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.nn.functional.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    loss = loss / (labels != -100).sum().clamp(min=1)
    loss.backward()
    return loss, [t.grad for t in (h, w, b) if t is not None and t.requires_grad]


def check_against_reference(backend, hidden, weight, labels, bias=None, *, rtol, **kw):
    (out, grads) = run(backend, hidden, weight, labels, bias, **kw)
    (ref_out, ref_grads) = reference_of(hidden, weight, labels, bias, **kw)
    loss, ref_loss = (out[0], ref_out[0]) if isinstance(out, tuple) else (out, ref_out)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, rtol=rtol, atol=1e-6, name="loss")
    for name, g, rg in zip(("grad hidden", "grad weight", "grad bias"), grads, ref_grads):
        assert g.dtype == hidden.dtype
        assert_close(g, rg, rtol=rtol, atol=1e-7, name=name)
    return out, ref_out


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_odd_sizes(device, backend, reduction):
    hidden, weight, labels, bias = make_inputs(37, 96, 1000, torch.float32, device, weight_grad=True, bias=True)
    check_against_reference(backend, hidden, weight, labels, bias, rtol=2e-5, reduction=reduction,
                            chunk_size=16)  # 37 tokens in chunks of 16: a ragged last chunk


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("softcap,logit_scale", [(30.0, None), (None, 0.125), (5.0, 3.0)])
def test_softcap_and_scale(device, backend, softcap, logit_scale):
    hidden, weight, labels, _ = make_inputs(29, 64, 777, torch.float32, device, weight_grad=True,
                                            hidden_scale=8.0)  # large logits so the cap bites
    check_against_reference(backend, hidden, weight, labels, rtol=2e-5, softcap=softcap,
                            logit_scale=logit_scale, chunk_size=8)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_against_unfused_baseline(device, backend, dtype):
    if device == "cpu" and backend == "reference" and dtype == torch.float16:
        pass  # the reference upcasts, so it is exact up to float32: still checked below
    hidden, weight, labels, _ = make_inputs(64, 128, 3001, dtype, device)
    out, grads = run(backend, hidden, weight, labels, chunk_size=32)
    ref_out, ref_grads = reference_of(hidden, weight, labels)
    base_out, base_grads = unfused_baseline(hidden, weight, labels)
    assert_close_to_baseline(out, ref_out, base_out, factor=2.0, floor=1e-4, name="loss")
    assert_close_to_baseline(grads[0], ref_grads[0], base_grads[0], factor=2.0, floor=1e-3, name="grad hidden")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("vocab", [128_256, 256_000])
def test_large_vocabularies(device, backend, vocab):
    hidden, weight, labels, _ = make_inputs(5, 32, vocab, torch.float32, device, ignore_frac=0.0)
    labels[0] = vocab - 1  # the last id, at the end of the last block
    check_against_reference(backend, hidden, weight, labels, rtol=2e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_token_stats(device, backend):
    hidden, weight, labels, _ = make_inputs(33, 48, 500, torch.float32, device, hidden_scale=4.0)
    # make some labels the argmax, so accuracy is neither 0 nor 1
    with torch.no_grad():
        top = (hidden.double() @ weight.double().T).argmax(-1)
    labels[::3] = top[::3]
    labels[1] = -100
    loss, stats = linear_cross_entropy(hidden, weight, labels, backend=backend, return_token_stats=True,
                                       chunk_size=8)
    _, ref_logprobs, ref_entropy, ref_is_argmax = ref.linear_cross_entropy(hidden.double(), weight.double(), labels)
    assert stats.logprobs.shape == labels.shape and not stats.logprobs.requires_grad
    assert_close(stats.logprobs, ref_logprobs, rtol=2e-5, name="logprobs")
    assert_close(stats.entropy, ref_entropy, rtol=2e-5, name="entropy")
    assert torch.equal(stats.is_argmax, ref_is_argmax)
    assert 0 < stats.is_argmax.sum() < (labels != -100).sum()
    assert not stats.is_argmax[1]


@pytest.mark.parametrize("device,backend", CASES)
def test_all_labels_ignored_gives_zero_not_nan(device, backend):
    hidden, weight, labels, _ = make_inputs(9, 16, 50, torch.float32, device, weight_grad=True)
    labels.fill_(-100)
    (loss, grads) = run(backend, hidden, weight, labels)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_and_batched_inputs(device, backend):
    base = torch.randn(24, 2, 40, device=device)
    hidden = base.transpose(0, 1).detach().requires_grad_(True)  # [2, 24, 40], non-contiguous
    weight = torch.randn(40, 301, device=device).t()  # [301, 40], non-contiguous
    labels = torch.randint(0, 301, (2, 24), device=device)
    labels[:, :3] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    out, grads = run(backend, hidden, weight, labels, reduction="none", chunk_size=16)
    ref_out, ref_grads = reference_of(hidden, weight, labels, reduction="none")
    assert out.shape == labels.shape
    assert_close(out, ref_out, rtol=2e-5, name="per-token loss")
    assert_close(grads[0], ref_grads[0], rtol=2e-5, name="grad hidden")


@pytest.mark.parametrize("device,backend", CASES)
def test_gradient_accumulation_matches_full_batch(device, backend):
    """Four micro-batches divided by num_items_in_batch sum to the full batch's mean loss and gradient."""
    hidden, weight, labels, _ = make_inputs(40, 32, 211, torch.float32, device)
    full, (full_grad,) = run(backend, hidden, weight, labels)
    n_items = (labels != -100).sum()
    total, grad = 0.0, torch.zeros_like(hidden)
    for part in range(4):
        sl = slice(10 * part, 10 * (part + 1))
        h = hidden.detach()[sl].clone().requires_grad_(True)
        loss = linear_cross_entropy(h, weight, labels[sl], num_items_in_batch=n_items, backend=backend)
        loss.backward()
        total += loss.item()
        grad[sl] = h.grad
    assert abs(total - full.item()) <= 1e-5 * abs(full.item())
    assert_close(grad, full_grad, rtol=1e-5, name="accumulated grad")


@pytest.mark.parametrize("device,backend", CASES)
def test_frozen_weight_gets_no_gradient_and_no_grad_mode(device, backend):
    hidden, weight, labels, _ = make_inputs(12, 16, 64, torch.float32, device)
    loss = linear_cross_entropy(hidden, weight, labels, backend=backend)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert not again.requires_grad
    assert abs(again.item() - loss.item()) <= 1e-6 * abs(loss.item())


def test_bad_input_is_rejected_clearly(monkeypatch):
    h, w, labels, _ = make_inputs(6, 8, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(h, w, labels[:5])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :7], labels)
    with pytest.raises(TypeError, match="share a floating dtype"):
        linear_cross_entropy(h, w.half(), labels)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(h, w, torch.full((6,), 20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(h, w, torch.full((6,), -5))
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(h, w.to("meta"), labels)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        linear_cross_entropy(h, w, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="unknown backend"):
        linear_cross_entropy(h, w, labels, backend="nope")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="Triton kernels run on CUDA"):
        linear_cross_entropy(h, w, labels, backend="triton")
    if backends.unavailable_reason(OP, "cuda", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float64"):
            linear_cross_entropy(h.double(), w.double(), labels, backend="cuda")


def test_default_chunk_size_keeps_logits_under_budget():
    assert lce_module.default_chunk_size(16384, 128_256, 2) == 512  # 125 MiB of bf16 logits
    assert lce_module.default_chunk_size(16384, 256_000, 2) == 256
    assert lce_module.default_chunk_size(37, 1000, 4) == 37
    # a trainable 8B head: the float32 gradient is 2 GiB, so chunks of 2048 tokens (500 MiB of logits)
    assert lce_module.default_chunk_size(16384, 128_256, 2, 4 * 128_256 * 4096) == 2048
    for vocab in (1000, 32_000, 128_256, 256_000):
        rows = lce_module.default_chunk_size(1 << 20, vocab, 2)
        assert rows * vocab * 2 <= lce_module._CHUNK_BYTES or rows == 16


# --- the row kernels as torch.library ops -----------------------------------------------------------------

def _rows_args(device, rows=6, vocab=70, per_row_scale=True):
    logits = torch.randn(rows, vocab, device=device)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[0] = -100
    scale = torch.rand(rows if per_row_scale else 1, device=device) + 0.5
    return (logits, labels, scale, 1.0, 0.0, -100, True, True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_compiled_rows(device):
    reason = backends.unavailable_reason(OP, "cuda", torch.device(device))
    if reason:
        pytest.skip(reason)
    opcheck(torch.ops.fastsft.cross_entropy_rows.default, _rows_args(device))
    opcheck(torch.ops.fastsft.cross_entropy_rows.default, _rows_args(device, per_row_scale=False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_rows(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels.cross_entropy import cross_entropy_rows  # noqa: F401 (registers the op)

    opcheck_triton(torch.ops.fastsft.cross_entropy_rows_triton.default, _rows_args(device))


@pytest.mark.parametrize("device,backend", CASES)
def test_traceable_by_torch_compile(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("Triton's CPU interpreter cannot run on traced tensors; the GPU run covers this case")
    hidden, weight, labels, _ = make_inputs(16, 32, 100, torch.float32, device)
    expected = linear_cross_entropy(hidden, weight, labels, backend=backend)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def f(h, w, y):
        return linear_cross_entropy(h, w, y, backend=backend)

    torch._dynamo.reset()
    got = f(hidden, weight, labels)
    assert abs(got.item() - expected.item()) <= 1e-6 * abs(expected.item())


# --- GPU: the sizes that matter ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_head(backend, dtype):
    hidden, weight, labels, _ = make_inputs(1024, 4096, 128_256, dtype, "cuda", hidden_scale=1.0)
    out, grads = run(backend, hidden, weight, labels)
    base_out, base_grads = unfused_baseline(hidden, weight, labels)
    ref_out, ref_grads = reference_of(hidden, weight, labels)
    assert_close_to_baseline(out, ref_out, base_out, factor=2.0, floor=1e-4, name="loss")
    assert_close_to_baseline(grads[0], ref_grads[0], base_grads[0], factor=2.0, floor=1e-3, name="grad hidden")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_trainable_weight_bf16(backend):
    hidden, weight, labels, _ = make_inputs(512, 1024, 32_000, torch.bfloat16, "cuda", weight_grad=True)
    out, grads = run(backend, hidden, weight, labels, chunk_size=128)
    base_out, base_grads = unfused_baseline(hidden, weight, labels)
    ref_out, ref_grads = reference_of(hidden, weight, labels)
    assert_close_to_baseline(grads[1], ref_grads[1], base_grads[1], factor=2.0, floor=1e-3, name="grad weight")


@pytest.mark.gpu
def test_gpu_64bit_indexing():
    """A chunk whose logits pass 2**31 elements: offsets must be 64-bit in both kernels."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    vocab, tokens = 256_000, 8400  # 2.15e9 logits in one chunk
    hidden, weight, labels, _ = make_inputs(tokens, 64, vocab, torch.bfloat16, "cuda", ignore_frac=0.0)
    labels[-1] = vocab - 1
    for backend in ("cuda", "triton"):
        out = linear_cross_entropy(hidden.detach(), weight, labels, reduction="none", backend=backend,
                                   chunk_size=tokens)
        tail = linear_cross_entropy(hidden.detach()[-4:], weight, labels[-4:], reduction="none",
                                    backend="reference")
        assert_close(out[-4:], tail, rtol=2e-2, name=f"{backend} last rows")


def test_fallback_warns_once_and_gives_the_same_answer(monkeypatch):
    """A backend that fails to launch in auto mode is skipped with one warning; explicit requests raise."""
    device = torch.device("cpu")
    order = backends.auto_order(OP, device)
    first = next(b for b in order if backends.unavailable_reason(OP, b, device) is None)
    if first == "reference":
        pytest.skip("only the reference backend can run here")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setitem(backends._ops[OP].impls, first, broken)
    monkeypatch.setattr(backends, "_broken", {})
    h, w, labels, _ = make_inputs(8, 16, 40, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="simulated launch failure"):
        a = linear_cross_entropy(h, w, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = linear_cross_entropy(h, w, labels)  # no second warning
    expected = linear_cross_entropy(h, w, labels, backend="reference")
    assert abs(a.item() - expected.item()) < 1e-5 and abs(b.item() - expected.item()) < 1e-5
    with pytest.raises(backends.BackendUnavailable, match="failed earlier"):
        linear_cross_entropy(h, w, labels, backend=first)


def test_env_var_forces_a_backend(monkeypatch):
    seen = []
    original = backends._ops[OP].impls["reference"]

    def spy(*args, **kwargs):
        seen.append("reference")
        return original(*args, **kwargs)

    monkeypatch.setitem(backends._ops[OP].impls, "reference", spy)
    monkeypatch.setenv("FASTSFT_BACKEND_LINEAR_CROSS_ENTROPY", "reference")
    h, w, labels, _ = make_inputs(4, 8, 10, torch.float32, "cpu")
    linear_cross_entropy(h, w, labels)
    assert seen == ["reference"]
    monkeypatch.setenv("FASTSFT_BACKEND_LINEAR_CROSS_ENTROPY", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        linear_cross_entropy(h, w, labels)


def test_degenerate_call_raises_and_leaves_the_backend_usable(monkeypatch):
    """A 0-row weight (no vocabulary) is the caller's error: a clear ValueError before any backend runs, and the
    fast backend stays in use for later calls instead of being marked broken for the process."""
    if backends.unavailable_reason(OP, "triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on the CPU")
    monkeypatch.setattr(backends, "_broken", {})
    monkeypatch.setattr(backends, "auto_order", lambda op, device: ["triton", "reference"])
    ran = []
    for name in ("triton", "reference"):
        impl = backends._ops[OP].impls[name]
        monkeypatch.setitem(backends._ops[OP].impls, name,
                            lambda *a, _impl=impl, _name=name, **kw: ran.append(_name) or _impl(*a, **kw))
    h = torch.randn(4, 8, requires_grad=True)
    labels = torch.full((4,), -100)
    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(h, torch.empty(0, 8), labels)
    assert backends.fallbacks() == {} and ran == []
    _, w, labels, _ = make_inputs(4, 8, 10, torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = linear_cross_entropy(h, w, labels)
    assert ran == ["triton"] and backends.fallbacks() == {}
    expected = linear_cross_entropy(h, w, labels, backend="reference")
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


@pytest.mark.parametrize("bad", [-3, 2.5, float("nan"), float("inf"), torch.tensor(-1), torch.tensor(2.5),
                                 torch.tensor([3, 4])],
                         ids=["neg", "frac", "nan", "inf", "tneg", "tfrac", "t2elem"])
def test_num_items_in_batch_must_be_a_count(bad):
    """transformers passes the count of labelled tokens (an int64 tensor): negative or fractional values are an
    error, not silently taken as 1."""
    h, w, labels, _ = make_inputs(6, 8, 20, torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError), match="num_items_in_batch"):
        linear_cross_entropy(h, w, labels, num_items_in_batch=bad)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("zero", [0, torch.tensor(0)], ids=["int", "tensor"])
def test_no_labelled_token_in_the_whole_batch_gives_zero(device, backend, zero):
    """num_items_in_batch 0 (a whole accumulated batch without labels: a trainer passes it) is a loss of 0 with zero
    gradients, as a mean over no labelled token is; it must not stop training."""
    h, w, labels, _ = make_inputs(6, 8, 20, torch.float32, device)
    h.requires_grad_(True)
    labels = torch.full_like(labels, -100)
    loss = linear_cross_entropy(h, w, labels, num_items_in_batch=zero, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_num_items_in_batch_takes_whole_numbers():
    h, w, labels, _ = make_inputs(6, 8, 20, torch.float32, "cpu")
    expected = linear_cross_entropy(h, w, labels, reduction="sum", backend="reference") / 7
    for n in (7, 7.0, torch.tensor(7), torch.tensor(7.0), torch.tensor([7], dtype=torch.int32)):
        got = linear_cross_entropy(h, w, labels, num_items_in_batch=n)
        assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item()), n


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "reference"])
def test_double_backward_raises_clearly(device, backend):
    h, w, labels, _ = make_inputs(6, 8, 20, torch.float32, device)
    loss = linear_cross_entropy(h, w, labels, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
