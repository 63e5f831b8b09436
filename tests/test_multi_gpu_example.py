"""examples/sft_multi_gpu.py rejects settings it cannot time or run (the runs themselves: scripts/gpu_multi.sh)."""

import pytest
import torch

from helpers import load_script


@pytest.fixture(scope="module")
def example():
    return load_script("examples/sft_multi_gpu.py")


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
