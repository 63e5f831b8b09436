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


CHECK_CASES: dict[str, CheckCase] = {
    "linear_cross_entropy": CheckCase(_lce_inputs, _lce_run, _lce_reference),
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


def main(args) -> int:
    results = run_checks()
    print(format_table(results))
    count = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP", "NO CASE")}
    print(f"\n{count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped (not available here), "
          f"{count['NO CASE']} op(s) without a check case")
    return 1 if count["FAIL"] or (args.strict and count["NO CASE"]) else 0
