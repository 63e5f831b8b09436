"""examples/sft_multi_gpu.py rejects settings it cannot time or run (the runs themselves: scripts/gpu_multi.sh)."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_multi_gpu.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sft_multi_gpu", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,message", [
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--steps", "3", "--warmup", "3"], "below --steps"),
    (["--qlora"], "--qlora needs --model llama-1b"),
])
def test_bad_arguments_are_refused(example, capsys, argv, message):
    with pytest.raises(SystemExit):
        example.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_needs_a_gpu(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--model", "llama-1b", "--qlora"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
