"""Results report: every benchmark JSON under a folder into one CSV, plots and a generated RESULTS.md.

    python -m bench.report [--results bench/results]          # CSV, plots, RESULTS.md (never edit it by hand)
    python -m bench.report --compare OLD.json NEW.json [--threshold 0.05]

``--compare`` matches rows of two runs of one benchmark by their configuration and provider and flags every
metric that got worse by more than the threshold (slower times, lower throughput, more memory); it exits 1 when
any did, so a regression is visible in a script.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

# Numeric fields that describe the case rather than measure it.
CONFIG_KEYS = {"tokens", "chunk", "head_dim", "hq", "hkv", "num_seqs", "batch", "max_length", "steps_timed", "rank",
               "hidden", "intermediate", "rows", "cols", "seq"}
# Measured fields and whether larger is better.
HIGHER_IS_BETTER = {"tokens_per_s", "median_step_tokens_per_s", "TFLOP/s", "GB/s", "device_TFLOP/s", "device_GB/s",
                    "of_copy_bw", "device_of_copy_bw", "fwd_tflops", "fwd_bwd_tflops", "gbps", "bandwidth_frac", "mfu",
                    "hfu"}
LOWER_IS_BETTER_HINTS = ("ms", "GiB", "bytes", "vs_floor", "_s")
# Spreads, the card's reference rates, bookkeeping of the kernel suite (rounds, ring) and the model's FLOP count.
SKIP_METRICS = {"ms_p20", "ms_p80", "matmul_tflops", "floor_ms", "wall_s", "copy_GBps", "rounds", "ring",
                "gflop_per_token", "hardware_gflop_per_token"}
# Measured values that are not one number (each step's time, the first losses, fallbacks): not part of a row's
# configuration, so two runs of one configuration match in --compare.
MEASURED_OTHER = {"step_ms", "first_losses", "fallbacks", "error", "memory", "captured_layers", "versions",
                  "categories_GiB", "trainer_report"}
HEADLINE = {"file": "sft_llama-8b_packing.json", "provider": "fastsft", "tokens_per_s": 11_000, "peak_GiB": 16.0}


def load(path: Path) -> tuple[dict, list[dict]] | None:
    """A result file's (environment, rows); None for other JSON in the folder (tables, suite records, raw dumps)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    env = data.get("environment") or {"card": data.get("gpu"), "versions": {"torch": data.get("torch")},
                                      "commit": data.get("commit")}
    return env, data.get("rows", [])


def split(row: dict) -> tuple[dict, dict]:
    """(configuration, metrics) of a result row."""
    config, metrics = {}, {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in CONFIG_KEYS:
            config[key] = value
        elif key not in SKIP_METRICS:
            metrics[key] = value
    return config, metrics


def _label(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if k != "provider" and k not in MEASURED_OTHER)


def write_csv(results: dict[str, tuple[dict, list[dict]]], path: Path) -> int:
    n = 0
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "card", "commit", "date", "torch", "triton", "transformers", "peft", "trl",
                    "liger-kernel", "provider", "config", "metric", "value"])
        for name, (env, rows) in sorted(results.items()):
            v = env.get("versions", {})
            for row in rows:
                config, metrics = split(row)
                for metric, value in metrics.items():
                    w.writerow([name, env.get("card"), env.get("commit"), env.get("date"), v.get("torch"),
                                v.get("triton"), v.get("transformers"), v.get("peft"), v.get("trl"),
                                v.get("liger-kernel"), row.get("provider", row.get("part")), _label(config), metric,
                                value])
                    n += 1
    return n


def _main_metric(rows: list[dict]) -> str | None:
    for metric in ("tokens_per_s", "fwd_bwd_ms", "ms"):
        if any(metric in r for r in rows):
            return metric
    return None


# axis labels with units, and which way is better
AXIS = {"tokens_per_s": "tokens/s (higher is better)", "ms": "time, ms (lower is better)",
        "fwd_bwd_ms": "forward + backward, ms (lower is better)", "peak_GiB": "peak memory, GiB (lower is better)",
        "peak_extra_GiB": "peak memory above the inputs, GiB (lower is better)"}
LOG_SCALE_SPAN = 30  # a log axis when the largest bar is more than this many times the smallest


def axis_label(metric: str) -> str:
    return AXIS.get(metric, metric.replace("_", " "))


def case_labels(configs: list[dict]) -> list[str]:
    """A readable label per case: only the settings that differ between the cases, as ``name value``
    (``name`` for a true flag, ``no name`` for a false one), one per line."""
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in MEASURED_OTHER
            and len({repr(c.get(k)) for c in configs}) > 1]

    def word(key, value):
        name = key.replace("_", " ")
        if isinstance(value, bool):
            return name if value else f"no {name}"
        if isinstance(value, (list, tuple)):  # a case given as its parts: ["dense", 1024]
            return " ".join(str(v) for v in value)
        if isinstance(value, int) and abs(value) >= 10_000:
            value = f"{value:,}"
        return str(value) if key == "run" else f"{name} {value}"

    return ["\n".join(word(k, c[k]) for k in keys if k in c) or "all" for c in configs]


def log_scale(values) -> bool:
    positive = [v for v in values if v and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SCALE_SPAN


def plot(name: str, rows: list[dict], out_dir: Path, env: dict | None = None) -> list[Path]:
    """Grouped bars per case (x) and provider (colour) for the main time metric and for peak memory; the title names
    the card and commit (``env``), the axis the unit, the cases by the settings that differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    key = "provider" if any("provider" in r for r in rows) else "part"
    env = env or {}
    where = ", ".join(str(x) for x in (env.get("card"), env.get("commit") and f"commit {env['commit']}") if x)
    for metric in filter(None, [_main_metric(rows), "peak_extra_GiB", "peak_GiB"]):
        measured = [r for r in rows if metric in r]
        if not measured:
            continue
        configs = [{k: v for k, v in split(r)[0].items() if k != key} for r in measured]
        ids = [_label(c) for c in configs]
        cases = list(dict.fromkeys(ids))
        labels = dict(zip(ids, case_labels(configs)))
        providers = list(dict.fromkeys(str(r.get(key)) for r in measured))
        width = 0.8 / max(1, len(providers))
        fig, ax = plt.subplots(figsize=(min(16, max(6, 0.6 * len(cases) * max(1, len(providers)))), 4))
        for i, provider in enumerate(providers):
            values = []
            for case in cases:
                match = [r[metric] for r, case_id in zip(measured, ids) if str(r.get(key)) == provider
                         and case_id == case]
                values.append(match[0] if match else 0.0)
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=provider)
        if log_scale([r[metric] for r in measured]):
            ax.set_yscale("log")
        ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels([labels[c] for c in cases], fontsize=7)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{name.replace('_', ' ')}" + (f" ({where})" if where else ""), fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}_{metric.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def headline(results) -> list[str]:
    entry = results.get(HEADLINE["file"].removesuffix(".json"))
    lines = ["## Distance to the headline goal", "",
             f"Goal: Llama-3.1-8B-shaped `fastsft.SFTTrainer` with packing at {HEADLINE['tokens_per_s']:,} tok/s or "
             f"more on an H200 at no more than {HEADLINE['peak_GiB']:.0f} GiB peak.", ""]
    if entry is None:
        return lines + ["Not measured yet: no `" + HEADLINE["file"] + "` in this folder.", ""]
    env, rows = entry
    ours = [r for r in rows if r.get("provider") == HEADLINE["provider"] and "tokens_per_s" in r]
    if not ours:
        return lines + [f"The run on {env.get('card')} has no successful fastsft row.", ""]
    r = ours[0]
    lines.append(f"Measured on {env.get('card')} (commit {env.get('commit')}): {r['tokens_per_s']:,.0f} tok/s "
                 f"({r['tokens_per_s'] / HEADLINE['tokens_per_s']:.0%} of the goal), "
                 f"peak {r.get('peak_GiB', 0):.1f} GiB{_utilization(r)}.")
    for other in rows:
        if other is not r and "tokens_per_s" in other:
            lines.append(f"- {other['provider']} in the same run: {other['tokens_per_s']:,.0f} tok/s, "
                         f"peak {other.get('peak_GiB', 0):.1f} GiB{_utilization(other)}")
    return lines + [""]


def _utilization(row: dict) -> str:
    """MFU and HFU as bench_sft measured them (absent in older results)."""
    parts = [f"{key.upper()} {row[key]:.0%}" for key in ("mfu", "hfu") if isinstance(row.get(key), (int, float))]
    return ", " + ", ".join(parts) if parts else ""


def report(results_dir: Path) -> Path:
    results = {p.stem: r for p in sorted(results_dir.glob("*.json")) if (r := load(p)) is not None}
    plots_dir = results_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    n = write_csv(results, results_dir / "all_rows.csv")
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench.report` from the JSON files beside it; do not edit by hand. Compare only "
             "rows of one run (one card, one commit).", ""]
    lines += headline(results)
    for name, (env, rows) in results.items():
        table = results_dir / f"{name}.md"
        lines.append(f"## {name}")
        lines.append("")
        if table.exists():
            lines += table.read_text().splitlines()[1:]  # without its own title
        else:
            lines.append(f"{env.get('card')}, commit {env.get('commit')}: {len(rows)} rows (see {name}.json)")
        for path in plot(name, rows, plots_dir, env):
            lines.append(f"![{path.stem}](plots/{path.name})")
        lines.append("")
    out = results_dir / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: {len(results)} benchmarks, {n} CSV rows")
    return out


def _worse(metric: str, old: float, new: float, threshold: float) -> bool:
    if old == 0:
        return False
    change = (new - old) / abs(old)
    if metric in HIGHER_IS_BETTER:
        return change < -threshold
    if metric.endswith(LOWER_IS_BETTER_HINTS) or "ms" in metric.split("_"):  # a time: step_ms_median, ...
        return change > threshold
    return False


def compare(old_path: Path, new_path: Path, threshold: float) -> list[str]:
    """Regressions of ``new`` against ``old``, one line each."""
    loaded = [load(p) for p in (old_path, new_path)]
    for path, result in zip((old_path, new_path), loaded):
        if result is None:
            raise SystemExit(f"{path} is not a benchmark result (no 'rows' list)")
    (_, old_rows), (_, new_rows) = loaded

    def key(row):
        config, _ = split(row)
        return json.dumps({k: v for k, v in config.items() if k not in MEASURED_OTHER}, sort_keys=True, default=str)

    old = {key(r): r for r in old_rows}
    found = []
    for row in new_rows:
        before = old.get(key(row))
        if before is None:
            continue
        _, metrics = split(row)
        for metric, value in metrics.items():
            if metric in before and isinstance(before[metric], (int, float)) and _worse(metric, before[metric], value,
                                                                                        threshold):
                found.append(f"{_label(split(row)[0])} {row.get('provider', '')}: {metric} {before[metric]:.4g} -> "
                             f"{value:.4g} ({(value - before[metric]) / abs(before[metric]):+.1%})")
    return found


def print_regressions(old_path: Path, new_path: Path, threshold: float) -> int:
    """:func:`compare`'s lines printed, one ``REGRESSION`` line each, then a count; returns the count."""
    regressions = compare(old_path, new_path, threshold)
    for line in regressions:
        print("REGRESSION", line)
    print(f"{new_path.name} against {old_path}: {len(regressions)} regression(s) beyond {threshold:.0%}")
    return len(regressions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--threshold", type=float, default=0.05, help="relative change that counts (default 5%%)")
    args = parser.parse_args(argv)
    if args.compare:
        return 1 if print_regressions(*args.compare, args.threshold) else 0
    report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
