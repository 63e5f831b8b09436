"""Shared benchmark plumbing: environment rows, GPU timing, peak memory, result files.

Timing follows ../shared METHOD: CUDA events around the region (``triton.testing.do_bench``), warm-up first,
median with p20/p80 of many runs. Memory is the peak allocated during one call minus what was allocated before
it (the inputs), after a reset of the peak counter.
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


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


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
