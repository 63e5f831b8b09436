"""Backend registry: which implementation of an op runs, and what happens when one cannot.

Every op has a ``reference`` backend (plain PyTorch, float32 math or wider), usually a ``triton`` backend, and
optionally a ``cuda`` backend (the compiled extension ``fastsft._C``: CUDA kernels for CUDA tensors, its C++
kernels for CPU tensors).

Choosing is *resolving*: :func:`resolve` turns a request (``"auto"`` or a backend name) into a :class:`Resolved`,
the concrete functions to run, in order, with their launch configuration. ``fastsft.patch`` resolves every op
once, for the model's device (its plan, :mod:`fastsft.patching.plan`), and the patched step calls the resolved
functions straight; a direct op call resolves its ``backend=`` argument on each call.

- ``auto`` takes :data:`DEFAULT_ORDER` (compiled first, then Triton on GPUs, the reference last; Triton never in
  ``auto`` on the CPU, where it runs only under its interpreter) unless the card's entry in the per-card table
  (:mod:`fastsft.card_table`, section ``backends``) measured another order, and skips backends that cannot run.
- ``FASTSFT_BACKEND=<name>`` asks for a backend for every op that has one (the others keep ``auto``, with one
  warning), ``FASTSFT_BACKEND_<OP>=<name>`` (op name upper-cased) for one op; read when resolving. A backend asked
  for by name that cannot run raises; it never falls back. ``fastsft.patch(model, backend=<name>)`` applies a
  backend as ``FASTSFT_BACKEND`` does (:func:`for_model`).
- In ``auto``, a backend that fails to compile or launch is skipped with one warning, marked broken for that
  device type for the rest of the process, and the next one runs. A backend that raises ``Unsupported`` for an
  input it does not take (a dtype, a size past a kernel's limit) is skipped for that call only, quietly. Any other
  error (about the caller's input: ``ValueError``, ``TypeError``, ...; out of memory) propagates: falling back would
  hide it (see :func:`is_backend_failure`).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils.checkpoint

from fastsft import _capture, card_table

BACKENDS = ("cuda", "triton", "reference")
# auto's order per device type, filtered by the backends an op has
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cuda", "reference")}
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
    # function(device) -> the launch configuration the backends take as ``launch=`` (None: they take none)
    launch: Callable[[torch.device], Any] | None = None


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
        _resolved_on_cuda.clear()
        return fn

    return deco


def register_launch(op: str, configure: Callable[[torch.device], Any]) -> None:
    """Give ``op`` a launch configuration: ``configure(device)``, called when the op is resolved for a device, and
    passed to every backend of the op as the keyword ``launch``."""
    _ops.setdefault(op, _Op(op)).launch = configure
    _resolved_on_cuda.clear()


def registered(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _ops[op].impls)


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    entry = _ops[op]
    if backend not in entry.impls:
        return f"{op} has no {backend} backend"
    broken = _broken.get((op, backend, device.type))
    if broken is not None:
        return f"it failed earlier in this process: {broken}"
    return entry.checks[backend](device)


def auto_order(op: str, device: torch.device) -> list[str]:
    """Backends of ``op`` in auto's order for this device: the card table's measured order, else the default."""
    order = card_table.section(device, "backends").get(op) or DEFAULT_ORDER.get(device.type, DEFAULT_ORDER["cpu"])
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


class Resolved:
    """One op resolved for one device type: the backends to try, in order, as their functions, and the launch
    configuration they take. Calling it runs the first; in auto, a backend that fails to compile or launch is
    dropped (one warning) and the next runs, and one that raises :class:`Unsupported` is passed over for that
    call. Called for a tensor on another device type (a model moved after patching), it resolves the same
    request for that device type once and runs that.

    Pass it as ``backend=`` to the op it was resolved for: ``rms_norm(x, w, eps, backend=resolve("rms_norm",
    "auto", device))`` runs without any lookup."""

    def __init__(self, op: str, request: str, device: torch.device, candidates: list[str], explicit: bool):
        entry = _ops[op]
        self.op, self.request, self.device_type, self.explicit = op, request, device.type, explicit
        self.functions = [(name, entry.impls[name]) for name in candidates]
        self.launch = entry.launch(device) if entry.launch is not None else None
        self._elsewhere: dict[str, Resolved] = {}

    @property
    def backend(self) -> str:
        """The backend that runs first."""
        return self.functions[0][0]

    @property
    def candidates(self) -> list[str]:
        return [name for name, _ in self.functions]

    def __str__(self) -> str:
        return self.backend

    def __repr__(self) -> str:
        kind = "explicit" if self.explicit else "auto: " + " > ".join(self.candidates)
        return f"Resolved({self.op} on {self.device_type}: {self.backend}, {kind})"

    def __call__(self, device: torch.device, *args, **kwargs):
        if device.type != self.device_type:
            other = self._elsewhere.get(device.type)
            if other is None:
                other = self._elsewhere[device.type] = resolve(self.op, self.request, device)
            return other(device, *args, **kwargs)
        if self.launch is not None:
            kwargs["launch"] = self.launch
        functions = self.functions
        if len(functions) == 1:
            return functions[0][1](*args, **kwargs)
        for i, (name, fn) in enumerate(functions):
            if i == len(functions) - 1:
                return fn(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            except Unsupported:
                continue
            except Exception as exc:
                # under a graph capture, an error says what cannot be captured, not that the backend is broken
                if not is_backend_failure(exc) or _capture.capturing_on(device):
                    raise
                self._drop(name, exc, functions[i + 1][0])
        raise AssertionError("unreachable")

    def _drop(self, name: str, exc: BaseException, next_name: str) -> None:
        """A compile or launch failure: never this backend again in this process, with one warning."""
        self.functions = [(n, f) for n, f in self.functions if n != name]
        key = (self.op, name, self.device_type)
        if key not in _broken:
            _broken[key] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"fastsft: the {name} backend of {self.op} failed on {self.device_type} "
                          f"({type(exc).__name__}: {exc}); falling back to {next_name}", RuntimeWarning, stacklevel=4)


# Direct op calls on a CUDA device resolve the same request again and again (a kernel benchmark, a user's loop):
# the answer, with its worked-out launch configuration, is kept until a backend breaks or is registered. The CPU
# resolves every time: Triton's availability there follows TRITON_INTERPRET, which may change while running.
_resolved_on_cuda: dict = {}


def resolve(op: str, backend: str, device: torch.device) -> Resolved:
    """``op``'s backends for ``device``, as asked by ``backend`` (``"auto"`` or a name; the env vars apply)."""
    if op not in _ops:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_ops)}")
    choice = requested_backend(op, backend)
    if device.type != "cuda":
        return _resolve(op, choice, device)
    key = (op, choice, device)
    hit = _resolved_on_cuda.get(key)
    if hit is None or hit[0] != len(_broken):
        hit = _resolved_on_cuda[key] = (len(_broken), _resolve(op, choice, device))
    return hit[1]


def _resolve(op: str, choice: str, device: torch.device) -> Resolved:
    if choice == "auto":
        candidates = [b for b in auto_order(op, device) if unavailable_reason(op, b, device) is None]
        if not candidates:
            raise BackendUnavailable(f"no backend of {op} can run on {device}")
        return Resolved(op, "auto", device, candidates, explicit=False)
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r} for {op}; expected 'auto' or one of {BACKENDS}")
    reason = unavailable_reason(op, choice, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {choice!r} of {op} cannot run on {device}: {reason}")
    return Resolved(op, choice, device, [choice], explicit=True)


def dispatch(op: str, backend, device: torch.device, *args, **kwargs):
    """Run ``op``: ``backend`` is what the caller passed as ``backend=``, a name or ``"auto"`` (resolved now), a
    :class:`Resolved` of this op, or a mapping op -> :class:`Resolved` (a model's plan)."""
    if isinstance(backend, str):
        return resolve(op, backend, device)(device, *args, **kwargs)
    if not isinstance(backend, Resolved):
        try:
            backend = backend[op]
        except (KeyError, TypeError):
            raise TypeError(f"{op}: backend must be 'auto', a backend name, or a resolved selection of {op}, got "
                            f"{backend!r}") from None
    if backend.op != op:
        raise ValueError(f"{op}: given the resolved backend of {backend.op}")
    return backend(device, *args, **kwargs)


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
    """The backend that would run first (for reports); raises if none can run."""
    return resolve(op, backend, device).backend


def fallbacks() -> dict[str, str]:
    """Backends that failed in this process and were skipped since: ``"<op>:<backend>@<device type>"`` -> the
    error. Empty when every op ran the backend ``auto`` chose (benchmarks record this next to their numbers)."""
    return {f"{op}:{backend}@{device}": error for (op, backend, device), error in _broken.items()}


# --- common availability checks ------------------------------------------------------------------------


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
