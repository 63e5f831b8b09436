"""Guarded loading of the compiled extension ``fastsft._C``.

The package works without it: the reference and Triton backends need nothing compiled. Loading registers the
``fastsft::`` ops written in C++/CUDA with the dispatcher.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

SKIP_ENV = "FASTSFT_NO_EXTENSION"

_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Import ``fastsft._C`` once; return whether its ops are registered. Warns once when it cannot load."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        _loaded, _error = False, f"{SKIP_ENV} is set"
        return False
    try:
        from fastsft import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:  # not built, or built against another torch
        _loaded, _error = False, str(exc)
        # Not built is normal (no warning). Python 3.12 words a missing submodule of a package still importing as
        # "cannot import name ... (most likely due to a circular import)", so ask whether the file is there.
        if importlib.util.find_spec("fastsft._C") is not None:
            warnings.warn(f"fastsft: the compiled extension fastsft._C failed to load ({exc}); "
                          "using the Triton and reference backends", RuntimeWarning, stacklevel=2)
        return False
    _loaded = True
    return True


def error() -> str | None:
    """Why the extension is not loaded, or None."""
    load()
    return _error


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fastsft::<op>`` has a kernel for this device type ("cpu" or "cuda")."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    name = f"fastsft::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    except RuntimeError:  # op not registered at all
        return False
