"""Reference NF4 (4-bit NormalFloat) dequantization and quantization, laid out as bitsandbytes stores it.

Layout (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``, ``QuantState``):

- ``packed``: uint8 (bitsandbytes keeps it as ``[ceil(n / 2), 1]``; another ``quant_storage`` dtype is the
  same bytes), two 4-bit codes a byte, **high nibble first**: element ``2i`` is ``byte[i] >> 4``, element
  ``2i + 1`` is ``byte[i] & 0xF``. ``n`` is the number of elements of the dense weight (``QuantState.shape``).
- ``absmax``: one float32 scale per block of ``blocksize`` consecutive elements (the last block may be short):
  element ``j`` uses ``absmax[j // blocksize]``.
- dense value: ``dtype(float32(code[q]) * float32(absmax))`` — the product in float32, rounded once to the output
  dtype (bitsandbytes' CUDA ``kDequantizeBlockwise`` and its PyTorch fallback both do this).
- double quantization (``QuantState.nested``): ``absmax`` is instead uint8 codes of a signed 8-bit dynamic map
  (``QuantState.state2.code``, 256 float32 values) with its own float32 scales in blocks of 256
  (``state2.absmax``, ``state2.blocksize``), and the float32 ``QuantState.offset`` (the mean of the absmax values
  subtracted before quantizing them). The float32 scale of block ``b`` is then
  ``(nested_code[absmax[b]] * nested_absmax[b // nested_blocksize]) + offset``: product rounded to float32,
  then the sum rounded to float32 (``dequantize_blockwise`` then ``absmax += offset`` — two float32 ops, no FMA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# bitsandbytes' NF4 table (``get_4bit_type("nf4")``; the same float32 constants as ``dDequantizeNF4`` in CUDA).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256


class NestedAbsmax(NamedTuple):
    """The second-level state of double-quantized absmax (bitsandbytes ``QuantState.state2`` and ``offset``)."""

    absmax: torch.Tensor  # float32 [ceil(blocks / blocksize)]
    code: torch.Tensor  # float32 [256], the dynamic map
    blocksize: int = NESTED_BLOCKSIZE
    offset: float = 0.0


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, float32, ascending."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map``: the 256-value signed dynamic 8-bit type, float32, ascending."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes (int64 [numel]) of ``packed``'s bytes, high nibble first."""
    b = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    codes = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)
    return codes[:numel]


def dequantize_absmax(absmax: torch.Tensor, nested: NestedAbsmax | None) -> torch.Tensor:
    """The float32 per-block scales: ``absmax`` itself, or its double-quantized form decoded."""
    if nested is None:
        return absmax.float()
    q = absmax.reshape(-1).to(torch.int64)
    scale = nested.absmax.float().repeat_interleave(nested.blocksize)[: q.numel()]
    decoded = nested.code.float()[q] * scale  # rounded to float32 here ...
    return decoded + torch.tensor(nested.offset, dtype=torch.float32)  # ... and the sum rounded again


def dequantize_nf4(packed, absmax, *, shape, dtype=torch.bfloat16, blocksize=64, code=None, nested=None):
    """The dense weight of ``shape`` in ``dtype``: ``dtype(code[q] * scale)`` in float32, see the module doc."""
    numel = math.prod(shape)
    code = nf4_code(packed.device) if code is None else code.float()
    scale = dequantize_absmax(absmax, nested)
    q = unpack_nibbles(packed, numel)
    block = torch.arange(numel, device=packed.device) // blocksize
    return (code[q] * scale[block]).to(dtype).reshape(shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, nested: bool = True) -> dict:
    """bitsandbytes' NF4 quantization (``quantize_4bit(..., compress_statistics=nested)``), in plain PyTorch.

    Per block: ``absmax = max |x|``; each ``x / absmax`` goes to the nearest NF4 value. With ``nested``, the
    absmax values minus their mean are quantized to the nearest value of the dynamic map, in blocks of 256
    scaled by their own float32 absmax. Ties may round differently from bitsandbytes' kernels; the format is
    the same. Returns the keyword arguments of :func:`dequantize_nf4`.
    """
    shape, dtype = tuple(weight.shape), weight.dtype
    x = weight.detach().reshape(-1).float()
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    q = _nearest(scaled, nf4_code(x.device))
    if n % 2:
        q = torch.cat((q, q.new_zeros(1)))
    packed = ((q[0::2] << 4) | q[1::2]).to(torch.uint8).reshape(-1, 1)
    state = None
    if nested:
        offset = absmax.mean()
        centered = absmax - offset
        nb = -(-blocks // NESTED_BLOCKSIZE)
        cpad = torch.nn.functional.pad(centered, (0, nb * NESTED_BLOCKSIZE - blocks)).reshape(nb, NESTED_BLOCKSIZE)
        absmax2 = cpad.abs().amax(dim=1)
        dmap = dynamic_map().to(x.device)
        qa = _nearest((cpad / absmax2.clamp(min=1e-38)[:, None]).reshape(-1)[:blocks], dmap)
        state = NestedAbsmax(absmax2, dmap, NESTED_BLOCKSIZE, float(offset))
        absmax = qa.to(torch.uint8)
    return {"packed": packed, "absmax": absmax, "shape": shape, "dtype": dtype, "blocksize": blocksize,
            "code": nf4_code(x.device), "nested": state}


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest ``table`` value (ascending) to each ``x``."""
    mid = (table[:-1] + table[1:]) / 2
    return torch.bucketize(x, mid)
