"""Shared benchmark plumbing: environment rows, GPU timing, peak memory, result files.

Timing: CUDA events around the region (``triton.testing.do_bench``), warm-up first, median
with p20/p80 of many runs. :func:`device_time_ms` times the same region with its launches queued behind a spinning
kernel, so that the host's time to launch it is hidden: the kernels' own time, for bandwidth figures of ops that are
quicker on the device than their launches are on the host. Memory is the peak allocated during one call minus what
was allocated before it (the inputs), after a reset of the peak counter.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable

import torch

PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "liger-kernel", "bitsandbytes", "fastsft")


def environment() -> dict:
    """Card, versions and commit: every result row carries these."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    # The GPU machine gets a copy of the working tree without .git: the caller passes FASTSFT_COMMIT there.
    commit = os.environ.get("FASTSFT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"card": card, "cuda": torch.version.cuda, "versions": versions, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 100, rep_ms: float = 500,
            grad_to_none=None) -> dict:
    """Median, p20 and p80 of ``fn``'s device time in milliseconds (CUDA events)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": p20, "ms_p80": p80}


# --- device time with the host's launch time hidden ------------------------------------------------------------

def _gpu_cycles_per_ms() -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on the current device (measured once)."""
    device = torch.cuda.current_device()
    if device not in _CYCLES_PER_MS:
        torch.cuda._sleep(1_000)  # load the kernel first
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(2_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS[device] = 2_000_000 / start.elapsed_time(end)
    return _CYCLES_PER_MS[device]


_CYCLES_PER_MS: dict[int, float] = {}


def gpu_sleep(ms: float) -> None:
    """Keep the current stream busy for about ``ms`` milliseconds (a spinning kernel), without the host waiting."""
    torch.cuda._sleep(max(1, int(ms * _gpu_cycles_per_ms())))


def queued_device_ms(step: Callable[..., object], args: Callable[[], tuple], rounds: int, *,
                     mark: Callable[[], object], elapsed_ms: Callable[[list], list[float]],
                     sleep: Callable[[float], None], sync: Callable[[], None], host_ms: float | None = None,
                     tries: int = 3) -> dict:
    """Device time of ``step(*args())`` when its launches are already queued: each round first puts a spinning
    kernel of about twice ``host_ms`` on the stream, so the host enqueues the whole step while the device waits,
    and the events around the step then time the kernels back to back (launch overhead and the host's Python are
    what ``time_ms``-style timing from an idle device adds on top). ``host_ms``, the host's time to enqueue one
    step, is measured on one untimed step when not given. A round whose enqueueing outlasted the wait is not
    host-free: then the wait doubles and the rounds run again (``tries`` times); ``device_covered`` says whether
    the last try's every round was covered. Returns ``device_ms`` (median), ``device_ms_p20``/``_p80``,
    ``device_covered``, ``device_wait_ms``."""
    import statistics
    import time

    from bench.kernels.timing import percentile

    if host_ms is None:
        sync()
        t0 = time.perf_counter()
        step(*args())  # the device still runs it when the host is done
        host_ms = (time.perf_counter() - t0) * 1e3
        sync()
    wait = max(0.1, 2 * host_ms)
    for _ in range(tries):
        pairs, hosts = [], []
        for _ in range(rounds):
            a = args()
            t0 = time.perf_counter()
            sleep(wait)
            start = mark()
            step(*a)
            pairs.append((start, mark()))
            hosts.append((time.perf_counter() - t0) * 1e3)
            sync()
        covered = max(hosts) < wait
        if covered:
            break
        wait = 2 * max(max(hosts), wait)
    times = elapsed_ms(pairs)
    return {"device_ms": statistics.median(times), "device_ms_p20": percentile(times, 0.2),
            "device_ms_p80": percentile(times, 0.8), "device_covered": covered, "device_wait_ms": wait}


def device_time_ms(fn: Callable[[], object], *, rounds: int = 30, grad_to_none=None) -> dict:
    """:func:`queued_device_ms` of ``fn`` on the current CUDA stream (gradients of ``grad_to_none`` cleared
    before each round, outside the timed region)."""
    def args() -> tuple:
        for t in grad_to_none or ():
            t.grad = None
        return ()

    def mark():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(pairs):
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in pairs]

    return queued_device_ms(lambda: fn(), args, rounds, mark=mark, elapsed_ms=elapsed, sleep=gpu_sleep,
                            sync=torch.cuda.synchronize)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def write_backend_order(card: str, orders: dict[str, list[str]]) -> None:
    """Store measured backend orders (op -> backends, fastest first) for ``card`` in fastsft's per-card table,
    where they differ from the default order."""
    from fastsft import backends, card_table, ops

    del ops  # imported for its backends' registration

    defaults = {op: [b for b in backends.DEFAULT_ORDER["cuda"] if b in backends.registered(op)] for op in orders}
    path = card_table.update(card, "backends", orders, defaults)
    print(f"backend orders for {card}: {orders} (stored in {path} where they differ from {defaults})")


def config_dict(config) -> dict:
    """A benchmark's config dataclass as the ``config`` of its JSON results (dtypes by name)."""
    return {k: str(v) if isinstance(v, torch.dtype) else v for k, v in config.__dict__.items()}


def write(rows: list[dict], out_dir: Path, name: str, columns: list[str], title: str,
          extra: dict | None = None, env: dict | None = None) -> None:
    """``<name>.json`` (environment, ``extra`` and rows) and ``<name>.md`` (a table of ``columns``); ``env``
    replaces this machine's environment (results merged elsewhere from runs on another machine)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env or environment()
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, **(extra or {}), "rows": rows}, indent=1))
    lines = [f"# {title}", "", f"{env['card']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
             + f"; commit {env['commit']}; {env['date']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
