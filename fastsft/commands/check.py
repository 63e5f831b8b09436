"""``fastsft check``: every registered op, every backend usable here, against its reference.

Generic over :mod:`fastsft.backends`: each op in the registry is checked with the ``CheckCase`` registered for
it in ``CHECK_CASES`` (forward output and input gradients against the op's reference in float64). An op with no
case yet is listed as NO CASE (visible in the table, not a failure); ``--strict`` makes it one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fastsft import backends


@dataclass(frozen=True)
class CheckCase:
    """``make_inputs(device, dtype)`` -> (differentiable inputs, other kwargs);
    ``run(backend, *inputs, **kwargs)`` -> a scalar through the op; ``reference(*inputs, **kwargs)`` -> the same
    scalar from the reference. Both scalars are differentiated with respect to the inputs."""

    make_inputs: Callable
    run: Callable
    reference: Callable
    rtol: float = 1e-4  # float32 inputs, compared with a float64 reference


def _lce_inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 97, 64, 1000  # odd sizes on purpose
    hidden = torch.randn(tokens, hidden_size, generator=g) / hidden_size ** 0.5
    weight = torch.randn(vocab, hidden_size, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = -100
    return [hidden.to(device, dtype), weight.to(device, dtype)], {"labels": labels.to(device), "softcap": 30.0}


def _lce_run(backend, hidden, weight, *, labels, softcap):
    from fastsft.ops import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, softcap=softcap, backend=backend)


def _lce_reference(hidden, weight, *, labels, softcap):
    from fastsft.reference.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, softcap=softcap)[0]


def _probe(out: torch.Tensor) -> torch.Tensor:
    """A scalar of ``out`` with fixed random weights, so every output element reaches the gradients."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (out.double() * weights.to(out.device)).sum()


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _attention_inputs(device, dtype):
    lengths = [1, 37, 64, 9]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _randn(total, 8, 64, seed=1), _randn(total, 2, 64, seed=2), _randn(total, 2, 64, seed=3)
    return [t.to(device, dtype) for t in (q, k, v)], {"cu_seqlens": cu.to(device), "window": 16}


def _attention_run(backend, q, k, v, *, cu_seqlens, window):
    from fastsft.ops import flash_attention_varlen

    return _probe(flash_attention_varlen(q, k, v, cu_seqlens, 64, window=window, backend=backend))


def _attention_reference(q, k, v, *, cu_seqlens, window):
    from fastsft.reference.attention import flash_attention_varlen

    return _probe(flash_attention_varlen(q, k, v, cu_seqlens, window=window))


def _norm_inputs(device, dtype):
    return [_randn(33, 96, seed=1).to(device, dtype), (1 + 0.1 * _randn(96, seed=2)).to(device, dtype)], {}


def _norm_run(backend, x, weight):
    from fastsft.ops import rms_norm

    return _probe(rms_norm(x, weight, 1e-6, backend=backend))


def _norm_reference(x, weight):
    from fastsft.reference.rms_norm import rms_norm

    return _probe(rms_norm(x, weight, 1e-6))


def _rope_inputs(device, dtype):
    angles = _randn(2, 37, 32, seed=3)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return ([_randn(2, 8, 37, 64, seed=1).to(device, dtype), _randn(2, 2, 37, 64, seed=2).to(device, dtype)],
            {"cos": cos.to(device, dtype), "sin": sin.to(device, dtype)})


def _rope_run(backend, q, k, *, cos, sin):
    from fastsft.ops import rope

    q2, k2 = rope(q, k, cos, sin, backend=backend)
    return _probe(q2) + _probe(k2)


def _rope_reference(q, k, *, cos, sin):
    from fastsft.reference.rope import rope

    q2, k2 = rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return _probe(q2) + _probe(k2)


def _act_inputs(device, dtype):
    return [_randn(33, 200, seed=1).to(device, dtype), _randn(33, 200, seed=2).to(device, dtype)], {}


def _act_run(backend, gate, up):
    from fastsft.ops import geglu, swiglu

    return _probe(swiglu(gate, up, backend=backend)) + _probe(geglu(gate, up, "tanh", backend=backend))


def _act_reference(gate, up):
    from fastsft.reference.gated_activation import geglu, swiglu

    return _probe(swiglu(gate, up)) + _probe(geglu(gate, up, "tanh"))


def _lora_inputs(device, dtype):
    x, a, b = _randn(37, 96, seed=1), 0.1 * _randn(8, 96, seed=2), 0.1 * _randn(200, 8, seed=3)
    return [t.to(device, dtype) for t in (x, a, b)], {"weight": (_randn(200, 96, seed=4) / 10).to(device, dtype)}


def _lora_run(backend, x, a, b, *, weight):
    from fastsft.ops import lora_linear

    return _probe(lora_linear(x, weight, a, b, 2.0, backend=backend))


def _lora_reference(x, a, b, *, weight):
    from fastsft.reference.lora import lora_linear

    return _probe(lora_linear(x, weight.to(x.dtype), a, b, 2.0))


def _nf4_inputs(device, dtype):
    from fastsft.reference.nf4 import quantize_nf4

    quantized = quantize_nf4(_randn(96, 200, seed=1), blocksize=64, nested=True)
    nested = quantized["nested"]  # its tensors too: left on the CPU they failed the check on a GPU
    quantized["nested"] = nested._replace(absmax=nested.absmax.to(device), code=nested.code.to(device))
    return [], {"quantized": {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in quantized.items()}}


def _nf4_run(backend, *, quantized):
    from fastsft.ops import dequantize_nf4

    return _probe(dequantize_nf4(**{**quantized, "dtype": torch.float32}, backend=backend))


def _nf4_reference(*, quantized):
    from fastsft.reference.nf4 import dequantize_nf4

    return _probe(dequantize_nf4(**{**quantized, "dtype": torch.float32}))


CHECK_CASES: dict[str, CheckCase] = {
    "linear_cross_entropy": CheckCase(_lce_inputs, _lce_run, _lce_reference),
    "flash_attention_varlen": CheckCase(_attention_inputs, _attention_run, _attention_reference),
    "rms_norm": CheckCase(_norm_inputs, _norm_run, _norm_reference),
    "rope": CheckCase(_rope_inputs, _rope_run, _rope_reference),
    "gated_activation": CheckCase(_act_inputs, _act_run, _act_reference),
    "lora": CheckCase(_lora_inputs, _lora_run, _lora_reference),
    "dequantize_nf4": CheckCase(_nf4_inputs, _nf4_run, _nf4_reference, rtol=0.0),  # bit-exact
}


@dataclass
class CheckResult:
    op: str
    backend: str
    device: str
    status: str  # "PASS", "FAIL", "SKIP" (backend not available here) or "NO CASE"
    error: float | None = None  # worst relative error over output and gradients
    time_ms: float | None = None  # median forward+backward time
    detail: str = ""


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _rel_error(actual, expected) -> float:
    denom = expected.double().norm().item()
    diff = (actual.double().cpu() - expected.double().cpu()).norm().item()
    return diff if denom == 0 else diff / denom


def _forward_backward(fn, inputs, kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kwargs)
    if leaves:  # ops without differentiable inputs (NF4 dequantization) are checked forward only
        out.backward()
    return [out.detach()] + [t.grad for t in leaves]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_backend(op: str, backend: str, device: torch.device, case: CheckCase, repeats: int = 5) -> CheckResult:
    result = CheckResult(op, backend, device.type, "SKIP")
    reason = backends.unavailable_reason(op, backend, device)
    if reason is not None:
        result.detail = reason
        return result
    inputs, kwargs = case.make_inputs(device, torch.float32)
    ref_inputs = [t.detach().cpu().double() for t in inputs]
    ref_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected = _forward_backward(case.reference, ref_inputs, ref_kwargs)
    run = lambda *xs, **kw: case.run(backend, *xs, **kw)  # noqa: E731
    try:
        actual = _forward_backward(run, inputs, kwargs)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            _forward_backward(run, inputs, kwargs)
            _sync(device)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # a check reports every failure instead of stopping at the first
        result.status, result.detail = "FAIL", f"{type(exc).__name__}: {exc}"
        return result
    names = ["output"] + [f"grad[{i}]" for i in range(len(inputs))]
    errors = {name: _rel_error(a, e) for name, a, e in zip(names, actual, expected)}
    worst = max(errors, key=errors.get)
    result.error, result.time_ms = errors[worst], 1e3 * statistics.median(times)
    result.status = "PASS" if result.error <= case.rtol else "FAIL"
    result.detail = f"worst: {worst}" if result.status == "PASS" else f"{worst} error > {case.rtol:g}"
    return result


def run_checks() -> list[CheckResult]:
    results = []
    for op, by_backend in backends.report().items():
        case = CHECK_CASES.get(op)
        if case is None:
            results.append(CheckResult(op, "-", "-", "NO CASE",
                                       detail="no check case yet: add one to fastsft.commands.check.CHECK_CASES"))
            continue
        for device in _devices():
            for backend in backends.registered(op):
                results.append(check_backend(op, backend, device, case))
    return results


def format_table(results: list[CheckResult]) -> str:
    header = ("op", "backend", "device", "status", "rel. error", "fwd+bwd ms", "detail")
    rows = [header] + [(r.op, r.backend, r.device, r.status, "-" if r.error is None else f"{r.error:.2e}",
                        "-" if r.time_ms is None else f"{r.time_ms:.2f}", r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def plans() -> list[str]:
    """What a model patched on each local device would run (its plan, as the patch report shows it)."""
    from fastsft.patching.plan import resolve_plan

    return [str(resolve_plan(device, attention=True)) for device in _devices()]


def main(args) -> int:
    results = run_checks()
    print(format_table(results))
    print()
    print("\n".join(plans()))
    count = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP", "NO CASE")}
    print(f"\n{count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped (not available here), "
          f"{count['NO CASE']} op(s) without a check case")
    return 1 if count["FAIL"] or (args.strict and count["NO CASE"]) else 0
