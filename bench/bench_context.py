"""Long context: QLoRA r=32 memory and speed at 2048 x 2, and the longest batch-1 sequence that fits
under a memory cap, for stock TRL+PEFT+bitsandbytes and for fastsft, each case in its own process on one GPU.

    python -m bench.bench_context --fixed --out bench/results                     # 2048 x 2: peak memory, tokens/s
    python -m bench.bench_context --max-context --caps 16,24 --time-budget 540 --out bench/results
    python -m bench.bench_context --max-context --model tiny --cpu-fake-limit 200 --start 128 --resolution 128

Setup, shared with ``bench.bench_sft`` (whose functions build everything here): random-init Llama-3.1-8B-shaped
weights saved once in bf16 and loaded by every process in 4 bits (bitsandbytes NF4, double quantization, bf16
compute: ``fastsft.load(..., load_in_4bit=True)``'s config), LoRA r=32, alpha 32, dropout 0 on q,k,v,o,gate,up,
down, AdamW (torch), SDPA attention, bf16 autocast, non-reentrant gradient checkpointing. The model's
``max_position_embeddings`` is raised to 2^20 in the saved config (plain RoPE has no other length limit). Each
case is a real trainer run: ``trl.SFTTrainer`` (provider ``trl``: PEFT + bitsandbytes + SDPA, and TRL 1.16's own
chunked LM head and loss, which is what stock TRL trains with) or ``fastsft.SFTTrainer`` (provider ``fastsft``:
patched as that trainer patches, ``fastsft.patch`` refreshed on the PEFT model: attention, RMSNorm, LoRA and
gated-activation kernels and the fused loss; the trial rows list them), with checkpointing ``plain`` or, for
fastsft only, ``offload`` (``SFTConfig(gradient_checkpointing="offload")``: layer inputs wait in pinned host
memory) or ``offload-tiled`` (that and ``fastsft.enable_tiled_mlp``: each MLP in 8,192-token tiles, so no
[tokens, intermediate] tensor is whole at once; at 350k tokens one is 9.35 GiB, the allocation that ran out first
under the 80 GiB cap without tiling).

``--fixed``: packing, batch 2 x 2048 tokens, synthetic chat rows with the loss on the assistant tokens (as in
``bench.bench_sft``); ``bench_sft.run_one`` measures tokens/s (non-padding input tokens after the warm-up steps)
and the peak of ``torch.cuda.max_memory_allocated`` during ``train()`` (``peak_GiB``; the target's number) and of
``max_memory_reserved`` (``peak_reserved_GiB``: what the allocator held, closer to what ``nvidia-smi`` shows).

``--max-context``: for each cap C (GiB, 2^30 bytes; caps above the card's memory are clipped to it) a trial is
one fresh process that calls ``torch.cuda.set_per_process_memory_fraction(C / card memory)`` before anything is
allocated, loads the 4-bit model, and trains one step (``max_steps=1``: forward, backward, AdamW step) on one
example of exactly N tokens, batch 1, no packing: ``[bos] user [sep] assistant [eos]`` of random ids, half user,
half assistant, with the loss on every token (``--loss-on all``, the default: the LM head and loss then cover all
N positions) or on the assistant half (``--loss-on assistant``). The trial fits when the process ends without
running out of memory (``torch.OutOfMemoryError`` or an error saying "out of memory", anywhere from loading to
the optimizer step); any other failure stops that search. The cap bounds PyTorch's caching allocator only: the
CUDA context (about 0.5 GiB) comes on top, and a card sold as "80 GB" has about 79 GiB, so the 80 GiB cap is
slightly kinder than such a card. Every case's process runs with ``PYTORCH_CUDA_ALLOC_CONF`` from
``--alloc-conf`` (default ``expandable_segments:True``, for both providers; recorded in the JSON): with PyTorch's
default allocator a fastsft trial of 261k tokens reserved the whole 80 GiB at a peak of 61.8 GiB allocated, and
the one of 350k failed with 5.5 GiB reserved but free. Offloading needs pinned host memory of 32 layers x N x
4096 x 2 bytes (85 GiB at 350k tokens).

The search (:func:`search_max_tokens`) moves N from ``--start`` by ``--step`` (default ``--start``: N doubles), the
step doubling after each trial, until a trial fails, then bisects until the
longest fitting and the shortest failing N are at most ``--resolution`` apart. Fewer trials: caps run in
increasing order and what fit under a smaller cap is known to fit under a larger one; from the second cap on, the
first N is predicted from a straight line through the successful trials' (N, peak reserved memory), and the
search gallops from there (steps of about 3% that double). ``--time-budget`` (seconds, the whole run) starts no
trial that would end after it (estimated by the longest trial so far) and stops a trial still running when it
ends (counted as unknown); each row then keeps the best known fitting and failing N, and ``stopped`` says why the
search ended (``resolved``, ``limit``, ``nothing fits``, ``budget``, ``inconclusive``). ``--resume`` continues
from earlier runs' JSONs, so one search can span several calls and searches run side by side (one cap per GPU)
merge into one table. Rows: ``fitted_tokens``, ``failed_tokens``, ``trials`` (all of the search's trials, earlier
runs' included), ``seconds``, and from the trial at ``fitted_tokens``: peak reserved memory and
the wall time of its one ``train()`` (``step_s``; includes setting up the dataloader and optimizer); every trial
is listed in the JSON (``trial_log``).

Targets, checked from the measured rows: fastsft 8B QLoRA at 2048 x 2 in at most 7 GiB peak allocated
memory (best fastsft mode), and at least 350,000 tokens fitting under the 80 GiB cap (met when a trial of N >=
350,000 fit, not met when one of N <= 350,000 failed, undecided otherwise). ``--model tiny`` without a GPU runs
the same processes on the CPU (no 4-bit, no memory numbers, targets not evaluated); ``--cpu-fake-limit`` is for
tests only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import bench_sft

RANK = 32
MAX_POSITIONS = 1 << 20
CAPS_GIB = (16, 24, 40, 80)
PROVIDERS = ("trl", "fastsft")
# offload first: the long-context configuration, and the target's; "offload-tiled" adds the sequence-tiled MLP
# (fastsft.enable_tiled_mlp: no [tokens, intermediate] tensor whole at once; it changes nothing at or below its
# 8,192-token tiles)
FASTSFT_MODES = ("offload", "plain", "offload-tiled")
FIXED_MODES = ("offload", "plain")  # at 2 x 2048 tokens the tiles would change nothing
CONTEXT_MODES = ("offload-tiled", "offload")
# With the default allocator, large [tokens, ...] tensors of varying sizes leave cached blocks that fit nothing later
# (a 261k-token trial reserved all of 80 GiB at 61.8 GiB allocated); expandable segments grow one mapped range.
ALLOC_CONF = "expandable_segments:True"
TARGET_PEAK_GIB = 7.0
TARGET_TOKENS, TARGET_CAP_GIB = 350_000, 80
FIXED_COLUMNS = ["provider", "checkpointing", "batch", "max_length", "tokens_per_s", "peak_GiB", "peak_reserved_GiB",
                 "first_losses", "wall_s", "error"]
CONTEXT_COLUMNS = ["provider", "checkpointing", "cap_GiB", "fitted_tokens", "failed_tokens", "stopped", "trials",
                   "seconds", "peak_reserved_GiB", "step_s", "error"]
ROOT = Path(__file__).resolve().parents[1]


# --- the search ----------------------------------------------------------------------------------------------------

@dataclass
class Search:
    """Outcome of :func:`search_max_tokens`: the longest N known to fit and the shortest known not to (None where
    none is known), the trials run (``{"tokens", "fits", "seconds"}``) and why the search ended."""

    fitted: int | None = None
    failed: int | None = None
    trials: list[dict] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0


def search_max_tokens(fits: Callable[[int], bool | None], start: int, resolution: int, limit: int, budget_s: float,
                      *, lower: int | None = None, upper: int | None = None, step: int | None = None,
                      clock: Callable[[], float] = time.monotonic) -> Search:
    """The longest N <= ``limit`` with ``fits(N)``, for a predicate that is monotone (true up to some N, false
    after), to within ``resolution``.

    From ``start`` the search moves by ``step`` (default ``start``, so it doubles), the step doubling after each
    trial, up while trials fit and down while they fail, clipped to ``limit``; once a fitting and a failing N are
    known it bisects between them (points ``resolution`` apart from the fitting one) until they are at most
    ``resolution`` apart. ``lower``/``upper`` are N already known to fit/fail (not tried again). No trial starts
    when the elapsed time plus the longest trial so far would pass ``budget_s``. ``fits`` returning None (unknown)
    ends the search."""
    if min(start, resolution, limit) < 1:
        raise ValueError(f"start, resolution and limit must be positive, got {start}, {resolution}, {limit}")
    began = clock()
    s = Search(fitted=lower, failed=upper)
    step = step or start
    n = start
    while True:
        lo, hi = s.fitted or 0, s.failed
        if s.fitted is not None and s.fitted >= limit:
            s.stopped = "limit"
            break
        if hi is not None and hi - lo <= resolution:
            s.stopped = "resolved" if s.fitted is not None else "nothing fits"
            break
        longest = max((t["seconds"] for t in s.trials), default=0.0)
        if clock() - began + longest >= budget_s:
            s.stopped = "budget"
            break
        # keep the next point strictly between what is known; outside it, bisect (or stop at the limit)
        if hi is None:
            n = min(max(n, lo + step), limit) if n <= lo else min(n, limit)
        elif not lo < n < hi:
            n = lo + max(1, (hi - lo) // 2 // resolution) * resolution
        t0 = clock()
        ok = fits(n)
        s.trials.append({"tokens": n, "fits": ok, "seconds": clock() - t0})
        if ok is None:
            s.stopped = "inconclusive"
            break
        if ok:
            s.fitted = n
            n = n + step
        else:
            s.failed = n
            n = n - step
        step *= 2
    s.seconds = clock() - began
    return s


def predicted_tokens(points: list[tuple[int, float]], cap_bytes: float) -> int | None:
    """N at which a straight line through ``points`` ((N, peak bytes) of fitting trials) reaches ``cap_bytes``;
    None without two distinct N or with a line that does not rise."""
    if len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_b = sum(b for _, b in points) / len(points)
    slope = (sum((n - mean_n) * (b - mean_b) for n, b in points) / sum((n - mean_n) ** 2 for n, _ in points))
    if slope <= 0:
        return None
    return int(mean_n + (cap_bytes - mean_b) / slope)


# --- one case, in a child process ----------------------------------------------------------------------------------

def long_row(n: int, vocab: int, loss_on: str = "all", seed: int = 0) -> dict:
    """One example of exactly ``n`` tokens: [bos] user [sep] assistant [eos], random ids, user and assistant
    halves; the assistant mask (which TRL turns into the labels) covers every token or the assistant half."""
    import numpy as np

    if n < 4:
        raise ValueError(f"an example needs at least 4 tokens, got {n}")
    rng = np.random.default_rng(seed)
    user = (n - 3) // 2
    ids = [1] + rng.integers(8, vocab, user).tolist() + [3] + rng.integers(8, vocab, n - 3 - user).tolist() + [2]
    mask = [1] * n if loss_on == "all" else [0] * (user + 2) + [1] * (n - user - 2)
    return {"input_ids": ids, "assistant_masks": mask}


def _namespace(spec: dict, **overrides) -> argparse.Namespace:
    """The argument namespace bench_sft.make_trainer / run_one read."""
    checkpointing = "offload" if spec["checkpointing"] in ("offload", "offload-tiled") else True
    fields = {"model": spec["model"], "checkpoint": spec["checkpoint"] and Path(spec["checkpoint"]),
              "qlora": spec["checkpoint"] is not None, "batch": spec.get("batch", 1),
              "max_length": spec.get("max_length", 2048), "packing": True, "warmup": spec.get("warmup", 1),
              "steps": spec.get("steps", 1), "checkpointing": checkpointing, "rank": RANK,
              "tiled_mlp": spec["checkpointing"] == "offload-tiled"}
    return argparse.Namespace(**{**fields, **overrides})


def _is_oom(error: BaseException) -> bool:
    import torch

    # a cuBLAS workspace that cannot be allocated under the cap is out of memory too
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def fixed_case(spec: dict) -> dict:
    """One provider at a fixed batch and length: bench_sft.run_one with LoRA r=32, plus the reserved peak."""
    import torch

    row = bench_sft.run_one(spec["provider"], _namespace(spec))
    row.update(checkpointing=spec["checkpointing"], rank=RANK)
    if torch.cuda.is_available():  # run_one reset the peaks before train()
        row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    return row


def context_trial(spec: dict) -> dict:
    """One training step on one example of ``spec["tokens"]`` tokens under ``spec["cap_GiB"]``: does it fit?"""
    import torch

    from fastsft.tiled_mlp import tiled_mlp_count

    cuda = torch.cuda.is_available()
    if cuda and spec.get("cap_GiB"):
        # before the first allocation: the cap must hold for everything the process does
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_GiB"] * 2**30 / total))
    n = spec["tokens"]
    a = _namespace(spec, batch=1, max_length=n, packing=False, warmup=0, steps=1)
    # one step needs one row
    rows = [long_row(n, bench_sft.MODELS[spec["model"]][5], spec.get("loss_on", "all"))]
    result = {"tokens": n, "fits": True}
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = bench_sft.make_trainer(spec["provider"], a, out, [], rows=rows)
            # what was trained: the adapters' rank and, for fastsft, the kernels in place
            result["rank"] = trainer.model.peft_config["default"].r
            report = getattr(trainer, "patch_report", None)
            result["patched"] = sorted(report.patched) if report is not None else None
            result["tiled_mlps"] = tiled_mlp_count(trainer.model)
            start = time.perf_counter()
            trainer.train()
            if cuda:
                torch.cuda.synchronize()
            result["step_s"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - only an out-of-memory error is an answer; anything else is re-raised
        if not _is_oom(error):
            raise
        result.update(fits=False, error=str(error).strip().splitlines()[0][:300] if str(error).strip() else "OOM")
    if cuda:  # whole process, loading included
        result["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def card() -> dict:
    """Whether there is a GPU, and its name and memory: asked of a child process, so that this one never holds a
    CUDA context beside the cases'."""
    out = bench_sft._in_child("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda': c, "
                              "'name': torch.cuda.get_device_name() if c else None, "
                              "'total': torch.cuda.get_device_properties(0).total_memory if c else 0}))")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"cuda": False, "name": None, "total": 0}


def run_case(spec: dict, timeout: float | None = None) -> dict:
    """``spec`` in a fresh process (a fresh CUDA context, allocator and memory cap). An error, a crash or the
    timeout come back as a row with ``error``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.bench_context", "--case", json.dumps(spec), "--result-json", f.name]
        env = os.environ.copy()
        if spec.get("alloc_conf"):  # read when CUDA starts: it must be in the process's environment
            env["PYTORCH_CUDA_ALLOC_CONF"] = spec["alloc_conf"]
        elif "alloc_conf" in spec:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {timeout:.0f} s (time budget)", "wall_s": time.time() - start}
        if proc.returncode == 0:
            row = json.loads(Path(f.name).read_text())
        else:
            lines = proc.stderr.strip().splitlines()
            row = {"error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
            sys.stderr.write(proc.stderr[-3000:])
    row["wall_s"] = time.time() - start
    return row


# --- the two modes -------------------------------------------------------------------------------------------------

def variants(a: argparse.Namespace) -> list[tuple[str, str]]:
    """(provider, checkpointing) pairs: stock TRL with plain checkpointing, fastsft with each of its modes."""
    out = []
    for provider in a.providers.split(","):
        if provider not in PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
        modes = a.fastsft_modes.split(",") if provider == "fastsft" else ["plain"]
        for mode in modes:
            if mode not in FASTSFT_MODES:
                raise SystemExit(f"--fastsft-modes: unknown mode {mode!r} (known: {', '.join(FASTSFT_MODES)})")
            out.append((provider, mode))
    return out


def run_fixed(a: argparse.Namespace, checkpoint: str | None) -> list[dict]:
    rows = []
    for provider, mode in variants(a):
        spec = {"kind": "fixed", "provider": provider, "checkpointing": mode, "model": a.model,
                "alloc_conf": a.alloc_conf,
                "checkpoint": checkpoint, "batch": a.batch, "max_length": a.max_length, "warmup": a.warmup,
                "steps": a.steps}
        row = {"mode": "fixed", "provider": provider, "checkpointing": mode, **run_case(spec)}
        print(row, flush=True)
        rows.append(row)
    return rows


def _resumed(paths: list[Path] | None) -> dict:
    """(provider, checkpointing, cap) -> an earlier run's max-context row. Of several runs (searches split across
    GPUs or calls, each file also carrying the rows it resumed from), the row with the most trials wins: a
    continued search's log holds its earlier one; on a tie, the later file's."""
    earlier: dict = {}
    for path in paths or []:
        for r in json.loads(path.read_text())["rows"]:
            if r.get("mode") != "max_context":
                continue
            key = (r["provider"], r["checkpointing"], r["cap_GiB"])
            if len(r.get("trial_log", [])) >= len(earlier.get(key, {}).get("trial_log", [])):
                earlier[key] = r
    return earlier


def merged_environment(paths: list[Path]) -> dict:
    """The environment of runs merged by ``--merge``: their card and versions, which must agree, and every
    commit and date."""
    envs = [json.loads(p.read_text())["environment"] for p in paths]
    differ = {k for e in envs for k in ("card", "cuda", "versions") if e.get(k) != envs[0].get(k)}
    if differ:
        raise SystemExit(f"--merge: the runs differ in {', '.join(sorted(differ))}; merge only runs of one setup")
    dates = sorted(e["date"] for e in envs)
    return {**envs[-1], "commit": "+".join(dict.fromkeys(e["commit"] or "?" for e in envs)),
            "date": dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"}


def run_max_context(a: argparse.Namespace, checkpoint: str | None, caps: list[float], fake_limit: int | None,
                    on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Every variant's search under every cap (increasing), in one time budget; ``on_row`` gets the rows so far
    after each trial (so that a run stopped from outside leaves its results; a search still going says
    ``stopped: "running"``)."""
    deadline = time.monotonic() + a.time_budget
    earlier = _resumed(a.resume)
    rows = []

    def with_earlier(current: list[dict]) -> list[dict]:
        # searches of an earlier run that this one did not continue stay in the results
        searched = {(r["provider"], r["checkpointing"], r["cap_GiB"]) for r in current}
        return current + [r for key, r in earlier.items() if key not in searched]

    for provider, mode in variants(a):
        done: list[dict] = [t for r in earlier.values() if (r["provider"], r["checkpointing"]) == (provider, mode)
                            for t in r.get("trial_log", [])]
        for cap in caps:
            old = earlier.get((provider, mode, cap), {})
            # monotone in the cap: what fit under a smaller cap fits here, what failed under a larger one fails here
            fitted = [t["tokens"] for t in done if t.get("fits") is True and t["cap_GiB"] <= cap]
            failed = [t["tokens"] for t in done if t.get("fits") is False and t["cap_GiB"] >= cap]
            lower, upper = max(fitted, default=None), min(failed, default=None)
            start, step = a.start, a.step
            guess = predicted_tokens([(t["tokens"], t["peak_reserved_GiB"] * 2**30) for t in done
                                      if t.get("fits") and t.get("peak_reserved_GiB")], cap * 2**30)
            if guess is not None:
                start = max(a.resolution, guess // a.resolution * a.resolution)
                step = max(a.resolution, start // 32 // a.resolution * a.resolution)
            log: list[dict] = []
            began = time.monotonic()

            def row(search: Search) -> dict:
                at_fit = next((t for t in reversed(old.get("trial_log", []) + log)
                               if t.get("fits") and t["tokens"] == search.fitted), {})
                errors = [t["error"] for t in log if t.get("fits") is None and t.get("error")]
                return {"mode": "max_context", "provider": provider, "checkpointing": mode, "cap_GiB": cap,
                        "fitted_tokens": search.fitted, "failed_tokens": search.failed, "stopped": search.stopped,
                        "trials": len(old.get("trial_log", []) + log),
                        "seconds": search.seconds + old.get("seconds", 0.0),
                        "peak_reserved_GiB": at_fit.get("peak_reserved_GiB"), "step_s": at_fit.get("step_s"),
                        "error": errors[-1] if errors else None, "loss_on": a.loss_on, "resolution": a.resolution,
                        "trial_log": old.get("trial_log", []) + log}

            def fits(n: int) -> bool | None:
                if fake_limit is not None and n > fake_limit:  # tests: a pretend OOM, no process needed
                    log.append({"tokens": n, "fits": False, "error": "fake limit", "cap_GiB": cap})
                    return False
                spec = {"kind": "trial", "provider": provider, "checkpointing": mode, "model": a.model,
                        "alloc_conf": a.alloc_conf,
                        "checkpoint": checkpoint, "tokens": n, "cap_GiB": cap, "loss_on": a.loss_on}
                left = deadline - time.monotonic()
                result = run_case(spec, timeout=max(1.0, left) if math.isfinite(left) else None)
                result.setdefault("tokens", n)
                result.setdefault("fits", None)  # an error other than OOM, a crash or the timeout: unknown
                result["cap_GiB"] = cap
                print(f"{provider}/{mode} cap {cap:g} GiB: {result}", flush=True)
                log.append(result)
                now = Search(fitted=max([lower or 0] + [t["tokens"] for t in log if t["fits"] is True]) or None,
                             failed=min([t["tokens"] for t in log if t["fits"] is False] + [upper or math.inf]),
                             stopped="running", seconds=time.monotonic() - began)
                now.failed = None if now.failed == math.inf else now.failed
                on_row(with_earlier(rows + [row(now)]))
                return result["fits"]

            search = search_max_tokens(fits, start, a.resolution, a.limit, deadline - time.monotonic(),
                                       lower=lower, upper=upper, step=step)
            done.extend(log)
            rows.append(row(search))
            on_row(with_earlier(rows))
    return with_earlier(rows)


# --- targets -------------------------------------------------------------------------------------------------------

def targets(fixed: list[dict], context: list[dict], measured: bool, fixed_measured: bool | None = None) -> dict:
    """The long-context targets from the rows: met True/False, or None when the rows cannot decide or are not the real
    8B QLoRA on a GPU (``measured`` False; ``fixed_measured``, default ``measured``: the same for the fixed rows,
    which must also be at 2048 x 2)."""
    fixed_measured = measured if fixed_measured is None else fixed_measured
    out = {}
    peaks = [(r["peak_GiB"], r["checkpointing"]) for r in fixed if r["provider"] == "fastsft" and r.get("peak_GiB")]
    if fixed:
        best = min(peaks, default=None)
        out["peak_2048x2"] = {"target_GiB": TARGET_PEAK_GIB, "fastsft_peak_GiB": best and best[0],
                              "checkpointing": best and best[1],
                              "met": (best[0] <= TARGET_PEAK_GIB) if best and fixed_measured else None}
    at_cap = [r for r in context if r["provider"] == "fastsft" and r["cap_GiB"] == TARGET_CAP_GIB]
    if context:
        fitted = max((r["fitted_tokens"] or 0 for r in at_cap), default=0)
        failed = [r["failed_tokens"] for r in at_cap if r["failed_tokens"] is not None]
        met = True if fitted >= TARGET_TOKENS else False if failed and min(failed) <= TARGET_TOKENS else None
        out["context_80"] = {"target_tokens": TARGET_TOKENS, "cap_GiB": TARGET_CAP_GIB,
                             "fastsft_fitted_tokens": fitted or None, "met": met if measured else None}
    return out


# --- command line --------------------------------------------------------------------------------------------------

def _checkpoint(a: argparse.Namespace, tmp: str) -> str:
    """The random bf16 model, saved once (or found in ``--checkpoint-dir``), with the positions raised."""
    path = Path(a.checkpoint_dir or tmp)
    config = path / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("max_position_embeddings") != MAX_POSITIONS:
        bench_sft._in_child(f"from bench.bench_sft import save_random_checkpoint; "
                            f"save_random_checkpoint({a.model!r}, {str(path)!r}, {MAX_POSITIONS})")
        if not config.exists():
            raise SystemExit(f"could not save the random {a.model} model to {path} (see the error above)")
    return str(path)


def merge(a: argparse.Namespace) -> None:
    """One table of max-context searches run apart (one cap per GPU, or over several calls)."""
    from bench import harness

    first = json.loads(a.resume[0].read_text())
    rows = sorted(_resumed(a.resume).values(), key=lambda r: (PROVIDERS.index(r["provider"]), r["checkpointing"],
                                                              r["cap_GiB"]))
    measured = first.get("measured")
    if measured is None:  # runs before it was stored: all on an NVIDIA card with the 8B model
        measured = first["environment"]["card"].startswith("NVIDIA") and first.get("fake_limit") is None
    # runs before titles were stored: every GPU run so far was the 8B QLoRA one
    title = first.get("title") or (f"llama-8b, QLoRA (NF4), r={first['rank']}, checkpointing, one step, loss on "
                                   f"{rows[0]['loss_on']} tokens")
    harness.write(rows, a.out, a.name or "context_llama-8b_max", CONTEXT_COLUMNS,
                  f"Longest batch-1 sequence under a memory cap: {title}",
                  extra={**{k: first.get(k) for k in ("rank", "card_total_GiB", "alloc_conf", "fake_limit")},
                         "title": title,
                         "caps_GiB": sorted({r["cap_GiB"] for r in rows}),
                         "merged_from": [p.name for p in a.resume], "targets": targets([], rows, measured)},
                  env=merged_environment(a.resume))
    print(json.dumps(targets([], rows, measured), indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="peak memory and tokens/s at --batch x --max-length")
    parser.add_argument("--max-context", action="store_true", help="the longest batch-1 sequence under each cap")
    parser.add_argument("--model", choices=list(bench_sft.MODELS), default="llama-8b")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--fastsft-modes", default=None,
                        help=f"fastsft's modes, of {', '.join(FASTSFT_MODES)} (default: --fixed "
                             f"{','.join(FIXED_MODES)}; --max-context {','.join(CONTEXT_MODES)})")
    parser.add_argument("--batch", type=int, default=2, help="--fixed")
    parser.add_argument("--max-length", type=int, default=2048, help="--fixed: tokens per packed sequence")
    parser.add_argument("--warmup", type=int, default=2, help="--fixed")
    parser.add_argument("--steps", type=int, default=5, help="--fixed: timed steps after the warm-up")
    parser.add_argument("--caps", default=",".join(map(str, CAPS_GIB)), help="memory caps in GiB")
    parser.add_argument("--start", type=int, default=8192, help="first N of a search without a prediction")
    parser.add_argument("--resolution", type=int, default=1024, help="tokens between fitting and failing N at the end")
    parser.add_argument("--limit", type=int, default=MAX_POSITIONS, help="the longest N tried")
    parser.add_argument("--time-budget", type=float, default=math.inf,
                        help="seconds for all searches together; then each keeps its best known bounds")
    parser.add_argument("--loss-on", choices=["all", "assistant"], default="all",
                        help="tokens carrying the loss in a max-context trial")
    parser.add_argument("--merge", action="store_true",
                        help="with --resume: write their searches as one table (card, versions and commits from the "
                             "files), run nothing")
    parser.add_argument("--step", type=int, default=None,
                        help="the search's first move from --start (default: --start, so N doubles)")
    parser.add_argument("--resume", type=Path, nargs="+",
                        help="earlier --max-context JSONs: continue their searches (and merge their rows)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="keep the random bf16 model here (reused when it is there already)")
    parser.add_argument("--alloc-conf", default=ALLOC_CONF,
                        help=f"PYTORCH_CUDA_ALLOC_CONF of every case's process, both providers (default "
                             f"{ALLOC_CONF!r}; '' for PyTorch's default allocator)")
    parser.add_argument("--cpu-fake-limit", type=int,
                        help="FOR TESTS ONLY: every N above this counts as out of memory without running")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default=None, help="result file prefix (default: context_<model>)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case's spec, as JSON
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.case:
        spec = json.loads(a.case)
        a.result_json.write_text(json.dumps(fixed_case(spec) if spec["kind"] == "fixed" else context_trial(spec)))
        return
    if a.merge:
        if not a.resume:
            parser.error("--merge needs the runs' JSONs in --resume")
        merge(a)
        return
    if not (a.fixed or a.max_context):
        parser.error("say what to run: --fixed, --max-context or both")
    if a.fastsft_modes is None:
        wanted = (CONTEXT_MODES if a.max_context else ()) + (FIXED_MODES if a.fixed else ())
        a.fastsft_modes = ",".join(dict.fromkeys(wanted))
    variants(a)  # unknown providers or modes fail before any work
    if a.step is not None and a.step < 1:
        parser.error(f"--step must be a positive number of tokens, got {a.step}")

    from bench import harness

    gpu = card()
    if not gpu["cuda"] and a.model != "tiny":
        parser.error("needs a CUDA GPU (bitsandbytes 4-bit); --model tiny runs on the CPU")
    if a.max_context and not gpu["cuda"] and a.cpu_fake_limit is None:
        parser.error("--max-context without a GPU has no memory to run out of: give --cpu-fake-limit (tests)")
    caps = sorted({float(c) for c in a.caps.split(",")})
    if gpu["cuda"]:
        caps = sorted({min(c, gpu["total"] / 2**30) for c in caps})
    caps = [int(c) if c == int(c) else round(c, 2) for c in caps]
    measured = gpu["cuda"] and a.model == "llama-8b" and a.cpu_fake_limit is None
    prefix = a.name or f"context_{a.model}"
    title = f"{a.model}, {'QLoRA (NF4)' if gpu['cuda'] else 'LoRA (CPU, no 4-bit)'}, r={RANK}, checkpointing"
    # the 7 GiB target is for 2048 x 2 only
    fixed_measured = measured and (a.batch, a.max_length) == (2, 2048)
    extra = {"rank": RANK, "card_total_GiB": gpu["total"] / 2**30, "fake_limit": a.cpu_fake_limit,
             "alloc_conf": a.alloc_conf or None}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(a, tmp) if gpu["cuda"] else None
        if a.max_context and checkpoint is None:
            a.limit = min(a.limit, 8192)  # the unsaved CPU model keeps bench_sft's 8192 positions
        fixed = []
        if a.fixed:
            fixed = run_fixed(a, checkpoint)
            harness.write(fixed, a.out, f"{prefix}_fixed", FIXED_COLUMNS,
                          f"Fixed length: {title}, packing, batch {a.batch} x {a.max_length}",
                          extra={**extra, "targets": targets(fixed, [], fixed_measured)})

        def write_context(rows: list[dict]) -> None:
            context_title = f"{title}, one step, loss on {a.loss_on} tokens"
            harness.write(rows, a.out, f"{prefix}_max", CONTEXT_COLUMNS,
                          f"Longest batch-1 sequence under a memory cap: {context_title}",
                          extra={**extra, "title": context_title, "measured": measured, "caps_GiB": caps,
                                 "start": a.start, "resolution": a.resolution, "limit": a.limit,
                                 "time_budget_s": a.time_budget if math.isfinite(a.time_budget) else None,
                                 "targets": targets(fixed, rows, measured, fixed_measured)})

        if a.max_context:
            rows = run_max_context(a, checkpoint, caps, a.cpu_fake_limit, write_context)
            write_context(rows)
        print(json.dumps(targets(fixed, rows if a.max_context else [], measured, fixed_measured), indent=1))


if __name__ == "__main__":
    main()
