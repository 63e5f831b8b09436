"""How fastsft's Triton ops launch their kernels: through torch.library where torch traces, directly in eager code.

Each Triton op is a ``torch.library.triton_op`` (so ``torch.compile`` and export see a custom op whose kernels they
can trace through ``wrap_triton``). Calling that op from eager code goes through the dispatcher, the autograd and
fake-mode layers and a dynamo-disable wrapper on every call: with the kernel launch stubbed out, 27 us per call
against 15 us for the function itself (RMSNorm forward, on a 2-core CPU machine), paid by every norm, activation
and attention call of every layer, every step. :func:`eager_direct_triton_op`
keeps the op and adds a direct path: an eager call on plain tensors runs the function itself with its kernels
launched as they are (:func:`launcher` inside :func:`direct_launch`); anything else (compiling, fake or functional
tensors, tensor subclasses) calls the op.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.library import triton_op, wrap_triton

_direct = threading.local()


@contextlib.contextmanager
def direct_launch():
    """Kernels launched inside run as they are, not recorded through ``wrap_triton``."""
    previous = getattr(_direct, "on", False)
    _direct.on = True
    try:
        yield
    finally:
        _direct.on = previous


def launching_directly() -> bool:
    """Whether kernels launched now run as they are (inside :func:`direct_launch`), not traced by ``wrap_triton``."""
    return getattr(_direct, "on", False)


def launcher(kernel):
    """``kernel`` to index with a grid and call: itself inside :func:`direct_launch`, else ``wrap_triton(kernel)``."""
    return kernel if launching_directly() else wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code. Triton 3.8 made its helpers ``ConstexprFunction`` objects whose
    calls take ~4 us of Python each (0.2 us here), and launches compute several per call, every layer and step."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code (see :func:`next_power_of_2`)."""
    return -(-a // b)


def _plain_eager(args, kwargs) -> bool:
    if torch.compiler.is_compiling():
        return False
    return all(type(a) is torch.Tensor for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def eager_direct_triton_op(name: str, *, mutates_args):
    """``torch.library.triton_op(name, mutates_args=...)`` whose eager calls on plain tensors skip the dispatcher.
    The decorated function must launch its kernels through :func:`launcher`. The result calls like the function;
    ``.op`` is the custom op and ``.register_fake`` registers its fake."""

    def decorate(fn):
        op = triton_op(name, mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if _plain_eager(args, kwargs):
                # direct_launch() inlined: a generator-based context manager costs a few us per call, every call
                previous = getattr(_direct, "on", False)
                _direct.on = True
                try:
                    return fn(*args, **kwargs)
                finally:
                    _direct.on = previous
            return op(*args, **kwargs)

        call.op = op
        call.register_fake = op.register_fake
        return call

    return decorate
