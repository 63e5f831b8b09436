"""fastsft's ops: each a documented function with ``backend="auto"`` (see :mod:`fastsft.backends`)."""

from fastsft.ops.attention import flash_attention_varlen
from fastsft.ops.linear_cross_entropy import TokenStats, linear_cross_entropy

__all__ = ["TokenStats", "flash_attention_varlen", "linear_cross_entropy"]
