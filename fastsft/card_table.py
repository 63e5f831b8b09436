"""The per-card table: where a card's measured fastest choices deviate from fastsft's built-in defaults.

One JSON file shipped with the package (``card_table.json``), keyed by the CUDA device name, with up to three
sections, each listing only deviations:

- ``backends``: op -> backend order (fastest first), where it differs from the default order
  (:data:`fastsft.backends.DEFAULT_ORDER`);
- ``attention``: case (``packed`` or ``dense``) -> the order of the attention backends of patched models, where it
  differs from :data:`fastsft.transformers_attention.DEFAULT_ORDER`;
- ``attention_kernels``: ``"<kernel>/d<head dim class>/<bits>bit/<short|long>"`` -> the Triton attention kernels'
  launch configuration, where it differs from the kernels' defaults.

It is read when a model is patched (the plan, :mod:`fastsft.patching.plan`) and by direct op calls with
``backend="auto"``; the benchmarks write it (``--write-table``) through :func:`update`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

PATH = Path(__file__).with_name("card_table.json")
SECTIONS = ("backends", "attention", "attention_kernels")


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def table() -> dict:
    """The whole table: card name -> section -> entries (read once per process)."""
    return _read(PATH)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def card_of(device: torch.device) -> str | None:
    """The CUDA card's name (the table's key), None for other devices."""
    if device.type != "cuda":
        return None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def section(device: torch.device, name: str) -> dict:
    """One section of ``device``'s entry (empty when the card, or the section, is not in the table)."""
    if name not in SECTIONS:
        raise ValueError(f"unknown card table section {name!r}; expected one of {SECTIONS}")
    card = card_of(device)
    return table().get(card, {}).get(name, {}) if card is not None else {}


def update(card: str, name: str, measured: dict, defaults: dict) -> Path:
    """Store ``measured`` (key -> value) for ``card`` in section ``name``, keeping only the values that differ from
    ``defaults`` (a key whose measured value is the default is removed). Returns the table's path."""
    if name not in SECTIONS:
        raise ValueError(f"unknown card table section {name!r}; expected one of {SECTIONS}")
    data = json.loads(PATH.read_text()) if PATH.exists() else {}
    entries = data.setdefault(card, {}).setdefault(name, {})
    for key, value in measured.items():
        if value == defaults.get(key):
            entries.pop(key, None)
        else:
            entries[key] = value
    data[card] = {s: dict(sorted(data[card][s].items())) for s in SECTIONS if data[card].get(s)}
    data = {c: e for c, e in sorted(data.items()) if e}
    PATH.write_text(json.dumps(data, indent=2) + "\n")
    _read.cache_clear()
    return PATH
