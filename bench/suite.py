"""The whole benchmark suite, kernels and end to end, as presets sized for the GPU tool's 10-minute calls.

    python -m bench.suite --preset quick --out OUT            # one call: every op (one shape) + 1B and 8B SFT
    python -m bench.suite --preset full --part 1 --out OUT    # the fuller preset in three calls (parts 1, 2, 3)
    python -m bench.suite --list                              # what each preset runs

Each entry runs as its own process with a time cap (then SIGTERM, and after a grace of STOP_GRACE_S a kill: the
kernel suite writes the cases it measured when stopped); its log goes to ``OUT/<entry>.log`` and its results (JSON +
Markdown, the format of ``bench.harness``) into OUT. ``OUT/suite_<preset>[_<part>].json`` records every entry's
exit status and duration, and at the end ``bench.report`` turns OUT into ``all_rows.csv``, plots and RESULTS.md.
``--time-limit S`` fits the run into S seconds (what a GPU call has left after the install): caps are cut to the
time left, so an overrunning part loses its last entries' tails, not the call's results.
Copy the result files into ``bench/results/`` (and rerun ``python -m bench.report``) to commit them.

The end-to-end entries run bench_sft's default providers: stock TRL, TRL + Liger, fastsft and Unsloth, the last from
the site in ``FASTSFT_UNSLOTH_SITE`` (skipped, and its row says so, without one). The caps were measured without
Unsloth and give it room (an estimated 60 s) only where a call's time allows (the comments say where), so with it an
entry may reach its cap; Unsloth runs last and bench_sft writes its results after every provider, so such an entry
keeps the other providers' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    name: str
    argv: tuple[str, ...]  # after "python -m"
    timeout_s: int
    env: dict = field(default_factory=dict)


def _kernels(quick: bool, timeout_s: int, collect_s: int) -> list[Entry]:
    env = {"FASTSFT_BENCH_QUICK": "1"} if quick else {}
    return [Entry("kernels", ("pytest", "bench/kernels", "-q", "-p", "no:cacheprovider", "-rs",
                              "--benchmark-json", "{out}/kernels.json", "--benchmark-columns=median,rounds"),
                  timeout_s, env),
            Entry("kernels-collect", ("bench.kernels.collect", "{out}/kernels.json", "--out", "{out}"), collect_s)]


def _kernel_modules(caps: dict[str, int], collect_s: int) -> list[Entry]:
    """One entry per kernel module (``bench/kernels/test_<op>.py``), each with its own cap and JSON, so a module
    that runs out of time loses its own rows only; then one collect over them all."""
    entries = [Entry(f"kernels-{op}", ("pytest", f"bench/kernels/test_{op}.py", "-q", "-p", "no:cacheprovider",
                                       "-rs", "--benchmark-json", f"{{out}}/kernels-{op}.json",
                                       "--benchmark-columns=median,rounds"), cap)
               for op, cap in caps.items()]
    jsons = tuple(f"{{out}}/kernels-{op}.json" for op in caps)
    return [*entries, Entry("kernels-collect", ("bench.kernels.collect", *jsons, "--out", "{out}"), collect_s)]


def _sft(model: str, *flags: str, batch: int, timeout_s: int, steps: int = 10, warmup: int = 3) -> Entry:
    name = "sft-" + "-".join([model, *(f.lstrip("-") for f in flags)])
    return Entry(name, ("bench.bench_sft", "--model", model, *flags, "--batch", str(batch), "--warmup", str(warmup),
                        "--steps", str(steps), "--out", "{out}"), timeout_s)


PRESETS: dict[str, dict[int, list[Entry]]] = {
    # One 10-minute call: every op at one shape, and the headline e2e rows (packing, 2048 tokens, LoRA).
    # Each e2e provider spends about 30 s starting (imports, model, data) before its first step. On one H200, without
    # Unsloth: kernels 90 s, collect 5 s, 1B 96 s, 8B 106 s.
    "quick": {1: [*_kernels(True, 140, collect_s=20),
                  _sft("llama-1b", "--packing", batch=4, warmup=2, steps=6, timeout_s=170),
                  _sft("llama-8b", "--packing", batch=2, warmup=2, steps=6, timeout_s=240)]},
    # The fuller preset in three calls: every op at two shapes, and the 8B matrix (2048 and 8192 tokens, packing
    # on and off, LoRA and QLoRA) with the 1B shape beside it. The kernel modules are spread over the parts (the
    # whole suite at two shapes does not fit one call). Caps: about 1.2x each entry's time in a run of the three
    # parts side by side on a 4 x H200 machine; the linear cross-entropy module, cut short there (18 of 24 cases in
    # 150 s) and again on a 2 x H200 machine (21 in 240 s), gets 290 s (all 24 in 198 s on one H200).
    # Three calls on one H200, one part each: 356, 316 and 364 s, every entry within its cap (without Unsloth). For
    # Unsloth part 2's 1B row has 50 s more; the 8B rows there (99 and 90 s of 175 and 155) and part 3 have none.
    "full": {1: [*_kernel_modules({"attention": 120, "linear_cross_entropy": 290, "rope": 55, "rms_norm": 55},
                                  collect_s=15)],
             2: [_sft("llama-8b", "--packing", batch=2, timeout_s=175),
                 _sft("llama-8b", "--no-packing", batch=2, timeout_s=155),
                 _sft("llama-1b", "--packing", batch=4, timeout_s=190),
                 *_kernel_modules({"nf4": 35}, collect_s=15)],
             3: [_sft("llama-8b", "--packing", "--seq-len", "8192", batch=1, timeout_s=195),
                 _sft("llama-8b", "--packing", "--qlora", batch=2, timeout_s=205),
                 *_kernel_modules({"lora": 85, "gated_activation": 70}, collect_s=15)]},
}


STOP_GRACE_S = 15  # after its cap, the time an entry has to write what it measured before it is killed
REPORT_S = 20  # kept back under --time-limit for bench.report at the end
MIN_ENTRY_S = 10  # under --time-limit, an entry with less time than this left is not started


def entries(preset: str, part: int) -> list[Entry]:
    parts = PRESETS[preset]
    if part not in parts:
        raise SystemExit(f"preset {preset!r} has parts {sorted(parts)}, not {part}")
    return parts[part]


def run(entry: Entry, out: Path) -> dict:
    argv = [sys.executable, "-m", *(a.format(out=out) for a in entry.argv)]
    start = time.time()
    with open(out / f"{entry.name}.log", "w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        # its own process group: an entry's children (bench_sft's provider processes, compile workers) are stopped
        # with it, not left running on the GPU beside the next entry
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **entry.env},
                                cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        try:
            rc = proc.wait(timeout=entry.timeout_s)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the kernel suite then writes the cases it measured (see timing.stop_on_sigterm)
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever of the group is still there
            proc.wait()
            rc = "timeout"
    return {"entry": entry.name, "rc": rc, "seconds": round(time.time() - start, 1), "timeout_s": entry.timeout_s}


def _is_collect(entry: Entry) -> bool:
    return entry.argv[0] == "bench.kernels.collect"


def fit_to_deadline(entry: Entry, later: list[Entry], seconds_left: float) -> Entry | None:
    """``entry`` with its cap cut to the time left before a deadline (keeping back the caps of the collect entries
    still to come, the report's time and the grace after a cap), or None when too little is left to start it."""
    reserve = REPORT_S + (0 if _is_collect(entry) else STOP_GRACE_S + sum(e.timeout_s for e in later
                                                                           if _is_collect(e)))
    cap = int(min(entry.timeout_s, seconds_left - reserve))
    if cap < MIN_ENTRY_S:
        return None
    return entry if cap == entry.timeout_s else replace(entry, timeout_s=cap)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the whole group has exited
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--part", type=int, default=1, help="which call of a preset in several calls")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--list", action="store_true", help="print what the presets run and exit")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds this run may take in all (a GPU call's limit, less what ran before it): each "
                             "entry's cap is cut to what is left, and an entry with too little left is not started "
                             "(recorded as 'not run')")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="after the run, compare each result file with the one of the same name in DIR (say "
                             "bench/results) and exit 1 on any metric worse by more than --threshold")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative change --compare flags (default 5%%)")
    a = parser.parse_args(argv)
    if a.time_limit is not None and a.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {a.time_limit}")
    if a.compare is not None and not a.compare.is_dir():  # before the run, not after it
        parser.error(f"--compare: no folder {a.compare}")
    if a.list:
        for preset, parts in PRESETS.items():
            for part, todo in parts.items():
                total = sum(e.timeout_s for e in todo)
                print(f"{preset} part {part} (caps sum to {total} s):")
                for e in todo:
                    print(f"  {e.name:<36} {e.timeout_s:>4} s  python -m {' '.join(e.argv)}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    a.out = a.out.resolve()
    todo = entries(a.preset, a.part)
    results = []
    suffix = f"_{a.part}" if len(PRESETS[a.preset]) > 1 else ""
    deadline = time.monotonic() + a.time_limit if a.time_limit is not None else None
    for i, entry in enumerate(todo, 1):
        if deadline is not None:
            fitted = fit_to_deadline(entry, todo[i:], deadline - time.monotonic())
            if fitted is None:
                print(f"[{i}/{len(todo)}] {entry.name}: not run, the time limit is too near", flush=True)
                results.append({"entry": entry.name, "rc": "not run", "seconds": 0, "timeout_s": entry.timeout_s})
                (a.out / f"suite_{a.preset}{suffix}.json").write_text(json.dumps(results, indent=1))
                continue
            entry = fitted
        print(f"[{i}/{len(todo)}] {entry.name} (at most {entry.timeout_s} s)", flush=True)
        results.append(run(entry, a.out))
        print(f"    rc={results[-1]['rc']} {results[-1]['seconds']} s", flush=True)
        (a.out / f"suite_{a.preset}{suffix}.json").write_text(json.dumps(results, indent=1))
    report = subprocess.run([sys.executable, "-m", "bench.report", "--results", str(a.out)],
                            cwd=Path(__file__).resolve().parents[1])
    failed = [r["entry"] for r in results if r["rc"] != 0]
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    regressions = compare_with(a.compare, a.out, a.threshold) if a.compare is not None else 0
    return 1 if failed or report.returncode or regressions else 0


def compare_with(old_dir: Path, out: Path, threshold: float) -> int:
    """Regressions of every result file in ``out`` against its namesake in ``old_dir`` (printed); their count."""
    from bench import report

    total = 0
    for new in sorted(out.glob("*.json")):
        old = old_dir / new.name
        if old.exists() and report.load(new) is not None and report.load(old) is not None:
            total += report.print_regressions(old, new, threshold)
    return total


if __name__ == "__main__":
    sys.exit(main())
