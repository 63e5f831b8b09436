"""Where a training step makes the host wait for the GPU: every synchronizing CUDA call, by the code that made it.

    python -m bench.sync_sites --model llama-1b --batch 4 --max-length 2048 --provider fastsft

Trains bench_sft's setup (packing, LoRA r=16, checkpointing) for ``warmup + steps`` steps; during the last ``steps``
the CUDA sync debug mode is "warn" (``torch.cuda.set_sync_debug_mode``) and each warning is attributed to the
innermost frames of its Python stack outside torch itself. A sync drains the GPU's queue: the host's work after it
leaves the GPU idle, so a step without syncs is what lets the host run ahead of the GPU. Writes
``sync_sites_<model>_<provider>.json`` / ``.md`` (the sites by syncs per step) into ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import traceback
import warnings
from pathlib import Path

from bench import bench_sft, harness

_SKIP = (os.path.join("site-packages", "torch", ""), os.sep + "warnings.py", __file__)


def site_of(stack: list[traceback.FrameSummary], depth: int = 3) -> str:
    """The ``depth`` innermost frames outside torch and this module, innermost first: where a sync came from."""
    frames = [f for f in reversed(stack) if not any(part in f.filename for part in _SKIP)]
    return " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[:depth]) or "(torch internals)"


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, os.sep + "fastsft" + os.sep, os.sep + "bench" + os.sep):
        if marker in path:
            head, tail = path.rsplit(marker, 1)
            return (marker.strip(os.sep) + "/" if marker != "site-packages" + os.sep else "") + tail
    return path


class SyncRecorder:
    """Counts synchronizing CUDA calls by site while active (a Trainer callback turns it on for the timed steps)."""

    def __init__(self):
        self.sites: collections.Counter = collections.Counter()
        self.active = False
        self._previous = None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if self.active and "synchronizing" in str(message):
            self.sites[site_of(traceback.extract_stack()[:-1])] += 1
        elif self._previous is not None:
            self._previous(message, category, filename, lineno, file, line)

    def start(self):
        import torch

        self._previous, warnings.showwarning = warnings.showwarning, self._show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.active = True

    def stop(self):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self.active = False
        if self._previous is not None:
            warnings.showwarning, self._previous = self._previous, None


def callback(recorder: SyncRecorder, first_step: int):
    from transformers import TrainerCallback

    class Recording(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= first_step and not recorder.active:
                recorder.start()

        def on_train_end(self, args, state, control, **kwargs):
            recorder.stop()

    return Recording()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(bench_sft.MODELS), default="llama-1b")
    parser.add_argument("--provider", choices=[*bench_sft.FASTSFT_PROVIDERS, "trl"], default="fastsft")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", dest="max_length", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    bench_sft.add_optim_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    a = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the sync debug mode is CUDA's)")
    a.packing, a.qlora = True, False
    run = argparse.Namespace(**vars(a), checkpoint=None)
    recorder = SyncRecorder()
    with tempfile.TemporaryDirectory() as out:
        trainer = bench_sft.make_trainer(a.provider, run, out, [callback(recorder, a.warmup)])
        trainer.train()
    rows = [{"site": site, "syncs_per_step": count / a.steps} for site, count in recorder.sites.most_common()]
    rows.append({"site": "(all)", "syncs_per_step": sum(recorder.sites.values()) / a.steps})
    name = f"sync_sites_{a.model}_{a.provider}"
    harness.write(rows, a.out, name, ["site", "syncs_per_step"],
                  f"Synchronizing CUDA calls per training step: {a.provider}, {a.model}, batch {a.batch}, "
                  f"max_length {a.max_length}, packing, logging every step",
                  extra={"config": {"model": a.model, "provider": a.provider, "batch": a.batch,
                                    "max_length": a.max_length, "warmup": a.warmup, "steps": a.steps}})
    for row in rows:
        print(f"{row['syncs_per_step']:6.1f}  {row['site']}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
