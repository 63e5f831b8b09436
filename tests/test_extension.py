"""The compiled extension: loads, registers its ops for CPU (and CUDA when built with nvcc)."""

import os
import shutil

import pytest
import torch

from fastsft import _extension, backends

REQUIRED = os.environ.get("FASTSFT_REQUIRE_EXTENSION") == "1"  # set by .ci/run and scripts/gpu_check.sh


def test_extension_loads_when_required():
    if not REQUIRED and not _extension.load():
        pytest.skip(f"extension not built here: {_extension.error()}")
    assert _extension.load(), _extension.error()
    assert _extension.has_kernel("cross_entropy_rows", "cpu")


def test_cuda_kernels_are_compiled_where_nvcc_exists():
    """CI has nvcc but no GPU: the CUDA kernels must still be compiled in and registered."""
    have_nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not (REQUIRED and have_nvcc and torch.version.cuda):
        pytest.skip("only checked where the build must include CUDA (CI, GPU script)")
    assert _extension.has_kernel("cross_entropy_rows", "cuda")


def test_backend_report_names_every_backend():
    rows = backends.report()["linear_cross_entropy"]
    assert set(rows) >= {"reference@cpu", "triton@cpu", "cuda@cpu"}
    assert rows["reference@cpu"] == "ok"


@pytest.mark.parametrize("built", [False, True], ids=["not-built", "built-but-broken"])
def test_warns_only_when_a_built_extension_fails_to_load(monkeypatch, recwarn, built):
    """No extension file: quiet (the Triton and reference backends are the normal path). A file that does not load
    (another torch, say): one warning. Python 3.12's message for the missing file mentions a circular import, so
    the decision cannot rest on the message."""
    import importlib.util
    import sys

    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_error", None)
    import fastsft

    monkeypatch.delattr(fastsft, "_C", raising=False)  # loaded earlier: `from fastsft import _C` would find it
    monkeypatch.setitem(sys.modules, "fastsft._C", None)  # any import of it now raises ImportError
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if built else None) if name == "fastsft._C" else find_spec(name, *a))
    assert _extension.load() is False
    warned = [w for w in recwarn if "failed to load" in str(w.message)]
    assert len(warned) == (1 if built else 0)
