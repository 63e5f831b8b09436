"""pytest-benchmark's JSON from the kernel suite into the result files of the other benchmarks.

    python -m pytest bench/kernels --benchmark-json OUT.json
    python -m bench.kernels.collect OUT.json --out bench/results [--report]

Writes ``kernels_<op>.json`` (the run's card, versions and commit, and one row per test: its parameters, then
``ms`` with ``ms_p20``/``ms_p80`` from CUDA events, ``wall_ms``, TFLOP/s or GB/s, ``peak_extra_GiB``) and
``kernels_<op>.md`` beside them, which ``python -m bench.report`` takes into the CSV and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("json", type=Path, help="the file of pytest --benchmark-json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--report", action="store_true", help="then regenerate the CSV, plots and RESULTS.md there")
    args = parser.parse_args(argv)
    results = timing.to_rows(json.loads(args.json.read_text()))
    for path in write(results, args.out):
        print(f"wrote {path}")
    if args.report:
        from bench import report

        report.report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
