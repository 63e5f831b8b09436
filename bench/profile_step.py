"""How busy the GPU is during a packed SFT training step (the target: at least 90% of the step).

    python -m bench.profile_step --model llama-1b --batch 4 --max-length 2048 --out bench/results
    python -m bench.profile_step --model llama-8b --batch 2 --max-length 2048 --provider trl --trace /tmp/traces

The model, data, LoRA and SFTConfig are those of ``bench.bench_sft`` (random-init Llama shapes, synthetic chat
rows, packing, LoRA r=16 on every linear layer, non-reentrant gradient checkpointing, logging every step).
``torch.profiler`` records CPU ops and CUDA device activity with the schedule wait=1 (the first step: CUDA
context, allocator, compilation), ``--warmup`` steps profiled but discarded, then ``--steps`` active steps. A
trainer callback calls ``prof.step()`` at each step's end, after synchronizing the GPU, so every ``ProfilerStep#N``
range spans one whole step (data loading, forward, backward, optimizer, logging) and holds the kernels of that
step only.

Per active step: ``busy_fraction`` is the length of the union of all kernel, memcpy and memset intervals on the
device, clipped to the step's ``ProfilerStep#N`` range, over the range's length. Step windows and device events
come from the same trace, so they share the profiler's clock. Reported as well: the largest idle intervals
(gaps) with the CPU ops running at their midpoint and the kernel that ended them, and the kernels by total time.
Without CUDA there are no device events: the busy fraction is None, the rest of the path still runs.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench import bench_sft, harness

# Kineto activity types that occupy the device. "gpu_user_annotation" (record_function ranges mirrored onto the
# GPU timeline) is left out on purpose: it spans idle time and would count it as busy.
DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
# CPU-side activities worth naming for a gap: framework ops, user ranges, and the CUDA runtime calls under them
# (a cudaStreamSynchronize or a slow cudaLaunchKernel is often the answer).
CPU_ACTIVITIES = frozenset({"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"})
STEP_PREFIX = "ProfilerStep#"


# ---------------------------------------------------------------------------------------------- interval math
# Intervals are (start, end) pairs in any one unit; empty or inverted intervals count nothing.

def clip(intervals, window) -> list[tuple]:
    """``intervals`` cut to ``window``; those entirely outside it (or empty after the cut) are dropped."""
    lo, hi = window
    out = []
    for start, end in intervals:
        start, end = max(start, lo), min(end, hi)
        if end > start:
            out.append((start, end))
    return out


def merge(intervals) -> list[tuple]:
    """The union of ``intervals`` as sorted, disjoint intervals (touching ones joined)."""
    out = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def union_length(intervals) -> float:
    """Total length covered by at least one of ``intervals`` (overlaps counted once)."""
    return sum(end - start for start, end in merge(intervals))


def busy_fraction(kernel_intervals, window) -> float | None:
    """Fraction of ``window`` covered by at least one kernel interval; None for an empty window."""
    length = window[1] - window[0]
    if length <= 0:
        return None
    return union_length(clip(kernel_intervals, window)) / length


def largest_gaps(kernel_intervals, window, k: int = 10) -> list[tuple]:
    """The ``k`` longest idle intervals of ``window`` (no kernel running), longest first; a window without
    kernels is one gap. Ties keep time order."""
    busy = merge(clip(kernel_intervals, window))
    gaps, cursor = [], window[0]
    for start, end in busy:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    if window[1] > cursor:
        gaps.append((cursor, window[1]))
    return sorted(gaps, key=lambda g: g[0] - g[1])[:k]


# ---------------------------------------------------------------------------------------------- trace analysis

def _events(prof) -> dict:
    """Step windows, device intervals and CPU ops of the last profiled cycle, in ns of one clock.

    Reads the Kineto result directly rather than ``prof.events()``: that builds a FunctionEvent tree with memory
    attribution for every event, which takes minutes on a few llama-8b steps."""
    events = prof.profiler.kineto_results.events()
    if events and not hasattr(events[0], "activity_type"):  # torch before 2.12: read the categories off a trace
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            return events_from_chrome_trace(json.loads(path.read_text()))
    steps, device, cpu = [], [], []
    for e in events:
        kind, name = e.activity_type(), e.name()
        if kind in DEVICE_ACTIVITIES:
            device.append((e.start_ns(), e.end_ns(), name, e.linked_correlation_id()))
        elif kind in CPU_ACTIVITIES:
            if kind == "user_annotation" and name.startswith(STEP_PREFIX):
                steps.append((int(name[len(STEP_PREFIX):]), e.start_ns(), e.end_ns(), e.start_thread_id()))
            else:
                cpu.append((e.start_ns(), e.end_ns(), name, e.start_thread_id(), e.correlation_id(), kind))
    steps.sort()
    # All threads, not just the trainer's: autograd runs the backward ops on its own device thread.
    cpu.sort(key=lambda c: c[0])
    device.sort(key=lambda d: d[0])
    return {"steps": [s[:3] for s in steps], "device": device, "cpu": cpu}


def events_from_chrome_trace(trace: dict) -> dict:
    """What :func:`_events` returns, from an exported Chrome trace (``cat`` is the activity type; times in us).
    A kernel's ``External id`` is that of the framework op that launched it."""
    steps, device, cpu = [], [], []
    for e in trace.get("traceEvents", []):
        kind, name = e.get("cat"), e.get("name", "")
        if e.get("ph") != "X" or kind not in DEVICE_ACTIVITIES | CPU_ACTIVITIES:
            continue
        start = round(float(e["ts"]) * 1000)
        end = start + round(float(e.get("dur", 0)) * 1000)
        args = e.get("args", {})
        if kind in DEVICE_ACTIVITIES:
            device.append((start, end, name, args.get("External id", -1)))
        elif kind == "user_annotation" and name.startswith(STEP_PREFIX):
            steps.append((int(name[len(STEP_PREFIX):]), start, end, e.get("tid")))
        else:
            runtime = kind in ("cuda_runtime", "cuda_driver")
            ident = args.get("correlation", -1) if runtime else args.get("External id", -1)
            cpu.append((start, end, name, e.get("tid"), ident, kind))
    steps.sort()
    cpu.sort(key=lambda c: c[0])
    device.sort(key=lambda d: d[0])
    return {"steps": [s[:3] for s in steps], "device": device, "cpu": cpu}


def _cpu_stack(cpu: list[tuple], t: int, depth: int = 3) -> str | None:
    """The CPU ops running at time ``t``: per thread the innermost ``depth`` names, outermost first; threads
    apart by ``||``. ``cpu`` holds (start, end, name, thread, ...) sorted by start."""
    running = [c for c in cpu[:bisect.bisect_right(cpu, (t, float("inf")))] if c[1] >= t]
    threads: dict[int, list] = {}
    for c in sorted(running, key=lambda c: (c[0], -c[1])):  # nesting order: earlier start, then longer, outside
        threads.setdefault(c[3], []).append(c[2])
    return " || ".join(" > ".join(names[-depth:]) for names in threads.values()) or None


def analyze(trace: dict, *, top: int = 10, has_device: bool = True) -> dict:
    """Per-step busy fractions, the largest gaps over all active steps and the kernels by total time."""
    device = trace["device"]
    starts = [d[0] for d in device]
    # A device event's linked correlation id is the id of the framework op that launched it; CUDA runtime calls
    # number their own correlation ids, which can collide with those, so they are left out of this map.
    launches = {c[4]: c[2] for c in trace["cpu"] if c[5] != "cuda_runtime" and c[5] != "cuda_driver"}
    steps, gaps = [], []
    for number, lo, hi in trace["steps"]:
        # device events start before they end: those starting after the window cannot overlap it
        inside = device[:bisect.bisect_left(starts, hi)]
        intervals = [(d[0], d[1]) for d in inside if d[1] > lo]
        fraction = busy_fraction(intervals, (lo, hi)) if has_device else None
        steps.append({"step": number + 1,  # ProfilerStep#0 is the trainer's first step
                      "wall_ms": (hi - lo) / 1e6,
                      "busy_ms": union_length(clip(intervals, (lo, hi))) / 1e6 if has_device else None,
                      "busy_fraction": fraction, "device_events": len(intervals)})
        if has_device:
            gaps += [(g, number + 1, lo) for g in largest_gaps(intervals, (lo, hi), top)]
    gaps.sort(key=lambda g: g[0][0] - g[0][1])
    gap_rows = []
    for (start, end), step, lo in gaps[:top]:
        following = bisect.bisect_left(starts, end)
        after = device[following] if following < len(device) else None
        gap_rows.append({"step": step, "gap_ms": (end - start) / 1e6, "at_ms": (start - lo) / 1e6,
                         "cpu_ops": _cpu_stack(trace["cpu"], (start + end) // 2),
                         "next_kernel": after[2][:120] if after else None,
                         "next_launch": launches.get(after[3]) if after else None})
    totals: dict[str, list] = {}
    by_launcher: dict[str, list] = {}  # the framework op behind each device event: where the launches come from
    windows = [(lo, hi) for _, lo, hi in trace["steps"]]
    for start, end, name, correlation in device:
        if any(start < hi and end > lo for lo, hi in windows):
            entry = totals.setdefault(name, [0, 0])
            entry[0] += end - start
            entry[1] += 1
            entry = by_launcher.setdefault(launches.get(correlation) or "(no framework op)", [0, 0])
            entry[0] += end - start
            entry[1] += 1
    n_steps = len(windows) or 1
    launchers = [{"op": op, "events_per_step": n / n_steps, "device_ms_per_step": ns / 1e6 / n_steps}
                 for op, (ns, n) in sorted(by_launcher.items(), key=lambda kv: -kv[1][1])[:top]]
    device_total = sum(v[0] for v in totals.values()) or 1  # summed, not the union: shares add up to 1
    kernels = [{"kernel": name, "total_ms": ns / 1e6, "calls": n, "share": ns / device_total}
               for name, (ns, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]
    fractions = [s["busy_fraction"] for s in steps if s["busy_fraction"] is not None]
    return {"steps": steps, "gaps": gap_rows, "kernels": kernels, "launchers": launchers,
            **host_time(trace["cpu"], windows, top),
            "busy_fraction_median": statistics.median(fractions) if fractions else None,
            "step_ms_median": statistics.median(s["wall_ms"] for s in steps) if steps else None}


def host_time(cpu: list[tuple], windows: list[tuple], top: int = 10) -> dict:
    """Where the host's time goes in the step ``windows``: per CPU event name its self time (its length less that
    of the events nested in it on the same thread) and count, per step, most time first; and per thread the time
    covered by any event. A long self time on ``cudaStreamSynchronize`` or ``cudaMemcpyAsync`` means the host
    waited for the GPU; on a ``user_annotation`` (a ``record_function`` range, e.g. the trainer's), Python
    running between ops. Events are assigned to the step in which they start."""
    starts = [lo for lo, _ in windows]
    by_name: dict[tuple, list] = {}
    by_thread: dict[int, list] = {}
    stacks: dict[int, list] = {}  # per thread: the enclosing events still open, as [end, key, child_ns]

    def close(stack, until):
        while stack and stack[-1][0] <= until:
            end, key, length, children = stack.pop()
            by_name[key][0] += length - children

    for start, end, name, thread, _, kind in sorted(cpu, key=lambda c: (c[0], -c[1])):
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or start >= windows[i][1]:
            continue
        stack = stacks.setdefault(thread, [])
        close(stack, start)
        key = (name, kind)
        by_name.setdefault(key, [0, 0])[1] += 1
        if stack:
            stack[-1][3] += end - start
        else:
            by_thread.setdefault(thread, []).append((start, end))
        stack.append([end, key, end - start, 0])
    for stack in stacks.values():
        close(stack, float("inf"))
    n = len(windows) or 1
    rows = [{"name": name[:100], "kind": kind, "self_ms_per_step": ns / 1e6 / n, "calls_per_step": calls / n}
            for (name, kind), (ns, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    threads = [{"thread": t, "busy_ms_per_step": union_length(iv) / 1e6 / n}
               for t, iv in sorted(by_thread.items(), key=lambda kv: -union_length(kv[1]))]
    return {"host_self_time": rows, "host_threads": threads}


# ---------------------------------------------------------------------------------------------- the run

def _profiling_callback(prof):
    """Trainer callback driving ``prof``: started with training, one profiler step per trainer step."""
    import torch
    from transformers import TrainerCallback

    class Profiling(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            # Without this the last kernels of a step would run after its ProfilerStep range has closed and be
            # counted in the next one; the trainer's per-step loss logging waits for them anyway.
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.step()

        def on_train_end(self, args, state, control, **kwargs):
            prof.stop()

    return Profiling()


def profile(a: argparse.Namespace) -> dict:
    """Train ``1 + warmup + steps`` steps under the profiler; the analysis of the active steps."""
    import torch
    from torch.profiler import ProfilerActivity, schedule

    has_device = torch.cuda.is_available()
    result: dict = {}

    def ready(prof):
        # Called once, at the end of the last active step, while the trace of this cycle is still held.
        t0 = time.perf_counter()
        result.update(analyze(_events(prof), top=a.top, has_device=has_device))
        result["analysis_s"] = time.perf_counter() - t0
        if a.trace:
            a.trace.mkdir(parents=True, exist_ok=True)
            path = a.trace / f"{a.name}.pt.trace.json.gz"
            prof.export_chrome_trace(str(path))
            result["trace"] = str(path)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if has_device else [])
    prof = torch.profiler.profile(activities=activities, on_trace_ready=ready,
                                  schedule=schedule(wait=1, warmup=a.warmup, active=a.steps, repeat=1))
    # bench_sft's fields: its warm-up and timed steps together are the steps trained here
    run = argparse.Namespace(**vars(a), checkpoint=None)
    run.warmup, run.steps = 1 + a.warmup, a.steps
    with tempfile.TemporaryDirectory() as out:
        trainer = bench_sft.make_trainer(a.provider, run, out, [_profiling_callback(prof)])
        start = time.perf_counter()
        trainer.train()
        result["train_s"] = time.perf_counter() - start
    if not has_device:
        result["note"] = ("no CUDA device: no device events were recorded, busy fractions are None; step windows, "
                          "CPU ops and the analysis path still ran")
    if "steps" not in result:
        raise RuntimeError("the profiler's trace was never ready: did training stop before the active steps?")
    return result


def _md_sections(result: dict) -> str:
    """The gap and kernel tables, appended below harness.write's step table."""
    def table(rows, columns):
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            cells = [harness._fmt(row.get(c)) for c in columns]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return lines

    lines = ["", f"Median busy fraction: {harness._fmt(result['busy_fraction_median'])}; "
             f"median step {harness._fmt(result['step_ms_median'])} ms."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    lines += ["", "## Largest gaps (GPU idle)", ""]
    lines += table(result["gaps"], ["step", "gap_ms", "at_ms", "cpu_ops", "next_kernel", "next_launch"])
    lines += ["", "## Kernels by total time (active steps)", ""]
    lines += table([dict(k, kernel=k["kernel"][:100]) for k in result["kernels"]],
                   ["kernel", "total_ms", "calls", "share"])
    if result.get("launchers"):
        lines += ["", "## Device events by the framework op that launched them (per step, most first)", ""]
        lines += table(result["launchers"], ["op", "events_per_step", "device_ms_per_step"])
    if result.get("host_self_time"):
        lines += ["", "## Host: CPU events by self time (per step, most first)", ""]
        lines += table(result["host_self_time"], ["name", "kind", "self_ms_per_step", "calls_per_step"])
        lines += ["", "## Host: time each thread spent inside any event (per step)", ""]
        lines += table(result["host_threads"], ["thread", "busy_ms_per_step"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(bench_sft.MODELS), default="llama-1b")
    parser.add_argument("--provider", choices=[*bench_sft.FASTSFT_PROVIDERS, "trl"], default="fastsft")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", "--seq-len", dest="max_length", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2, help="steps profiled and discarded, after the first")
    parser.add_argument("--steps", type=int, default=3, help="active (analysed) steps")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    bench_sft.add_optim_argument(parser)
    parser.add_argument("--top", type=int, default=10, help="gaps and kernels listed")
    parser.add_argument("--trace", type=Path, default=None, help="also write the chrome trace (.json.gz) here")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default=None, help="result file name (default: profile_<model>_<provider>_...)")
    a = parser.parse_args(argv)
    if a.steps < 1:
        parser.error("--steps: at least one active step")
    a.packing = True  # the 90% target is about packed steps
    a.name = a.name or f"profile_{a.model}_{a.provider}_b{a.batch}_{a.max_length}{bench_sft.optim_suffix(a)}"

    result = profile(a)
    config = {"model": a.model, "provider": a.provider, "batch": a.batch, "max_length": a.max_length,
              "packing": True, "checkpointing": a.checkpointing, "optim": a.optim, "warmup": a.warmup,
              "active_steps": a.steps}
    rows = [dict(config, **s) for s in result["steps"]]
    harness.write(rows, a.out, a.name, ["provider", "model", "batch", "max_length", "step", "wall_ms", "busy_ms",
                                        "busy_fraction", "device_events"],
                  f"GPU busy fraction of packed SFT steps: {a.provider}, {a.model}, batch {a.batch}, "
                  f"max_length {a.max_length}, checkpointing {a.checkpointing}, {a.optim}",
                  extra={"config": config, **{k: v for k, v in result.items() if k != "steps"}})
    with open(a.out / f"{a.name}.md", "a") as f:
        f.write(_md_sections(result))
    print(f"{a.name}: median busy fraction {result['busy_fraction_median']}, median step "
          f"{result['step_ms_median']:.1f} ms; {a.out / a.name}.md", flush=True)
    return result


if __name__ == "__main__":
    main()
