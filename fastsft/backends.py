"""Backend registry: which implementation of an op runs, and what happens when one cannot.

Every op has a ``reference`` backend (plain PyTorch, float32 math or wider), usually a ``triton`` backend, and
optionally a ``cuda`` backend (the compiled extension ``fastsft._C``: CUDA kernels for CUDA tensors, its C++
kernels for CPU tensors).

Choosing:
- ``backend="auto"`` takes the order measured fastest for the device (``backend_table.json``, written by the
  benchmarks with ``--write-table``; a default order for cards not in it) and skips unavailable backends.
- ``FASTSFT_BACKEND=<name>`` forces a backend for every op that has one (the others keep ``auto``, with one
  warning), ``FASTSFT_BACKEND_<OP>=<name>`` (op name upper-cased) for one op. A forced or explicitly requested
  backend that cannot run raises; it never falls back. ``fastsft.patch(model, backend=<name>)`` applies a backend
  as ``FASTSFT_BACKEND`` does (:func:`for_model`).
- In ``auto``, a backend that fails to compile or launch is skipped with one warning, marked broken for that
  device type for the rest of the process, and the next one runs. A backend that raises ``Unsupported`` for an
  input it does not take (a dtype, a size past a kernel's limit) is skipped for that call only, quietly. Any other
  error (about the caller's input: ``ValueError``, ``TypeError``, ...; out of memory) propagates: falling back would
  hide it (see :func:`is_backend_failure`).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint

BACKENDS = ("cuda", "triton", "reference")
TABLE_PATH = Path(__file__).with_name("backend_table.json")
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this device/input."""


class Unsupported(TypeError):
    """Raised by a backend for an input it does not take (float64 on a Triton kernel, say). In ``auto`` the next
    backend runs, quietly and without marking this one broken: it is about this input, not the backend."""


@dataclass
class _Op:
    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    # backend -> function(device) returning None when usable, else the reason it is not
    checks: dict[str, Callable[[torch.device], str | None]] = field(default_factory=dict)
    # (backend, CUDA device index) whose check passed: asked again on every call of the op otherwise (the compiled
    # extension's kernel lookup, Triton's import check: microseconds, every norm, RoPE, attention and LoRA call).
    # CUDA only: on the CPU, Triton's availability follows TRITON_INTERPRET, which may change while running.
    usable_on_cuda: set = field(default_factory=set)


# Exceptions that are control flow, not failures: non-reentrant activation checkpointing stops its recomputation
# by raising one from a saved-tensor hook, which may sit inside any op's forward. They must pass through.
_CONTROL_FLOW: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if cls is not None)

_ops: dict[str, _Op] = {}
_broken: dict[tuple[str, str, str], str] = {}  # (op, backend, device type) -> error


def register(op: str, backend: str, *, available: Callable[[torch.device], str | None] | None = None):
    """Decorator: register ``fn`` as ``backend`` of ``op``. ``available(device)`` returns None or a reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        entry = _ops.setdefault(op, _Op(op))
        entry.impls[backend] = fn
        entry.checks[backend] = available or (lambda device: None)
        entry.usable_on_cuda.clear()
        _auto_on_cuda.clear()
        return fn

    return deco


def registered(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _ops[op].impls)


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    entry = _ops[op]
    if backend not in entry.impls:
        return f"{op} has no {backend} backend"
    broken = _broken.get((op, backend, device.type))
    if broken is not None:
        return f"it failed earlier in this process: {broken}"
    if device.type != "cuda":
        return entry.checks[backend](device)
    key = (backend, device.index)
    if key in entry.usable_on_cuda:
        return None
    reason = entry.checks[backend](device)
    if reason is None:
        entry.usable_on_cuda.add(key)
    return reason


@functools.lru_cache(maxsize=None)
def load_table(path: Path) -> dict:
    """A measured per-card table (JSON) shipped with the package, read once; empty when missing."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _table() -> dict:
    return load_table(TABLE_PATH)


@functools.lru_cache(maxsize=None)
def card_name(index: int) -> str:
    """The CUDA card's name, looked up once per device (the tables are keyed by it; every op call asks)."""
    return torch.cuda.get_device_name(index)


def auto_order(op: str, device: torch.device) -> list[str]:
    """Backends in the order measured fastest for this device, falling back to the table's defaults."""
    table = _table().get(op, {})
    order = None
    if device.type == "cuda":
        order = table.get("cards", {}).get(card_name(device.index if device.index is not None
                                                     else torch.cuda.current_device()))
    if order is None:
        order = table.get("default", {}).get(device.type)
    if order is None:  # no table entry at all: compiled first, then Triton on GPUs, reference last
        order = ["cuda", "triton", "reference"] if device.type == "cuda" else ["cuda", "reference"]
    return [b for b in order if b in _ops[op].impls]


@functools.lru_cache(maxsize=None)
def _env_name(op: str) -> str:
    return f"FASTSFT_BACKEND_{op.upper()}"


def requested_backend(op: str, backend: str) -> str:
    """The backend asked for: an explicit argument wins over the env vars; 'auto' otherwise. ``FASTSFT_BACKEND``
    (every op) applies as :func:`for_model` does: an op without that backend keeps 'auto'."""
    if backend != "auto":
        return backend
    forced = os.environ.get(_env_name(op))
    if forced:
        return forced.lower()
    forced = os.environ.get("FASTSFT_BACKEND")
    if not forced:
        return "auto"
    forced = forced.lower()
    if forced in BACKENDS and forced not in _ops[op].impls:
        if (op, forced) not in _env_kept_auto:
            _env_kept_auto.add((op, forced))
            warnings.warn(f"fastsft: FASTSFT_BACKEND={forced}, but {op} has no {forced} backend; it keeps 'auto'",
                          RuntimeWarning, stacklevel=3)
        return "auto"
    return forced


_env_kept_auto: set = set()  # (op, backend) already warned about


def for_model(op: str, backend: str) -> str:
    """The backend of ``op`` when one backend is asked for every op of a model (``fastsft.patch(model,
    backend=...)``): that backend where ``op`` has one (it then runs exactly that, raising if it cannot), 'auto'
    where it has none (see :func:`lacking`). A call of one op with an explicit backend it lacks still raises."""
    if backend == "auto" or backend in _ops[op].impls:
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return "auto"


def lacking(ops, backend: str) -> list[str]:
    """The ops among ``ops`` without a ``backend`` backend: those that keep 'auto' under :func:`for_model`."""
    return [op for op in ops if for_model(op, backend) != backend]


# auto's candidates per (op, CUDA device), with the number of broken backends they were made with: every norm,
# RoPE, attention and LoRA call asks (~500 times per step at the 8B shape), and on a CUDA device the answer
# changes only when a backend breaks or is registered. (On the CPU, Triton's availability follows
# TRITON_INTERPRET, which may change while running: asked every time.)
_auto_on_cuda: dict = {}


def select(op: str, backend: str, device: torch.device) -> tuple[list[str], bool]:
    """Candidate backends in order and whether the choice was explicit (explicit: exactly one, no fallback)."""
    choice = requested_backend(op, backend)
    if choice == "auto":
        key = (op, device) if device.type == "cuda" else None
        hit = _auto_on_cuda.get(key) if key is not None else None
        if hit is not None and hit[0] == len(_broken):
            return hit[1], False
        candidates = [b for b in auto_order(op, device) if unavailable_reason(op, b, device) is None]
        if not candidates:
            raise BackendUnavailable(f"no backend of {op} can run on {device}")
        if key is not None:
            _auto_on_cuda[key] = (len(_broken), candidates)
        return candidates, False
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r} for {op}; expected 'auto' or one of {BACKENDS}")
    reason = unavailable_reason(op, choice, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {choice!r} of {op} cannot run on {device}: {reason}")
    return [choice], True


def dispatch(op: str, backend: str, device: torch.device, *args, **kwargs):
    """Run ``op`` with the chosen backend, falling back (in auto mode) past backends that fail."""
    candidates, explicit = select(op, backend, device)
    for i, name in enumerate(candidates):
        fn = _ops[op].impls[name]
        if explicit or i == len(candidates) - 1:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Unsupported:
            continue
        except Exception as exc:
            if not is_backend_failure(exc):
                raise
            # a compile or launch failure: one warning, then never again this process
            _broken[(op, name, device.type)] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"fastsft: the {name} backend of {op} failed on {device.type} "
                          f"({type(exc).__name__}: {exc}); falling back to {candidates[i + 1]}",
                          RuntimeWarning, stacklevel=3)
    raise AssertionError("unreachable")


def is_backend_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a backend, says the backend cannot compile or launch here (so ``auto`` may mark it
    broken and move on): a missing module (``ImportError``), a failed launch or a missing kernel (``RuntimeError``,
    which CUDA and driver errors are, ``OSError``), or any of Triton's own errors (``CompilationError``,
    ``OutOfResources``, ...). Not out-of-memory, not checkpointing's control flow, and never an error of the
    backend's Python code about its input (``ValueError``, ``TypeError``, ``ZeroDivisionError``, ``IndexError``,
    ...): those propagate, since falling back would hide them and disable the backend for every later call."""
    if isinstance(exc, (torch.OutOfMemoryError, *_CONTROL_FLOW)):
        return False
    if isinstance(exc, (ImportError, RuntimeError, OSError)):
        return True
    return any(cls.__module__.partition(".")[0] == "triton" for cls in type(exc).__mro__)


def chosen(op: str, device: torch.device, backend: str = "auto") -> str:
    """The backend that ``dispatch`` would try first (for reports); raises if none can run."""
    return select(op, backend, device)[0][0]


# --- common availability checks ------------------------------------------------------------------------

def fallbacks() -> dict[str, str]:
    """Backends that failed in this process and were skipped since: ``"<op>:<backend>@<device type>"`` -> the
    error. Empty when every op ran the backend ``auto`` chose (benchmarks record this next to their numbers)."""
    return {f"{op}:{backend}@{device}": error for (op, backend, device), error in _broken.items()}


@functools.lru_cache(maxsize=None)
def _triton_kernels_missing() -> str | None:
    import importlib.util

    try:
        if importlib.util.find_spec("fastsft.triton_kernels") is not None:
            return None
    except ImportError:
        pass
    # setup.py installs the top-level triton_kernels/ as fastsft.triton_kernels: a source tree on sys.path lacks it
    return "fastsft.triton_kernels is not importable (fastsft is not installed: pip install -e . in the source tree)"


def triton_available(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    missing = _triton_kernels_missing()
    if missing:
        return missing
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get(TRITON_INTERPRET_ENV) == "1":
        return None
    return f"Triton kernels run on CUDA devices (or on the CPU under {TRITON_INTERPRET_ENV}=1)"


def extension_available(op_name: str) -> Callable[[torch.device], str | None]:
    """Availability check for a compiled op ``fastsft::<op_name>``."""

    def check(device: torch.device) -> str | None:
        from fastsft import _extension

        if not _extension.load():
            return f"the compiled extension fastsft._C is not loaded ({_extension.error()})"
        if not _extension.has_kernel(op_name, device.type):
            return f"fastsft._C has no {device.type} kernel for {op_name} (built without CUDA?)"
        return None

    return check


def report() -> dict[str, dict[str, str]]:
    """For each op and backend on each local device type: 'ok' or why not."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {op: {f"{b}@{d.type}": (unavailable_reason(op, b, d) or "ok") for d in devices for b in registered(op)}
            for op in _ops}
