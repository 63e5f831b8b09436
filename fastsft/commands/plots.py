"""The pictures the commands write: a run's loss curve (``fastsft sft``), and the demo's patched-vs-stock losses,
speed and memory (``fastsft demo``). PNG through matplotlib's file backend; None (and one log line) without
matplotlib."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("fastsft")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot")
        return None
    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(ax, points, label):
    from matplotlib.ticker import MaxNLocator

    ax.plot(*zip(*points), marker="o" if len(points) < 40 else None, markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def loss_plot(log_history: list[dict], path: Path, title: str) -> Path | None:
    """The training (and evaluation) loss by optimizer step into ``path``; None without logged losses."""
    train = [(log["step"], log["loss"]) for log in log_history if "loss" in log and "step" in log]
    evals = [(log["step"], log["eval_loss"]) for log in log_history if "eval_loss" in log and "step" in log]
    if not train and not evals or (plt := _pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "training loss"), (evals, "evaluation loss")):
        if points:
            _curve(ax, points, label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per labelled token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def demo_plot(result: dict, path: Path) -> Path | None:
    """``fastsft demo``'s result: both loss curves, tokens/s and (on a GPU) peak memory of the two runs."""
    if (plt := _pyplot()) is None:
        return None
    runs = {"fastsft": result["fastsft"], "stock TRL": result["trl"]}
    memory = all(run["peak_memory_bytes"] is not None for run in runs.values())
    fig, axes = plt.subplots(1, 3 if memory else 2, figsize=(12 if memory else 9, 3.8),
                             gridspec_kw={"width_ratios": [2, 1, 1] if memory else [2, 1]})
    for name, run in runs.items():
        _curve(axes[0], list(enumerate(run["losses"], start=1)), name)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    bars = [("tokens/s (higher is better)", [run["tokens_per_second"] for run in runs.values()])]
    if memory:
        bars.append(("peak memory, GiB (lower is better)", [run["peak_memory_bytes"] / 2**30 for run in runs.values()]))
    for ax, (label, values) in zip(axes[1:], bars):
        drawn = ax.bar(list(runs), values, color=["tab:blue", "tab:orange"])
        ax.bar_label(drawn, fmt="%.3g")
        ax.margins(y=0.15)  # room for the labels above the bars
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"fastsft demo on {result['device']}: {result['steps']} steps, batch {result['batch_size']}, "
                 f"{'LoRA' if result['lora'] else 'full fine-tuning'}; fastsft's training loop {result['speedup']:.2f}x as "
                 f"fast as stock TRL's", fontsize=11)
    return _save(fig, plt, path)
