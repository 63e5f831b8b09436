"""NF4 dequantization, bit-for-bit equal to bitsandbytes' ``dequantize_4bit(..., quant_type="nf4")``.

The layout and the exact float32 arithmetic are documented in :mod:`fastsft.reference.nf4`. Backends: ``cuda``
(the compiled ``fastsft::dequantize_nf4``: a CUDA kernel with 16-byte loads, C++ on the CPU), ``triton``
(``fastsft::dequantize_nf4_triton``) and ``reference``. Every backend writes into an output buffer
(``out=``), e.g. one reused across layers; the fused LoRA ops dequantize NF4 base weights through this op
(``fastsft.ops.lora.Bnb4bitWeight``). Frozen weights: no autograd.

``quantize_nf4`` (plain PyTorch, for tests and tools) and :func:`from_bnb` both return the keyword arguments of
:func:`dequantize_nf4`.
"""

from __future__ import annotations

import math
import torch

from fastsft.fakes import dequantize_nf4_fake
from fastsft import _extension, backends
from fastsft.reference import nf4 as reference
from fastsft.reference.nf4 import NESTED_BLOCKSIZE, NestedAbsmax, quantize_nf4

OP = "dequantize_nf4"
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes

__all__ = ["NESTED_BLOCKSIZE", "NestedAbsmax", "dequantize_nf4", "from_bnb", "quantize_nf4"]


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, *, shape, dtype: torch.dtype = torch.bfloat16,
                   blocksize: int = 64, code: torch.Tensor | None = None, nested: NestedAbsmax | None = None,
                   out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The dense weight of an NF4-packed tensor, equal bit for bit to bitsandbytes' ``dequantize_4bit``.

    Args:
        packed: the 4-bit codes, two a byte, high nibble first: ``ceil(n / 2)`` bytes for ``n = prod(shape)``
            elements (bitsandbytes' ``[n / 2, 1]`` uint8, or the same bytes in another ``quant_storage`` dtype);
            contiguous.
        absmax: float32 ``[ceil(n / blocksize)]`` block scales, or with ``nested`` their uint8 codes.
        shape: the dense shape (``QuantState.shape``).
        dtype: float32, float16 or bfloat16 (``QuantState.dtype``).
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        code: the 16 float32 code values (``QuantState.code``); None for NF4.
        nested: the double-quantization state (``NestedAbsmax(state2.absmax, state2.code, state2.blocksize,
            offset)``) when ``absmax`` holds uint8 codes; None otherwise.
        out: optional contiguous buffer of ``shape`` and ``dtype`` to write into (and return), e.g. one reused
            across layers.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see :mod:`fastsft.backends`).
    """
    packed, absmax, code, nested, shape, out = _check(packed, absmax, shape, dtype, blocksize, code, nested, out)
    if out.numel() == 0:
        return out
    backends.dispatch(OP, backend, packed.device, packed, absmax, code, nested, blocksize, out)
    return out


def dequantize_nf4_into(out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, **kwargs) -> torch.Tensor:
    """``dequantize_nf4(packed, absmax, out=out, shape=out.shape, dtype=out.dtype, **kwargs)``."""
    kwargs.setdefault("shape", tuple(out.shape))
    kwargs.setdefault("dtype", out.dtype)
    return dequantize_nf4(packed, absmax, out=out, **kwargs)


_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    if device not in _CODE_CACHE:
        _CODE_CACHE[device] = reference.nf4_code(device)
    return _CODE_CACHE[device]


def _check(packed, absmax, shape, dtype, blocksize, code, nested, out):
    for name, t in (("packed", packed), ("absmax", absmax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dequantize_nf4: {name} must be a tensor, got {type(t).__name__}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"dequantize_nf4: shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"dequantize_nf4: negative size in shape {shape}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be one of {OUT_DTYPES}, got {dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"dequantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    n = math.prod(shape)
    if not packed.is_contiguous():
        raise ValueError("dequantize_nf4: packed must be contiguous")
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: the same bytes in a wider dtype
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: shape {shape} has {n} elements, which need {(n + 1) // 2} packed bytes; "
                         f"got {packed.numel()}")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"dequantize_nf4: {n} elements in blocks of {blocksize} need {blocks} absmax values, got "
                         f"{absmax.numel()}")
    tensors = {"packed": packed, "absmax": absmax}
    if nested is None:
        if absmax.dtype != torch.float32:
            raise TypeError(f"dequantize_nf4: absmax must be float32 (uint8 only with nested=), got {absmax.dtype}")
    else:
        if not isinstance(nested, NestedAbsmax):
            if isinstance(nested, tuple) and len(nested) == 4:
                nested = NestedAbsmax(*nested)
            else:
                raise TypeError(f"dequantize_nf4: nested must be a NestedAbsmax or None, got {type(nested).__name__}")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"dequantize_nf4: with nested=, absmax must hold uint8 codes, got {absmax.dtype}")
        bs2 = nested.blocksize
        if isinstance(bs2, bool) or not isinstance(bs2, int) or bs2 <= 0:
            raise ValueError(f"dequantize_nf4: nested.blocksize must be a positive int, got {bs2!r}")
        for name, t, size in (("nested.absmax", nested.absmax, -(-blocks // bs2)), ("nested.code", nested.code, 256)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != size:
                got = f"{t.dtype} [{t.numel()}]" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"dequantize_nf4: {name} must be float32 with {size} values, got {got}")
        offset = float(nested.offset.item() if isinstance(nested.offset, torch.Tensor) else nested.offset)
        if not math.isfinite(offset):
            raise ValueError(f"dequantize_nf4: nested.offset must be finite, got {offset}")
        nested = NestedAbsmax(nested.absmax.reshape(-1).contiguous(), nested.code.reshape(-1).contiguous(), bs2, offset)
        tensors.update({"nested.absmax": nested.absmax, "nested.code": nested.code})
    if code is None:
        code = _nf4_code(packed.device)
    elif not isinstance(code, torch.Tensor) or code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError("dequantize_nf4: code must be a float32 tensor of 16 values (QuantState.code) or None")
    tensors["code"] = code
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"dequantize_nf4: out must be a tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"dequantize_nf4: out must be a contiguous {shape} {dtype} tensor, got "
                             f"{tuple(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' (not contiguous)'}")
        tensors["out"] = out
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError("dequantize_nf4: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {t.device}" for k, t in tensors.items()))
    return packed, absmax.reshape(-1).contiguous(), code.reshape(-1).contiguous(), nested, shape, out


def _flat_args(packed, absmax, code, nested, blocksize, out):
    """Positional arguments of the ``fastsft::dequantize_nf4*`` ops."""
    if nested is None:
        return packed, absmax, code, None, None, blocksize, NESTED_BLOCKSIZE, 0.0, out.view(-1)
    return (packed, absmax, code, nested.absmax, nested.code, blocksize, nested.blocksize, nested.offset,
            out.view(-1))


# --- backends ------------------------------------------------------------------------------------------------

@backends.register(OP, "reference")
def _reference_backend(packed, absmax, code, nested, blocksize, out):
    out.copy_(reference.dequantize_nf4(packed, absmax, shape=out.shape, dtype=out.dtype, blocksize=blocksize,
                                       code=code, nested=nested))


@backends.register(OP, "triton", available=backends.triton_available)
def _triton_backend(packed, absmax, code, nested, blocksize, out):
    from fastsft.triton_kernels import nf4 as kernels

    kernels.dequantize_nf4(*_flat_args(packed, absmax, code, nested, blocksize, out))


@backends.register(OP, "cuda", available=backends.extension_available("dequantize_nf4"))
def _cuda_backend(packed, absmax, code, nested, blocksize, out):
    torch.ops.fastsft.dequantize_nf4(*_flat_args(packed, absmax, code, nested, blocksize, out))


# --- the compiled op's fake (fastsft.fakes) ----------------------------------------------------------------

if _extension.load() and hasattr(torch.ops.fastsft, "dequantize_nf4"):  # an older build lacks it
    torch.library.register_fake("fastsft::dequantize_nf4")(dequantize_nf4_fake)


# --- bitsandbytes interop ------------------------------------------------------------------------------------

def from_bnb(param_or_module) -> dict:
    """The keyword arguments of :func:`dequantize_nf4` for a bitsandbytes ``Params4bit`` or ``Linear4bit``.

    ``dequantize_nf4(**from_bnb(layer))`` equals ``bitsandbytes.functional.dequantize_4bit(layer.weight,
    layer.weight.quant_state)``. The weight must already be quantized (moved to its device).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("fastsft.ops.from_bnb needs bitsandbytes (pip install bitsandbytes)") from exc
    param = getattr(param_or_module, "weight", param_or_module)
    state = getattr(param, "quant_state", None)
    if state is None:
        raise ValueError(f"from_bnb: {type(param_or_module).__name__} has no quant_state: not a 4-bit bitsandbytes "
                         "weight, or not quantized yet (bitsandbytes quantizes when the module moves to its device)")
    if state.quant_type != "nf4":
        raise ValueError(f"from_bnb: only NF4 is supported, got quant_type={state.quant_type!r}")
    nested = None
    if state.nested:
        s2 = state.state2
        offset = state.offset
        nested = NestedAbsmax(s2.absmax, s2.code, int(s2.blocksize),
                              float(offset.item() if isinstance(offset, torch.Tensor) else offset))
    code = state.code if isinstance(state.code, torch.Tensor) and state.code.numel() == 16 else None
    if code is not None:
        code = code.to(device=param.device, dtype=torch.float32)
    return {"packed": param.data, "absmax": state.absmax, "shape": tuple(state.shape), "dtype": state.dtype,
            "blocksize": int(state.blocksize), "code": code, "nested": nested}

