"""fastsft's ops: each a documented function with ``backend="auto"`` (see :mod:`fastsft.backends`)."""

from fastsft.ops.attention import flash_attention_varlen
from fastsft.ops.gated_activation import geglu, swiglu
from fastsft.ops.linear_cross_entropy import TokenStats, linear_cross_entropy
from fastsft.ops.lora import lora_linear, lora_mlp, lora_projections, lora_qkv
from fastsft.ops.nf4 import NestedAbsmax, dequantize_nf4, dequantize_nf4_into, from_bnb, quantize_nf4
from fastsft.ops.rms_norm import rms_norm
from fastsft.ops.rope import rope

__all__ = ["TokenStats", "flash_attention_varlen", "linear_cross_entropy"]
__all__ += ["geglu", "rms_norm", "rope", "swiglu"]
__all__ += ["lora_linear", "lora_mlp", "lora_projections", "lora_qkv"]
__all__ += ["NestedAbsmax", "dequantize_nf4", "dequantize_nf4_into", "from_bnb", "quantize_nf4"]
