"""NF4 dequantization: every backend bit for bit against the pure-PyTorch unpacker (code table, nibble order,
double-quantized absmax, odd shapes), the quantizer's round trip, bad input, opcheck; bitsandbytes' own
``dequantize_4bit`` where it is installed (its CPU path here, real ``Linear4bit`` weights at 8B shapes on the GPU)."""

import copy
import sys

import pytest
import torch

from fastsft import backends
from fastsft.ops import NestedAbsmax, dequantize_nf4, dequantize_nf4_into, from_bnb, quantize_nf4
from fastsft.reference import nf4 as ref
from helpers import DEVICES, backend_params, opcheck, opcheck_triton

OP = "dequantize_nf4"
CASES = [pytest.param(d, b.values[0], id=f"{d}-{b.id}", marks=b.marks) for d in DEVICES for b in backend_params(OP, d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numel a multiple of the blocksize with odd rows; a partial last block; an odd numel (half a byte unused)
SHAPES = [(96, 200), (7, 33), (3001,), (64,)]


def _bnb():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as F
    except Exception as exc:  # ImportError, or a broken install
        pytest.skip(f"bitsandbytes is not importable ({type(exc).__name__}: {exc}); pip install bitsandbytes")
    return F


def _quantized(shape, device, *, nested, blocksize=64, scale=1.0):
    w = torch.randn(shape, dtype=torch.float64).mul(scale).float().to(device)
    return w, quantize_nf4(w, blocksize=blocksize, nested=nested)


def _assert_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        idx = int(diff.flatten().argmax())
        raise AssertionError(f"{what}: {int((actual != expected).sum())} elements differ; worst at flat {idx}: "
                             f"{actual.flatten()[idx].item()} vs {expected.flatten()[idx].item()}")


# --- the reference itself ------------------------------------------------------------------------------------

def test_code_table_values():
    code = ref.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert code[0] == -1.0 and code[7] == 0.0 and code[15] == 1.0
    assert torch.all(code[1:] > code[:-1])
    # spot values of bitsandbytes' table (get_4bit_type("nf4"), dDequantizeNF4)
    assert code[8].item() == torch.tensor(0.07958029955625534, dtype=torch.float32).item()
    assert code[1].item() == torch.tensor(-0.6961928009986877, dtype=torch.float32).item()
    dmap = ref.dynamic_map()
    assert dmap.shape == (256,) and dmap.dtype == torch.float32 and (dmap == 0).any()
    assert dmap.max() == 1.0 and dmap.min() > -1.0 and torch.all(dmap[1:] >= dmap[:-1])


def test_dynamic_map_matches_bitsandbytes():
    F = _bnb()
    assert torch.equal(ref.dynamic_map(), F.create_dynamic_map(signed=True))
    assert torch.equal(ref.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


def test_reference_against_scalar_arithmetic():
    """The reference against an element-by-element float32 evaluation of the documented formula."""
    _, q = _quantized((5, 70), "cpu", nested=True, blocksize=32)
    got = ref.dequantize_nf4(q["packed"], q["absmax"], shape=q["shape"], dtype=torch.float32, blocksize=32,
                             nested=q["nested"])
    packed = q["packed"].flatten().tolist()
    nest = q["nested"]
    f32 = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
    for j in range(350):
        nibble = packed[j // 2] >> 4 if j % 2 == 0 else packed[j // 2] & 0xF
        b = j // 32
        scale = f32(nest.code[int(q["absmax"][b])] * nest.absmax[b // 256]) + f32(nest.offset)
        want = f32(ref.NF4_VALUES[nibble]) * scale
        assert got.flatten()[j].item() == want.item(), j


# --- backends against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", CASES)
def test_nibble_order_high_first(device, backend):
    # byte 0x0F: element 0 = code[0] = -1, element 1 = code[15] = +1; 0x78: code[7] = 0, code[8]
    packed = torch.tensor([0x0F, 0x78] + [0x00] * 14, dtype=torch.uint8, device=device).reshape(-1, 1)
    absmax = torch.tensor([2.0], device=device)
    out = dequantize_nf4(packed, absmax, shape=(32,), dtype=torch.float32, blocksize=32, backend=backend)
    code = ref.nf4_code()
    assert out[:4].tolist() == [-2.0, 2.0, 0.0, (code[8] * 2).item()]
    assert torch.all(out[4:] == -2.0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equal_to_reference(device, backend, nested, shape):
    _, q = _quantized(shape, device, nested=nested, scale=3.0)
    for dtype in DTYPES:
        q["dtype"] = dtype
        want = ref.dequantize_nf4(**q)
        _assert_equal(dequantize_nf4(**q, backend=backend), want, f"{dtype}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_block_sizes(device, backend, blocksize):
    _, q = _quantized((3, 2900), device, nested=True, blocksize=blocksize)
    q["dtype"] = torch.bfloat16
    _assert_equal(dequantize_nf4(**q, backend=backend), ref.dequantize_nf4(**q), f"blocksize {blocksize}")


@pytest.mark.parametrize("device,backend", CASES)
def test_large_values_round_to_nearest_even(device, backend):
    """bf16/fp16 outputs are rounded once from float32 products, to nearest even (big scales, many ties)."""
    _, q = _quantized((64, 96), device, nested=False, scale=1e4)
    q["absmax"] = q["absmax"].clone()
    q["absmax"][::2] = 3.0 * 2.0 ** 8  # exactly representable scales make exact ties in the products
    for dtype in (torch.float16, torch.bfloat16):
        q["dtype"] = dtype
        _assert_equal(dequantize_nf4(**q, backend=backend), ref.dequantize_nf4(**q), f"{dtype}")


@pytest.mark.parametrize("device,backend", CASES)
def test_into_reused_buffer_and_quant_storage(device, backend):
    _, q1 = _quantized((64, 48), device, nested=True)
    _, q2 = _quantized((64, 48), device, nested=False)
    buf = torch.full((64, 48), float("nan"), dtype=torch.bfloat16, device=device)
    for q in (q1, q2):
        q["dtype"] = torch.bfloat16
        got = dequantize_nf4_into(buf, q["packed"], q["absmax"], blocksize=64, nested=q["nested"], backend=backend)
        assert got is buf
        _assert_equal(buf, ref.dequantize_nf4(**q), "into")
    # bitsandbytes' quant_storage: the same bytes held in another dtype
    q = dict(q1, packed=q1["packed"].reshape(-1).view(torch.bfloat16).reshape(-1, 1))
    _assert_equal(dequantize_nf4(**q, backend=backend), ref.dequantize_nf4(**q1), "bf16 storage")


@pytest.mark.parametrize("device,backend", CASES)
def test_empty(device, backend):
    out = dequantize_nf4(torch.empty(0, 1, dtype=torch.uint8, device=device), torch.empty(0, device=device),
                         shape=(0, 64), backend=backend)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


# --- quantizer round trip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_quantize_round_trip_error_bounded(nested):
    w, q = _quantized((96, 200), "cpu", nested=nested)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    half_gap = (ref.nf4_code()[1:] - ref.nf4_code()[:-1]).max().item() / 2
    q["dtype"] = torch.float32
    deq = dequantize_nf4(**q, backend="reference").reshape(-1, 64)
    scale = ref.dequantize_absmax(q["absmax"], q["nested"]).reshape(-1, 1)
    if nested:
        assert ((scale - absmax).abs() / absmax).max() < 0.02  # the 8-bit dynamic map keeps absmax within 2%
    bound = absmax * half_gap * 1.0001 + (scale - absmax).abs()
    assert torch.all((deq - blocks).abs() <= bound)
    assert torch.all(deq.abs() <= scale.abs() * 1.0001)
    rel = ((deq - blocks).norm() / blocks.norm()).item()
    assert rel < 0.12, rel  # NF4 on Gaussian weights: about 0.1


def test_quantize_layout():
    w, q = _quantized((6, 32), "cpu", nested=False, blocksize=32)
    assert q["packed"].shape == (96, 1) and q["packed"].dtype == torch.uint8
    assert q["absmax"].shape == (6,) and torch.equal(q["absmax"], w.abs().amax(1))
    # each row's maximum maps to code 15 (+1) or 0 (-1), in its own nibble
    nibbles = ref.unpack_nibbles(q["packed"], 192).reshape(6, 32)
    arg = w.abs().argmax(1)
    for r in range(6):
        assert nibbles[r, arg[r]] == (15 if w[r, arg[r]] > 0 else 0)
    _, qn = _quantized((300, 64), "cpu", nested=True)
    assert qn["absmax"].dtype == torch.uint8 and qn["nested"].absmax.shape == (2,)
    assert qn["nested"].code.shape == (256,) and qn["nested"].blocksize == 256


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_inputs():
    _, q = _quantized((8, 64), "cpu", nested=True)
    _, p = _quantized((8, 64), "cpu", nested=False)

    def call(**over):
        args = dict(p, **over)
        return dequantize_nf4(**args, backend="reference")

    with pytest.raises(ValueError, match="packed bytes"):
        call(packed=p["packed"][:-1])
    with pytest.raises(ValueError, match="absmax values"):
        call(absmax=p["absmax"][:-1])
    with pytest.raises(TypeError, match="absmax must be float32"):
        call(absmax=p["absmax"].half())
    with pytest.raises(ValueError, match="blocksize"):
        call(blocksize=48)
    with pytest.raises(TypeError, match="dtype"):
        call(dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        call(packed=torch.zeros(512, 2, dtype=torch.uint8)[:, 0])
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(8, 65, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(8, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="code must be"):
        call(code=torch.zeros(15))
    with pytest.raises(TypeError, match="uint8 codes"):
        dequantize_nf4(**dict(q, absmax=q["absmax"].float()))
    bad = q["nested"]._replace(code=q["nested"].code[:255])
    with pytest.raises(ValueError, match="nested.code"):
        dequantize_nf4(**dict(q, nested=bad))
    with pytest.raises(ValueError, match="nested.absmax"):
        dequantize_nf4(**dict(q, nested=q["nested"]._replace(absmax=q["nested"].absmax.double())))
    with pytest.raises(ValueError, match="finite"):
        dequantize_nf4(**dict(q, nested=q["nested"]._replace(offset=float("nan"))))
    with pytest.raises(TypeError, match="packed must be a tensor"):
        call(packed=[1, 2])


@pytest.mark.gpu
def test_mixed_devices_rejected():
    _, p = _quantized((8, 64), "cpu", nested=False)
    with pytest.raises(ValueError, match="one device"):
        dequantize_nf4(**dict(p, absmax=p["absmax"].cuda()))


def test_compiled_op_checks_its_arguments():
    reason = backends.unavailable_reason(OP, "cuda", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    _, p = _quantized((8, 64), "cpu", nested=False)
    out = torch.empty(512, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="packed must have 256 elements"):
        torch.ops.fastsft.dequantize_nf4(p["packed"].flatten()[:-2], p["absmax"], ref.nf4_code(), None, None, 64,
                                         256, 0.0, out)
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.fastsft.dequantize_nf4(p["packed"].flatten(), p["absmax"], ref.nf4_code(), None, None, 48, 256,
                                         0.0, out)


# --- opcheck -------------------------------------------------------------------------------------------------

def _op_args(device, nested):
    _, q = _quantized((4, 96), device, nested=nested)
    out = torch.empty(384, dtype=torch.bfloat16, device=device)
    n = q["nested"]
    if n is None:
        return (q["packed"].flatten(), q["absmax"], q["code"], None, None, 64, 256, 0.0, out)
    return (q["packed"].flatten(), q["absmax"], q["code"], n.absmax, n.code, 64, n.blocksize, n.offset, out)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_compiled(device):
    reason = backends.unavailable_reason(OP, "cuda", torch.device(device))
    if reason:
        pytest.skip(reason)
    for nested in (False, True):
        opcheck(torch.ops.fastsft.dequantize_nf4.default, _op_args(device, nested))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton(device):
    reason = backends.unavailable_reason(OP, "triton", torch.device(device))
    if reason:
        pytest.skip(reason)
    from fastsft.triton_kernels import nf4  # noqa: F401 (registers the op)

    for nested in (False, True):
        opcheck_triton(torch.ops.fastsft.dequantize_nf4_triton.default, _op_args(device, nested))


# --- bitsandbytes --------------------------------------------------------------------------------------------

def test_from_bnb_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        from_bnb(object())


def _bnb_param(F, w, nested, blocksize=64):
    import bitsandbytes as bnb

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=nested, quant_type="nf4", bnb_quantized=True), state


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_equal_to_bitsandbytes_on_cpu(device, backend, nested):
    F = _bnb()
    # bitsandbytes' CPU kernel works row by row and is wrong when the blocksize exceeds a row (e.g. [33, 64] in
    # blocks of 128: its bug, not ours; the GPU test covers CUDA's): rows of at least a block here, and an odd
    # last dim, which bitsandbytes sends to its PyTorch fallback.
    for shape, blocksize in (((96, 200), 64), ((40, 256), 128), ((6, 33), 64)):
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        param, state = _bnb_param(F, w, nested, blocksize)
        kwargs = from_bnb(param)
        assert kwargs["nested"] is not None if nested else kwargs["nested"] is None
        for dtype in DTYPES:
            st = copy.copy(state)
            st.dtype = dtype
            want = F.dequantize_4bit(param.data, st)
            _assert_equal(dequantize_nf4(**dict(kwargs, dtype=dtype), backend=backend), want, f"{shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in backend_params(OP, "cuda")] if torch.cuda.is_available()
                         else ["cuda", "triton", "reference"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("out_features,in_features", [(4096, 4096), (14336, 4096), (1000, 4096)])
def test_equal_to_bitsandbytes_linear4bit_on_gpu(backend, nested, out_features, in_features):
    F = _bnb()
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02,
                                     requires_grad=False, compress_statistics=nested, quant_type="nf4")
    layer = layer.cuda()  # bitsandbytes quantizes on the move
    state = layer.weight.quant_state
    assert state.nested == nested and tuple(state.shape) == (out_features, in_features)
    kwargs = from_bnb(layer)
    for dtype in DTYPES:
        st = copy.copy(state)
        st.dtype = dtype
        want = F.dequantize_4bit(layer.weight.data, st)
        got = dequantize_nf4(**dict(kwargs, dtype=dtype), backend=backend)
        _assert_equal(got, want, f"{backend} {dtype}")
        buf = torch.empty_like(want)
        dequantize_nf4(**dict(kwargs, dtype=dtype), out=buf, backend=backend)
        _assert_equal(buf, want, f"{backend} {dtype} into a buffer")
