"""``fastsft bench e2e|suite|report [flags]``: the benchmark harness of the source tree (``bench/``) from the
command line: ``e2e`` is ``python -m bench.e2e`` (stock TRL, TRL + Liger, fastsft and Unsloth end to end on one GPU),
``suite`` is ``python -m bench.suite`` (kernels and end to end, in presets), ``report`` is ``python -m bench.report``
(CSV, plots and RESULTS.md of a results folder). The flags go to them as they are (``fastsft bench e2e --help``)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from fastsft.cli import UsageError

COMMANDS = {"e2e": "bench.bench_sft", "suite": "bench.suite", "report": "bench.report"}


def _source_tree_on_path() -> None:
    """The checkout fastsft runs from on this process's path and its children's (the benchmarks start child
    processes with ``python -m bench...``): an editable install maps the fastsft package only."""
    import fastsft

    root = Path(fastsft.__file__).resolve().parent.parent
    if not (root / "bench" / "__init__.py").is_file():
        return
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(root) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, paths)])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"fastsft bench takes one of {', '.join(COMMANDS)} first (then that benchmark's flags; "
                         f"`fastsft bench e2e --help` lists them)")
    _source_tree_on_path()
    try:
        module = importlib.import_module(COMMANDS[argv[0]])
    except ModuleNotFoundError as exc:
        if exc.name != "bench" and not (exc.name or "").startswith("bench."):
            raise
        raise UsageError("the benchmark harness (bench/) is part of fastsft's source tree, not of the installed "
                         "package: run fastsft bench from a checkout (pip install -e .)") from None
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0
