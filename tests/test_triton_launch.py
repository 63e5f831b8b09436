"""fastsft.triton_kernels.launch: the host-side helpers match Triton's own."""

import pytest

triton = pytest.importorskip("triton")

from fastsft.triton_kernels.launch import cdiv, next_power_of_2  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 100, 128, 129, 4095, 4096, 4097, 14336, 2**31 + 1])
def test_next_power_of_2_matches_triton(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize("a", [0, 1, 2, 63, 64, 65, 1000, 2**33 + 7])
@pytest.mark.parametrize("b", [1, 2, 16, 64, 128, 1000])
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)
