"""pytest-benchmark's JSON from the kernel suite into the result files of the other benchmarks.

    python -m pytest bench/kernels --benchmark-json OUT.json
    python -m bench.kernels.collect OUT.json [MORE.json ...] --out bench/results [--report]

Writes ``kernels_<op>.json`` (the run's card, versions and commit, and one row per test: its parameters, then
``ms`` with ``ms_p20``/``ms_p80`` from CUDA events, ``wall_ms``, TFLOP/s or GB/s, ``peak_extra_GiB``) and
``kernels_<op>.md`` beside them, which ``python -m bench.report`` takes into the CSV and RESULTS.md. Several
files (one per module, as the full preset writes them) are collected together; one that is missing or unreadable
(its module ran out of time) is named on stderr and makes the exit status 1, after the others are written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import harness
from bench.kernels import timing


def write(results: dict[str, tuple[dict, list[dict]]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, (env, rows) in sorted(results.items()):
        name = f"kernels_{group}"
        (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        columns = list(dict.fromkeys(k for row in rows for k in row))
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
        lines = [f"# Kernel suite: {group}", "", f"{env.get('card')}; {versions}; commit {env.get('commit')}; "
                 f"{env.get('date')}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(harness._fmt(row.get(c)) for c in columns) + " |" for row in rows]
        (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
        written.append(out_dir / f"{name}.json")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, nargs="+", help="the file(s) of pytest --benchmark-json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--report", action="store_true", help="then regenerate the CSV, plots and RESULTS.md there")
    args = parser.parse_args(argv)
    results, missing = {}, []
    for path in args.json:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # a module that ran out of time writes no (or a partial) file
            missing.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        for group, (env, rows) in timing.to_rows(data).items():
            if group in results:
                raise SystemExit(f"{path}: group {group!r} is in an earlier file too")
            results[group] = (env, rows)
    for path in write(results, args.out):
        print(f"wrote {path}")
    for line in missing:
        print(f"not collected: {line}", file=sys.stderr)
    if args.report:
        from bench import report

        report.report(args.out)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
