import os

import pytest
import torch

# On a machine without a GPU the Triton kernels run in Triton's interpreter; this must be set before any
# kernel is defined (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: models come from configs, data ships with the package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; scripts/gpu_check.sh runs these")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shipped demo model (small variant, random weights) and its tokenizer, saved as a local model dir."""
    from fastsft.demo_assets import demo_model, demo_tokenizer
    from helpers import SMALL_DEMO

    path = tmp_path_factory.mktemp("demo_model")
    demo_model(**SMALL_DEMO).save_pretrained(path)
    demo_tokenizer().save_pretrained(path)
    return str(path)


def pytest_configure(config):
    config.addinivalue_line("markers", "grid: the whole GPU test grid of an op (one device call); routine GPU runs "
                                       "take the quick subset with -m 'not grid'")
