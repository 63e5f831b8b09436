"""The kernel suite's measuring, apart from any op: rotating inputs, timed rounds, summaries, the JSON converter.

A measurement (:func:`run`) goes: one untimed call (compiles, autotunes), a few calls to estimate the time of
one, then ``benchmark.pedantic`` with that many warm-up rounds and as many timed rounds as fit the time budget.
Every round takes the next input set of a :class:`Ring` (a few distinct sets, together larger than the L2
cache, so no round finds its inputs cached by the one before), with their gradients cleared outside the timed
region. Each round is timed twice: by CUDA events around the call (``ms`` median with ``ms_p20``/``ms_p80``, which the
rows report; each round starts on an idle device, so where launching takes the host longer than the kernels take
the device, this counts the launching) and by pytest-benchmark with a clock that synchronizes the device
(``wall_ms``, so host overhead shows). On a GPU, up to 30 more rounds time the kernels alone (``device_ms``, and
``device_GB/s``/``device_TFLOP/s`` from it): each round's launches are queued behind a spinning kernel, so the
device runs them back to back (:func:`bench.harness.queued_device_ms`; ``device_covered`` False: the host could
not keep ahead even so). Peak memory is measured last, on a call of its own, after a reset of the
peak counter (:func:`bench.harness.peak_extra_bytes`).

Nothing here needs a GPU: on the CPU the events become ``time.perf_counter`` (the CPU tests use that).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

DEVICE_ROUNDS = 30  # rounds of the queued (host-hidden) device timing, each behind a wait of ~2x the host time
QUICK_ENV = "FASTSFT_BENCH_QUICK"  # the same switch as scripts/gpu_check.sh's quick benchmark presets


def quick() -> bool:
    """The quick preset: fewer shapes and a smaller time budget per measurement."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def preset(quick_values: Sequence, full_values: Sequence) -> list:
    return list(quick_values if quick() else full_values)


# --- rotating inputs ---------------------------------------------------------------------------------------------

def nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (a tensor or a nested tuple/list/dict of them), each storage once."""
    seen, total = set(), 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return total


def cache_bytes(device: torch.device) -> int:
    """The L2 cache of a CUDA device (50 MiB on H100/H200); 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


def ring_size(set_bytes: int, cache: int, most: int = 8) -> int:
    """How many distinct input sets make a set's next use miss the cache: the others in between must fill it.
    At least 2 (so consecutive rounds never share inputs), at most ``most`` (memory)."""
    if set_bytes <= 0:
        return 2
    return max(2, min(most, 1 + math.ceil(cache / set_bytes)))


@dataclass
class Ring:
    """Distinct input sets, handed out in turn. Each set is a tuple of arguments of the step; ``shared`` are
    tensors all sets use (trainable weights, adapters) whose gradients are cleared each round as well."""

    sets: list[tuple]
    shared: list[torch.Tensor] = field(default_factory=list)
    turn: int = field(default=0, init=False)

    @classmethod
    def build(cls, make: Callable[[], tuple], device: torch.device, shared=(), most: int = 8) -> "Ring":
        """Sets from ``make()`` (fresh random tensors each call), as many as :func:`ring_size` asks for."""
        first = make()
        n = ring_size(nbytes(first), cache_bytes(device), most)
        return cls([first] + [make() for _ in range(n - 1)], list(shared))

    def next(self) -> tuple:
        """The next set, its gradients cleared (so a backward writes them fresh, as in a training step)."""
        args = self.sets[self.turn % len(self.sets)]
        self.turn += 1
        for t in (*args, *self.shared):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        return args

    def setup(self):
        """pytest-benchmark's ``setup``: (args, kwargs) of the next round."""
        return self.next(), {}


def forward_backward(fn: Callable) -> Callable:
    """A step running ``fn(*args)`` and the backward of its output(s) with fixed upstream gradients (drawn on
    the first call; a scalar loss gets 1)."""
    upstream: list[torch.Tensor] = []

    def step(*args):
        out = fn(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not upstream:
            upstream.extend(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, upstream)

    return step


# --- providers -------------------------------------------------------------------------------------------------

# providers that need an optional package
NEEDS = {"liger": "liger_kernel", "trl-chunked": "trl", "peft": "peft", "bitsandbytes": "bitsandbytes"}


def skip_unavailable(op: str, provider: str, device: torch.device) -> None:
    """Skip the test (not fail it) when the provider cannot run here: its package is missing, or fastsft has no
    such backend for ``op`` (a registry name) or cannot run it on ``device``."""
    import pytest

    if provider in NEEDS:
        pytest.importorskip(NEEDS[provider])
    backend = provider.removeprefix("fastsft-")
    if provider.startswith("fastsft-") and backend in ("cuda", "triton"):
        import fastsft.ops  # noqa: F401  (registers the backends)
        from fastsft import backends

        reason = backends.unavailable_reason(op, backend, device)
        if reason is not None:
            pytest.skip(f"fastsft {backend}: {reason}")


def tokens_id(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


# --- timing ------------------------------------------------------------------------------------------------------

class EventClock:
    """Device time of a region: CUDA events recorded on the current stream, read after one synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, pairs: list) -> list[float]:
        if not self.cuda:
            return [(end - start) * 1e3 for start, end in pairs]
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in pairs]


def synchronized_clock() -> float:
    """pytest-benchmark's timer: host seconds once the device has finished its queued work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> dict:
    """Median with p20/p80 and the number of rounds: what every row reports."""
    return {"ms": statistics.median(times_ms), "ms_p20": percentile(times_ms, 0.2),
            "ms_p80": percentile(times_ms, 0.8), "rounds": len(times_ms)}


def plan_rounds(one_ms: float, budget_ms: float, least: int, most: int) -> int:
    """Timed rounds that fit ``budget_ms`` at ``one_ms`` each, within [least, most]."""
    if one_ms <= 0:
        return most
    return max(least, min(most, int(budget_ms / one_ms)))


@dataclass(frozen=True)
class Budget:
    """Timed time per measurement and the bounds on its rounds; the quick preset keeps the suite to minutes."""

    budget_ms: float
    least: int
    most: int
    warmup: int

    @classmethod
    def for_preset(cls) -> "Budget":
        return cls(300, 10, 100, 3) if quick() else cls(1500, 25, 500, 10)


def run(benchmark, step: Callable, ring: Ring, *, work: dict | None = None, device: torch.device | None = None,
        budget: Budget | None = None) -> dict:
    """Measure ``step(*ring.next())`` with pytest-benchmark's ``benchmark`` fixture; returns (and stores in
    ``benchmark.extra_info``) the device-time summary, ``wall_ms``, ``ring``, ``peak_extra_GiB`` and, from
    ``work`` (``{"flop": n}`` and/or ``{"bytes": n}`` per call), TFLOP/s and GB/s at the median."""
    device = device or torch.device("cuda")
    budget = budget or Budget.for_preset()
    clock = EventClock(device)
    pairs = []

    def timed(*args):
        start = clock.mark()
        step(*args)
        pairs.append((start, clock.mark()))

    step(*ring.next())  # compile / autotune / first-call caches, untimed
    for _ in range(3):  # the time of one call, for the number of rounds
        timed(*ring.next())
    rounds = plan_rounds(statistics.median(clock.elapsed_ms(pairs)), budget.budget_ms, budget.least, budget.most)
    pairs.clear()
    benchmark._timer = synchronized_clock  # no public hook per test; the runner reads it when a round starts
    benchmark.pedantic(timed, setup=ring.setup, rounds=rounds, warmup_rounds=budget.warmup)
    times = clock.elapsed_ms(pairs[budget.warmup:])
    info = summarize(times) if times else {}  # none when pytest-benchmark is disabled
    info["ring"] = len(ring.sets)
    if benchmark.stats is not None:
        info["wall_ms"] = benchmark.stats.stats.median * 1e3
    if device.type == "cuda" and times:
        from bench import harness

        # the kernels alone: each round's launches queued behind a spinning kernel, so the host's time is hidden
        try:
            info.update(harness.queued_device_ms(step, ring.next, min(rounds, DEVICE_ROUNDS), mark=clock.mark,
                                                 elapsed_ms=clock.elapsed_ms, sleep=harness.gpu_sleep,
                                                 sync=torch.cuda.synchronize))
        except Exception as exc:  # the idle-start figures stand; say why this one is missing
            info["device_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for key, unit, scale in (("flop", "TFLOP/s", 1e12), ("bytes", "GB/s", 1e9)):
        for timed_key, prefix in (("ms", ""), ("device_ms", "device_")):
            if work and work.get(key) and timed_key in info:
                info[prefix + unit] = work[key] / (info[timed_key] * 1e-3) / scale
    if device.type == "cuda":
        from bench import harness

        info["peak_extra_GiB"] = harness.peak_extra_bytes(lambda: step(*ring.next())) / 2**30
    benchmark.extra_info.update(info)
    return info


def measure(benchmark, fn: Callable, make: Callable[[], tuple], device: torch.device, *, shared=(),
            work: dict | None = None) -> dict:
    """Forward+backward of ``fn`` over a ring of input sets from ``make`` (see :func:`run`)."""
    return run(benchmark, forward_backward(fn), Ring.build(make, device, shared), work=work, device=device)


def measure_norm_rope_act(benchmark, op: str, provider: str, tokens: int, device: torch.device) -> dict:
    """RMSNorm, RoPE, SwiGLU or GeGLU with ``bench.bench_norm_rope_act``'s providers and inputs; GB/s of the
    bytes the op must move at least."""
    from bench import bench_norm_rope_act as nra

    work = {}

    def make():
        args, _, work["bytes"] = nra.inputs(op, tokens)
        return args

    return measure(benchmark, nra.provider_fn(op, provider), make, device, work=work)


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a time cap: ``timeout``, ``bench.suite``) into KeyboardInterrupt, so that pytest ends the
    session as interrupted and pytest-benchmark still writes the cases measured so far into ``--benchmark-json``
    (killed outright, a module that ran out of time wrote nothing)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}: stopping, keeping the cases measured so far")

    signal.signal(signal.SIGTERM, interrupt)


# --- pytest-benchmark JSON -> result rows ------------------------------------------------------------------------

MEASURED = ("ms", "ms_p20", "ms_p80", "wall_ms", "device_ms", "TFLOP/s", "GB/s", "device_TFLOP/s", "device_GB/s",
            "device_covered", "peak_extra_GiB", "rounds", "ring")


def to_rows(data: dict) -> dict[str, tuple[dict, list[dict]]]:
    """pytest-benchmark's ``--benchmark-json`` output as ``{group: (environment, rows)}`` in the row format of
    the other benchmarks (``bench.report`` reads them): the test's parameters, then the measurements."""
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    env = machine.get("fastsft") or {"card": machine.get("cpu", {}).get("brand_raw"), "versions": {},
                                     "commit": commit.get("id"), "date": data.get("datetime")}
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        row = {k: v for k, v in (bench.get("params") or {}).items()}
        extra = bench.get("extra_info") or {}
        row.update({k: extra[k] for k in MEASURED if k in extra})
        row.update({k: v for k, v in extra.items() if k not in row})
        if "ms" not in row and bench.get("stats"):  # a run without CUDA events: pytest-benchmark's own clock
            row["ms"] = bench["stats"]["median"] * 1e3
        groups.setdefault(bench.get("group") or bench["name"].split("[")[0], []).append(row)
    return {group: (env, rows) for group, rows in groups.items()}
