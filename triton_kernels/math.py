"""Math helpers shared by fastsft's Triton kernels (jit functions: Triton inlines them into each kernel)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no tanh that also runs under TRITON_INTERPRET; this form is exact enough in fp32.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
