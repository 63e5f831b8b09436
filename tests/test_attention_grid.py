"""fastsft.ops.flash_attention_varlen on the GPU over the grid the field tests attention kernels with.

Modelled on flash-attn's varlen tests: head dims 32 to 256 including odd ones (59, 111), causal and not, sliding
window, softcap, MHA/MQA/GQA with K and V packed in one tensor, fp16 and bf16, and packed rows that hold
single-token, empty, shorter-than-a-block and 2048-token sequences, ending on a partial block. The error of the
output and of dQ/dK/dV against a float32 reference (upcast inputs) must be at most twice that of PyTorch's own
attention in the same dtype, plus the dtype's rounding near the values (flash-attn's criterion, element-wise).

Every power-of-two head dim runs with the pointer kernels and with the TMA kernels forced, whatever the card's
table chooses. The whole grid (``-m grid``, a few minutes on an H200 with ``-n 8``) runs in one device call of
``scripts/gpu_check.sh``'s ``test-grid`` stage; the cases without the mark are the quick subset that routine GPU runs
take.
"""

import zlib

import pytest
import torch

from fastsft.ops import flash_attention_varlen
from fastsft.reference import attention as ref
from helpers import eager_attention
from test_attention import poisoned  # noqa: F401 (a fixture: NaN-filled launcher buffers)

pytestmark = pytest.mark.gpu

HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
QUICK_HEAD_DIMS = {59, 96, 128, 256}
HEADS = {"mha": (6, 6, True), "gqa": (6, 2, False), "mqa": (6, 1, True)}  # (Hq, Hkv, K and V packed in one tensor)
MODES = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "window": dict(causal=True, window=None),  # the window size is drawn per case
    "softcap": dict(causal=True, softcap=5.0),
    "noncausal-softcap": dict(causal=False, softcap=5.0),
}
# one packed row: single tokens, an empty sequence in the middle and one at the end, lengths around block edges
# (16 .. 128), 1023/1024/1025 and 2048, shuffled per case except the trailing empty one
LENGTHS = [1, 1, 2, 3, 0, 15, 16, 17, 31, 33, 63, 64, 65, 97, 113, 127, 128, 129, 147, 511, 1023, 1024, 1025, 2048]


def _kernels(d):
    return ["pointer", "tma"] if d == 1 << (d.bit_length() - 1) else ["pointer"]


def _grid():
    cases = []
    for d in HEAD_DIMS:
        for kernels in _kernels(d):
            for mode in MODES:
                for heads in HEADS:
                    for dtype in (torch.bfloat16, torch.float16):
                        quick = (d in QUICK_HEAD_DIMS and heads == "gqa" and dtype == torch.bfloat16
                                 and mode != "noncausal-softcap")
                        name = f"d{d}-{kernels}-{mode}-{heads}-{str(dtype).split('.')[-1]}"
                        cases.append(pytest.param(d, kernels, mode, heads, dtype, id=name,
                                                  marks=() if quick else pytest.mark.grid))
    return cases


@pytest.fixture
def kernels(request, monkeypatch):
    """Force the pointer or the TMA kernels: the card's table otherwise decides per kernel."""
    from fastsft.triton_kernels import flash_attention as fa

    choice = request.param
    table_config = fa.kernel_config

    def forced(*args, **kwargs):
        cfg = table_config(*args, **kwargs)
        cfg["tma"] = choice == "tma"
        return cfg

    monkeypatch.setattr(fa, "kernel_config", forced)
    if choice == "tma":  # the forced choice must really run: count the TMA launches
        from fastsft.triton_kernels import flash_attention_tma as fa_tma

        launches = []
        for name in ("launch_fwd_tma", "launch_dq_tma", "launch_dkdv_tma"):
            original = getattr(fa_tma, name)

            def counted(*a, _original=original, _name=name, **kw):
                launches.append(_name)
                return _original(*a, **kw)

            monkeypatch.setattr(fa_tma, name, counted)
        yield launches
        assert sorted(set(launches)) == ["launch_dkdv_tma", "launch_dq_tma", "launch_fwd_tma"]
    else:
        yield None


def packed_inputs(lengths, hq, hkv, d, dtype, *, kv_packed, scale=1.0, seed=0):
    """q [total, Hq, D]; k and v [total, Hkv, D], as views of one [total, 2, Hkv, D] tensor when ``kv_packed``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q = (torch.randn(total, hq, d, device="cuda", generator=g) * scale).to(dtype)
    if kv_packed:
        kv = torch.randn(total, 2, hkv, d, device="cuda", generator=g).to(dtype)
        k, v = kv[:, 0], kv[:, 1]
    else:
        k, v = (torch.randn(total, hkv, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, k, v, cu


def _grads(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    return out, dq, dk, dv


def assert_within_eager_error(name, got, want, eager):
    """flash-attn's criterion: max |got - want| <= 2 max |eager - want| + 2 x the dtype's rounding near ``want``."""
    low = want.to(got.dtype)
    rounding = 2 * (low + 0.3 - 0.3 - low).abs().max().item()
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite values"
    err = (got.float() - want).abs().max().item()
    eager_err = (eager.float() - want).abs().max().item()
    assert err <= 2 * eager_err + rounding, (
        f"{name}: max error {err:.4g} > 2 x eager's {eager_err:.4g} + {rounding:.3g}")


def check_against_eager(q, k, v, cu, max_seqlen, **opts):
    torch.manual_seed(1)
    upstream = torch.randn(q.shape, device="cuda").to(q.dtype)
    got = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu, max_seqlen, backend="triton", **opts),
                 q, k, v, upstream)
    torch.cuda.synchronize()  # an illegal access is reported here, against this case
    want = _grads(lambda q, k, v: ref.flash_attention_varlen(q.float(), k.float(), v.float(), cu, **opts),
                  q, k, v, upstream)
    eager = _grads(lambda q, k, v: eager_attention(q, k, v, cu, **opts), q, k, v, upstream)
    for name, g, w, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        assert_within_eager_error(name, g, w, e)


@pytest.mark.parametrize("d,kernels,mode,heads,dtype", _grid(), indirect=["kernels"])
def test_field_grid(d, kernels, mode, heads, dtype, poisoned):
    seed = zlib.crc32(f"{d}-{mode}-{heads}-{dtype}".encode())  # the same draw in every process and run
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(LENGTHS), generator=g).tolist()
    lengths = [LENGTHS[i] for i in order] + [0]  # an empty sequence at the very end too
    hq, hkv, kv_packed = HEADS[heads]
    opts = dict(MODES[mode])
    if mode == "window":
        opts["window"] = int(torch.randint(1, 1100, (1,), generator=g))
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, dtype, kv_packed=kv_packed, seed=seed,
                                scale=4.0 if "softcap" in opts else 1.0)  # scores large enough for the cap to bite
    check_against_eager(q, k, v, cu, max(lengths), **opts)


@pytest.mark.parametrize("kernels", ["pointer"], indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_96_padded_batch_kv_packed(kernels, causal, poisoned):
    """A batch of four 1024-token rows with random padding removed (uneven lengths 1004..1024), 32 heads of 96,
    K and V packed: the backward of this case once read out of bounds."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1004, 1025, (4,), generator=g).tolist()
    q, k, v, cu = packed_inputs(lengths, 32, 32, 96, torch.bfloat16, kv_packed=True)
    check_against_eager(q, k, v, cu, 1024, causal=causal)
