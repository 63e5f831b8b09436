"""fastsft.backends: what counts as a backend failure, and what must pass through."""

import pytest
import torch
import torch.utils.checkpoint

from fastsft import backends

OP = "_test_op_for_backends"


@pytest.fixture
def op(monkeypatch):
    """A throwaway op with a 'cuda' backend (the first in auto order) that can be told to raise, and a reference."""
    monkeypatch.setattr(backends, "_ops", dict(backends._ops))
    monkeypatch.setattr(backends, "_broken", {})
    state = {"raise": None, "calls": []}

    def first(x):
        state["calls"].append("cuda")
        if state["raise"] is not None:
            raise state["raise"]
        return x * 2

    def fallback(x):
        state["calls"].append("reference")
        return x * 2

    backends.register(OP, "cuda")(first)
    backends.register(OP, "reference")(fallback)
    return state


def test_launch_failure_falls_back_once(op):
    op["raise"] = RuntimeError("simulated launch failure")
    x = torch.ones(2)
    with pytest.warns(RuntimeWarning, match="falling back to reference"):
        assert torch.equal(backends.dispatch(OP, "auto", x.device, x), x * 2)
    backends.dispatch(OP, "auto", x.device, x)
    assert op["calls"] == ["cuda", "reference", "reference"]  # marked broken after the first failure
    # and reported, for benchmarks to record beside their numbers
    assert backends.fallbacks() == {f"{OP}:cuda@cpu": "RuntimeError: simulated launch failure"}


def test_triton_is_unavailable_when_our_kernels_are_not_importable(monkeypatch):
    """A source tree on sys.path without installing: triton_kernels/ is not fastsft.triton_kernels there. Every
    Triton backend must then say so (reports, auto order), not fail at each op's first call."""
    import importlib.util

    assert backends._triton_kernels_missing() is None  # this test session runs an installed fastsft
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastsft.triton_kernels" else real(name, *a))
    missing = backends._triton_kernels_missing.__wrapped__()
    assert "pip install -e ." in missing
    monkeypatch.setattr(backends, "_triton_kernels_missing", lambda: missing)
    assert backends.triton_available(torch.device("cuda")) == missing
    assert backends.unavailable_reason("rms_norm", "triton", torch.device("cuda")) == missing


def test_unsupported_input_moves_on_quietly(op):
    """A backend that does not take this input (float64 on a kernel, say): the next one runs, no warning, and the
    backend stays usable for other inputs; an explicit request still raises."""
    import warnings

    op["raise"] = backends.Unsupported("float64 is not taken here")
    x = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(backends.dispatch(OP, "auto", x.device, x), x * 2)
    assert backends._broken == {} and op["calls"] == ["cuda", "reference"]
    with pytest.raises(backends.Unsupported):
        backends.dispatch(OP, "cuda", x.device, x)


def test_checkpoint_control_flow_is_not_a_failure(op):
    """Non-reentrant checkpointing raises from a saved-tensor hook to stop recomputing; seen on an H200 as a
    fused LoRA kernel 'failing' mid-recompute, falling back, and crashing checkpointing. It must pass through."""
    if not backends._CONTROL_FLOW:
        pytest.skip("this torch has no checkpoint stop exception")
    op["raise"] = backends._CONTROL_FLOW[0]()
    x = torch.ones(2)
    with pytest.raises(backends._CONTROL_FLOW[0]):
        backends.dispatch(OP, "auto", x.device, x)
    assert backends._broken == {} and op["calls"] == ["cuda"]


def test_ops_under_non_reentrant_checkpoint_give_the_same_gradients():
    """Every patched kernel runs inside checkpointed decoder layers: compare with the plain computation."""
    from fastsft.ops import linear_cross_entropy, rms_norm, swiglu

    torch.manual_seed(0)
    x = torch.randn(12, 16, requires_grad=True)
    w_norm, w_up, w_gate = torch.ones(16), torch.randn(32, 16), torch.randn(32, 16)
    head, labels = torch.randn(40, 16), torch.randint(0, 40, (12,))

    def layer(h):
        h = rms_norm(h, w_norm, 1e-6)
        return swiglu(h @ w_gate.T, h @ w_up.T) @ w_up

    def loss_of(h):
        return linear_cross_entropy(h, head, labels)

    plain = loss_of(layer(x))
    (g_plain,) = torch.autograd.grad(plain, x)
    checkpointed = loss_of(torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False))
    (g_ckpt,) = torch.autograd.grad(checkpointed, x)
    torch.testing.assert_close(g_ckpt, g_plain)


def test_a_resolved_op_runs_without_asking_again(monkeypatch):
    """What to run is decided when resolving (a model's plan resolves every op once, at patch time): calling the
    result asks neither the availability checks, nor the order, nor the environment again."""
    monkeypatch.setattr(backends, "_ops", dict(backends._ops))
    monkeypatch.setattr(backends, "_broken", {})
    asked, orders = [], []
    real_order = backends.auto_order
    monkeypatch.setattr(backends, "auto_order", lambda op, device: orders.append(device) or real_order(op, device))
    backends.register(OP, "cuda", available=lambda device: asked.append(device) or None)(lambda x: ("cuda", x))
    backends.register(OP, "reference")(lambda x: ("reference", x))
    cpu = torch.device("cpu")
    resolved = backends.resolve(OP, "auto", cpu)
    assert resolved.candidates == ["cuda", "reference"] and not resolved.explicit and str(resolved) == "cuda"
    assert len(asked) == 1 and len(orders) == 1
    monkeypatch.setenv(f"FASTSFT_BACKEND_{OP.upper()}", "reference")  # read when resolving, not per call
    for _ in range(3):
        assert backends.dispatch(OP, resolved, cpu, 1) == ("cuda", 1)
    assert len(asked) == 1 and len(orders) == 1
    assert backends.dispatch(OP, "auto", cpu, 1) == ("reference", 1)  # a direct call resolves every time
    assert backends.resolve(OP, "auto", cpu).explicit
    monkeypatch.delenv(f"FASTSFT_BACKEND_{OP.upper()}")


def test_direct_calls_on_a_cuda_device_reuse_the_resolution_until_a_backend_breaks(monkeypatch):
    """A direct op call resolves its backend= argument; on a CUDA device the answer (and the launch configuration
    it worked out) is kept: the kernel suite measured 1.4x slower small attention calls re-resolving every call."""
    monkeypatch.setattr(backends, "_ops", dict(backends._ops))
    monkeypatch.setattr(backends, "_broken", {})
    monkeypatch.setattr(backends, "_resolved_on_cuda", {})
    monkeypatch.setattr(backends.card_table, "card_of", lambda device: None)
    asked = []
    backends.register(OP, "cuda", available=lambda device: asked.append(device) or None)(lambda x: x)
    backends.register(OP, "reference")(lambda x: x)
    cuda = torch.device("cuda", 0)
    first = backends.resolve(OP, "auto", cuda)
    assert backends.resolve(OP, "auto", cuda) is first and len(asked) == 1
    monkeypatch.setenv(f"FASTSFT_BACKEND_{OP.upper()}", "reference")  # the request is read on every call
    assert backends.resolve(OP, "auto", cuda).candidates == ["reference"]
    monkeypatch.delenv(f"FASTSFT_BACKEND_{OP.upper()}")
    backends._broken[(OP, "cuda", "cuda")] = "RuntimeError: boom"
    assert backends.resolve(OP, "auto", cuda).candidates == ["reference"]
    backends._broken.clear()
    assert backends.resolve(OP, "auto", torch.device("cpu")) is not backends.resolve(OP, "auto", torch.device("cpu"))


def test_a_resolved_op_called_on_another_device_type_resolves_for_it_once(monkeypatch):
    """A model patched on one device and moved to another: its plan's entries resolve the same request for the
    new device type on first use, then keep that."""
    monkeypatch.setattr(backends, "_ops", dict(backends._ops))
    monkeypatch.setattr(backends, "_broken", {})
    asked = []
    backends.register(OP, "cuda", available=lambda device: asked.append(device.type) or
                      (None if device.type == "cpu" else "not on meta"))(lambda x: ("cuda", x))
    backends.register(OP, "reference")(lambda x: ("reference", x))
    resolved = backends.resolve(OP, "auto", torch.device("cpu"))
    meta = torch.device("meta")
    for _ in range(2):
        assert resolved(meta, 1) == ("reference", 1)
    assert asked == ["cpu", "meta"]
    assert resolved(torch.device("cpu"), 1) == ("cuda", 1)


def test_a_resolved_op_drops_a_broken_backend_with_one_warning(op):
    x = torch.ones(2)
    resolved = backends.resolve(OP, "auto", x.device)
    again = backends.resolve(OP, "auto", x.device)  # another model's plan, resolved before the failure
    op["raise"] = RuntimeError("simulated launch failure")
    with pytest.warns(RuntimeWarning, match="falling back to reference"):
        resolved(x.device, x)
    assert resolved.candidates == ["reference"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure was reported once
        again(x.device, x)
    assert again.candidates == ["reference"]
    assert "failed earlier" in backends.unavailable_reason(OP, "cuda", x.device)
    assert backends.resolve(OP, "auto", x.device).candidates == ["reference"]


def test_dispatch_takes_only_its_own_resolved_op(op):
    x = torch.ones(2)
    other = backends.resolve("rms_norm", "reference", x.device)
    with pytest.raises(ValueError, match="resolved backend of rms_norm"):
        backends.dispatch(OP, other, x.device, x)
    with pytest.raises(TypeError, match="backend must be"):
        backends.dispatch(OP, 3, x.device, x)
    plan = {OP: backends.resolve(OP, "reference", x.device)}  # a plan is a mapping op -> resolved op
    assert torch.equal(backends.dispatch(OP, plan, x.device, x), x * 2) and op["calls"] == ["reference"]


def test_auto_order_takes_the_card_tables_deviation(monkeypatch):
    """The per-card table lists only where a card's measured order deviates from the default."""
    from fastsft import card_table

    monkeypatch.setattr(backends, "_ops", dict(backends._ops))
    backends.register(OP, "cuda")(lambda x: x)
    backends.register(OP, "triton")(lambda x: x)
    backends.register(OP, "reference")(lambda x: x)
    monkeypatch.setattr(card_table, "card_of", lambda device: "Fake card" if device.type == "cuda" else None)
    monkeypatch.setattr(card_table, "table", lambda: {"Fake card": {"backends": {OP: ["triton", "cuda", "reference"]}}})
    assert backends.auto_order(OP, torch.device("cuda", 0)) == ["triton", "cuda", "reference"]
    assert backends.auto_order("rms_norm", torch.device("cuda", 0)) == ["cuda", "triton", "reference"]
    assert backends.auto_order(OP, torch.device("cpu")) == ["cuda", "reference"]  # Triton is never auto on a CPU


@pytest.mark.parametrize("error", [ValueError("bad size"), TypeError("bad type"), ZeroDivisionError("division"),
                                   IndexError("index"), KeyError("key"), AssertionError("assert")],
                         ids=lambda e: type(e).__name__)
def test_errors_of_the_backends_python_code_propagate(op, error):
    """A backend's Python code raising about its input is not a compile or launch failure: it propagates, and the
    backend is not marked broken (that would send every later call of the process to the next backend)."""
    op["raise"] = error
    x = torch.ones(2)
    with pytest.raises(type(error)):
        backends.dispatch(OP, "auto", x.device, x)
    assert backends._broken == {} and op["calls"] == ["cuda"]
    op["raise"] = None
    backends.dispatch(OP, "auto", x.device, x)
    assert op["calls"] == ["cuda", "cuda"]


def test_compile_and_launch_failures_mark_the_backend_broken(op):
    triton_errors = pytest.importorskip("triton.compiler.errors")
    from triton.runtime.errors import OutOfResources

    x = torch.ones(2)
    import ast

    for error in (triton_errors.CompilationError(None, ast.Pass(), "simulated"),
                  OutOfResources(1 << 20, 1 << 16, "shared memory"), ImportError("no module"), OSError("cache")):
        backends._broken.clear()
        op["raise"] = error
        with pytest.warns(RuntimeWarning, match="falling back to reference"):
            backends.dispatch(OP, "auto", x.device, x)
        assert list(backends._broken) == [(OP, "cuda", "cpu")], type(error).__name__
    backends._broken.clear()
    op["raise"] = torch.OutOfMemoryError("out of memory")  # a RuntimeError, but about this call's size
    with pytest.raises(torch.OutOfMemoryError):
        backends.dispatch(OP, "auto", x.device, x)
    assert backends._broken == {}


def test_patch_with_an_explicit_backend_applies_it_where_ops_have_it():
    """``patch(model, backend="cuda")``: the ops with a cuda backend run exactly it; those without (LoRA, the gated
    activation) keep auto, named in one warning. Raised 'lora has no cuda backend' before, LoRA layers or not."""
    import fastsft
    from helpers import tiny_model

    if backends.unavailable_reason("rms_norm", "cuda", torch.device("cpu")) is not None:
        pytest.skip("needs the compiled extension")
    model = tiny_model()
    with pytest.warns(UserWarning, match="have none and keep 'auto'") as seen:
        report = fastsft.patch(model, backend="cuda")
    kept = [str(w.message) for w in seen if "keep 'auto'" in str(w.message)]
    assert len(kept) == 1
    assert all(op in kept[0] for op in ("flash_attention_varlen", "lora", "gated_activation")), kept[0]
    assert "rms_norm" not in kept[0] and "rope" not in kept[0]
    assert report.patched["rms_norm"].startswith("cuda")
    assert report.patched["fused_cross_entropy"] == "cuda"
    assert report.patched["gated_activation"].startswith(backends.chosen("gated_activation", torch.device("cpu")))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    fastsft.unpatch(model)


def test_patch_with_an_explicit_backend_reaches_the_attention(monkeypatch):
    """``patch(model, backend="reference")``: every attention call of the model runs fastsft's op on the reference
    backend (it took the card's provider order before, whatever the backend)."""
    import fastsft
    from helpers import tiny_model

    calls = []
    impls = backends._ops["flash_attention_varlen"].impls
    original = impls["reference"]
    monkeypatch.setitem(impls, "reference", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model = tiny_model()
    report = fastsft.patch(model, backend="reference")
    assert "reference" in report.patched["attention"], report.patched["attention"]
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    fastsft.unpatch(model)
    calls.clear()
    model(input_ids=ids, labels=ids)
    assert not calls


def test_an_explicit_backend_an_op_lacks_raises_on_the_op():
    from fastsft.ops import swiglu

    x = torch.randn(2, 4)
    with pytest.raises(backends.BackendUnavailable, match="gated_activation has no cuda backend"):
        swiglu(x, x, backend="cuda")


def test_fastsft_backend_env_applies_to_the_ops_that_have_it(monkeypatch):
    from fastsft.ops import rms_norm, swiglu

    if backends.unavailable_reason("rms_norm", "cuda", torch.device("cpu")) is not None:
        pytest.skip("needs the compiled extension")
    monkeypatch.setattr(backends, "_env_kept_auto", set(), raising=False)
    monkeypatch.setenv("FASTSFT_BACKEND", "cuda")
    resolved = backends.resolve("rms_norm", "auto", torch.device("cpu"))
    assert resolved.candidates == ["cuda"] and resolved.explicit
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match="gated_activation has no cuda backend; it keeps 'auto'"):
        swiglu(x, x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        swiglu(x, x)
        rms_norm(x, torch.ones(4), 1e-6)


def _rope_tables(seq, dim):
    angles = torch.arange(seq)[:, None] * torch.rand(dim // 2)[None]
    angles = torch.cat([angles, angles], -1)  # equal halves, as every transformers model has
    return angles.cos()[None], angles.sin()[None]


def _double_backward_cases():
    from fastsft.ops import geglu, lora_linear, rope, swiglu

    cos, sin = _rope_tables(3, 4)
    up, k = torch.randn(3, 6), torch.randn(1, 2, 3, 4)
    w, a, b = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    return {
        "swiglu": (lambda x, be: swiglu(x, up, backend=be), (3, 6), "triton"),
        "geglu_tanh": (lambda x, be: geglu(x, up, "tanh", backend=be), (3, 6), "triton"),
        "rope_triton": (lambda x, be: rope(x, k, cos, sin, backend=be)[0], (1, 2, 3, 4), "triton"),
        "rope_cuda": (lambda x, be: rope(x, k, cos, sin, backend=be)[0], (1, 2, 3, 4), "cuda"),
        "lora": (lambda x, be: lora_linear(x, w, a, b, 0.5, backend=be), (3, 6), "triton"),
    }


@pytest.mark.parametrize("case", ["swiglu", "geglu_tanh", "rope_triton", "rope_cuda", "lora"])
def test_double_backward_matches_reference_or_raises(case):
    """create_graph=True through a fast backend: second derivatives equal the reference's, or a clear error (a
    gradient without a graph of its own gave zeros or an unrelated autograd error before)."""
    fn, shape, backend = _double_backward_cases()[case]
    op = {"lora": "lora", "rope_triton": "rope", "rope_cuda": "rope"}.get(case, "gated_activation")
    if backends.unavailable_reason(op, backend, torch.device("cpu")) is not None:
        pytest.skip(f"needs the {backend} backend on the CPU")
    x0 = torch.randn(*shape)

    def second(be):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, be).sin().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), x)[0]

    if case == "lora":
        with pytest.raises(RuntimeError, match="no double backward"):
            second(backend)
        return
    torch.testing.assert_close(second(backend), second("reference"), rtol=1e-4, atol=1e-5)


def test_a_failure_while_a_graph_is_captured_is_raised_and_keeps_the_backend(op):
    """Under a capture the error says what cannot be captured; falling back would mark a working kernel broken
    for the whole process (and the reference backend cannot be captured either)."""
    from fastsft import _capture

    x = torch.ones(2)
    op["raise"] = RuntimeError("operation not permitted when stream is capturing")
    with _capture.emulated(), pytest.raises(RuntimeError, match="stream is capturing"):
        backends.dispatch(OP, "auto", x.device, x)
    op["raise"] = None
    assert torch.equal(backends.dispatch(OP, "auto", x.device, x), x * 2)
    assert op["calls"] == ["cuda", "cuda"] and backends.fallbacks() == {}
