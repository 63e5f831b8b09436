"""The kernel suite runs only on a CUDA GPU and only when asked for (``python -m pytest bench/kernels``; the
project's ``testpaths`` is ``tests``). Without CUDA every test is skipped, so ``--collect-only`` still lists them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_configure(config):
    from bench.kernels import timing

    timing.stop_on_sigterm()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="bench/kernels measures GPU kernels: no CUDA device here")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The card, versions and commit of the run, as every other benchmark's rows carry them."""
    from bench import harness

    machine_info["fastsft"] = harness.environment()


@pytest.fixture
def device():
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _release_memory():
    """Each measurement starts from an empty cache: a provider's leftovers must not shrink the next one's room."""
    yield
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
