"""Every Triton and CUDA kernel of fastsft on a small grid of odd shapes, forward and backward, one backend at a time:
a driver for NVIDIA's compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \\
        python3 scripts/sanitize_kernels.py [--ops attention,rms_norm,...] [--quick]

Without the caching allocator every tensor is its own allocation, so memcheck sees a read or write past a tensor's
end even where the next tensor would have been. The grid takes sizes like 1, 3, 17, 97 and 129, shapes shorter than
one block, empty batches where an op accepts them, sequences of length 0 and 1, and a packed row whose last block is
partial; flash attention runs both its pointer kernels and its TMA kernels (head dim 128, sm_90+), each forced by its
launch configuration. Each case also compares its results with the reference backend (loosely: the tests do the
precise checks), so a kernel that writes the wrong elements without touching foreign memory is caught too.

One line per case, then ``N cases, N failed``. A case's Python exception is printed and counted and the script goes
on; the exit status is 1 when any case failed. ``torch.cuda.synchronize()`` after every case attributes an
asynchronous error to its case. ``--device cpu`` runs the same cases on the CPU (Triton in its interpreter, the
``cuda`` backend as the extension's C++ kernels; bfloat16 becomes float16 there, as the interpreter's bf16 dot is
wrong): a check of this script's logic, not of the kernels' device code. ``--planted-fault`` runs only a kernel that
reads one element past its input, which memcheck must report: ``scripts/gpu_check.sh``'s ``sanitize`` stage fails
when it is not reported, so a sanitizer that sees nothing cannot pass the stage.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

OPS = ("attention", "linear_cross_entropy", "rms_norm", "rope", "gated_activation", "lora", "nf4")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-check", action="store_true", help="only run the kernels; skip the reference check")
    parser.add_argument("--planted-fault", action="store_true",
                        help="only run a kernel that reads one element past its input: memcheck must report it "
                             "(a check that the sanitizer sees this script's Triton kernels at all)")
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {OPS}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: jit reads it at decoration time

import torch  # noqa: E402

from fastsft import backends  # noqa: E402
from fastsft.ops import (dequantize_nf4, flash_attention_varlen, geglu, linear_cross_entropy,  # noqa: E402
                         lora_linear, lora_mlp, lora_qkv, quantize_nf4, rms_norm, rope, swiglu)
from fastsft.patching.lora import fused_lora_forward, lora_eligibility  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# norm-wise relative error allowed against the float64 reference: loose, a sanity check beside memcheck
RTOL = {F32: 1e-3, F16: 3e-2, BF16: 6e-2}
DTYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16"}


class Runner:
    def __init__(self, device: torch.device, check: bool):
        self.device, self.check, self.cases, self.failed = device, check, 0, []

    def dtype(self, dtype):
        """bfloat16 on a GPU; float16 in the CPU interpreter, whose bf16 dot is wrong."""
        return F16 if self.device.type == "cpu" and dtype == BF16 else dtype

    def run(self, name: str, fn) -> None:
        self.cases += 1
        start = time.perf_counter()
        try:
            note = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (every failure is reported and counted; the run goes on)
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stdout)
            if self.device.type == "cuda":
                try:  # a sticky CUDA error fails every later case too; the first failure is the one to read
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
            return
        extra = f" [{note}]" if note else ""
        print(f"ok   {name} ({time.perf_counter() - start:.2f} s){extra}", flush=True)

    def close(self, name, got, want, dtype):
        if not self.check:
            return
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise AssertionError(f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values")
        # relative to the values' norm, or to a tenth of the norm of unit values where they nearly cancel (RMSNorm's
        # input gradient at hidden size 1 is ~0: its relative error means nothing)
        denom = max(want.norm().item(), 0.1 * math.sqrt(want.numel()))
        err = (got - want).norm().item() / (denom if denom > 0 else 1.0)
        if err > RTOL[dtype]:
            raise AssertionError(f"{name}: relative error {err:.3g} > {RTOL[dtype]:.3g}")


# --- shared helpers ----------------------------------------------------------------------------------------------

def rand(shape, dtype, device, *, scale=1.0, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def upstreams(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]


def forward_backward(fn, leaves):
    """``fn()``'s outputs (a tuple) and the gradients of ``sum(out * upstream)`` w.r.t. the ``leaves`` that require
    grad (zeros for those the outputs do not reach)."""
    outs = fn()
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    if not wanted or not diff:
        return outs, ()
    total = sum((o.double() * u).sum() for o, u in zip(diff, upstreams(diff)))
    return outs, torch.autograd.grad(total, wanted, allow_unused=True, materialize_grads=True)


def fresh(t, dtype=None):
    """A new leaf with ``t``'s values (in ``dtype``) and its requires_grad; non-tensors pass through."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(t.requires_grad)


def against_reference(runner, name, call, backend, tensors, dtype):
    """``call(backend, *tensors)`` against ``call("reference", *tensors in float64)``, outputs and gradients."""
    got_leaves = [fresh(t) for t in tensors]
    outs, grads = forward_backward(lambda: call(backend, *got_leaves), got_leaves)
    if not runner.check:
        return
    ref_leaves = [fresh(t, torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in tensors]
    ref_outs, ref_grads = forward_backward(lambda: call("reference", *ref_leaves), ref_leaves)
    for i, (g, w) in enumerate(zip((*outs, *grads), (*ref_outs, *ref_grads))):
        if g.is_floating_point():
            runner.close(f"{name} #{i}", g, w, dtype)
        elif not torch.equal(g.cpu(), w.cpu()):
            raise AssertionError(f"{name} #{i}: integer outputs differ")


def fast_backends(op, device):
    """The op's non-reference backends that can run here (the reason for those that cannot is printed)."""
    names = []
    for b in backends.registered(op):
        if b == "reference":
            continue
        reason = backends.unavailable_reason(op, b, device)
        if reason:
            print(f"skip {op}/{b}: {reason}", flush=True)
        else:
            names.append(b)
    return names


# --- flash attention ---------------------------------------------------------------------------------------------

def _lengths_to_cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


class _ForcedTma:
    """``kernel_config`` answering the card's (or the interpreter's) configuration with ``tma`` set to ``on``, and a
    count of the TMA launches, for one case."""

    def __init__(self, on: bool):
        from fastsft.triton_kernels import flash_attention as fa
        from fastsft.triton_kernels import flash_attention_tma as fa_tma

        self.on, self.fa, self.fa_tma, self.launches, self.saved = on, fa, fa_tma, 0, {}

    def __enter__(self):
        original = self.fa.kernel_config
        self.saved["kernel_config"] = (self.fa, original)
        self.fa.kernel_config = lambda *a, **kw: dict(original(*a, **kw), tma=self.on)
        for name in ("launch_fwd_tma", "launch_dq_tma", "launch_dkdv_tma"):
            launch = getattr(self.fa_tma, name)
            self.saved[name] = (self.fa_tma, launch)

            def counted(*args, _launch=launch):
                self.launches += 1
                return _launch(*args)

            setattr(self.fa_tma, name, counted)
        return self

    def __exit__(self, *exc):
        for name, (module, value) in self.saved.items():
            setattr(module, name, value)
        return False


def attention_cases(runner, quick):
    device = runner.device
    # (name, lengths, Hq, Hkv, D, dtype, options); lengths hold 0- and 1-token sequences, and end with a sequence
    # whose last block is partial, so the packed row's last tile runs past its end
    mixed = [1, 0, 97, 3, 0, 129, 17]
    cases = [
        ("d128-gqa4-causal", mixed, 4, 1, 128, BF16, {}),
        ("d128-mha-window17-softcap", mixed, 2, 2, 128, BF16, {"window": 17, "softcap": 5.0}),
        ("d128-gqa2-noncausal", [3, 129, 1, 0, 97], 4, 2, 128, BF16, {"causal": False}),
        ("d96-gqa2-causal", mixed, 4, 2, 96, BF16, {}),
        ("d59-mqa-softcap", [17, 1, 0, 97], 3, 1, 59, BF16, {"softcap": 3.0}),
        ("d59-noncausal-scale", [1, 129, 3], 2, 2, 59, BF16, {"causal": False, "softmax_scale": 0.3}),
        ("d128-gqa2", [17, 0, 1, 129], 4, 2, 128, F32, {}),
        ("d96-window3", [97, 1, 3], 2, 1, 96, F32, {"window": 3}),
        ("one-token", [1], 2, 1, 128, BF16, {}),
        ("empty-batch", [], 2, 1, 128, BF16, {}),
        ("all-empty-sequences", [0, 0], 2, 1, 64, BF16, {}),
    ]
    tma_cases = [
        ("d128-gqa4-causal", mixed, 4, 1, 128, BF16, {}),
        ("d128-gqa2-noncausal", [3, 129, 1, 0, 97], 4, 2, 128, BF16, {"causal": False}),
        ("d128-mha-window17-softcap", mixed, 2, 2, 128, BF16, {"window": 17, "softcap": 5.0}),
        ("d128-f16-gqa2-short", [1, 17, 0, 3], 4, 2, 128, F16, {}),
    ]
    if quick:
        cases = [cases[i] for i in (0, 3, 4, 9)]
        tma_cases = tma_cases[:2]
    if device.type == "cpu":  # the interpreter is slow: fewer, shorter sequences (129 -> 33, 97 -> 21)
        shorten = {129: 33, 97: 21}
        cases = [(n, [shorten.get(x, x) for x in ls], hq, hkv, d, F32 if dt == BF16 else dt, o)
                 for n, ls, hq, hkv, d, dt, o in cases]
        tma_cases = [(n, [shorten.get(x, x) for x in ls], hq, hkv, d, F32 if dt == BF16 else dt, o)
                     for n, ls, hq, hkv, d, dt, o in tma_cases]

    def call(backend, q, k, v, cu, max_seqlen, opts):
        return flash_attention_varlen(q, k, v, cu, max_seqlen, backend=backend, **opts)

    def one(lengths, hq, hkv, d, dtype, opts, tma):
        total = sum(lengths)
        q = rand((total, hq, d), dtype, device, grad=True, seed=1)
        k = rand((total, hkv, d), dtype, device, grad=True, seed=2)
        v = rand((total, hkv, d), dtype, device, grad=True, seed=3)
        cu = _lengths_to_cu(lengths, device)
        with _ForcedTma(tma) as forced:
            against_reference(runner, "attention", lambda be, q_, k_, v_: call(be, q_, k_, v_, cu, max(lengths,
                              default=0), opts), "triton", (q, k, v), dtype)
        # the TMA kernels need a power-of-two head dim and sm_90+; a forced pointer run must not take them
        if tma and d == 128 and total and _tma_capable(device) and forced.launches != 3:
            raise AssertionError(f"expected 3 TMA launches (fwd, dq, dkdv), got {forced.launches}")
        if not tma and forced.launches:
            raise AssertionError(f"pointer kernels forced, but {forced.launches} TMA launches")
        return f"{forced.launches} TMA launches" if tma else ""

    if "triton" not in fast_backends("flash_attention_varlen", device):
        return
    for name, lengths, hq, hkv, d, dtype, opts in cases:
        runner.run(f"attention/triton/pointer/{name}-{DTYPE_NAMES[dtype]}",
                   lambda: one(lengths, hq, hkv, d, dtype, opts, tma=False))
    for name, lengths, hq, hkv, d, dtype, opts in tma_cases:
        runner.run(f"attention/triton/tma/{name}-{DTYPE_NAMES[dtype]}",
                   lambda: one(lengths, hq, hkv, d, dtype, opts, tma=True))


def _tma_capable(device):
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


# --- linear cross-entropy ----------------------------------------------------------------------------------------

def linear_cross_entropy_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    # (name, T, H, V, dtype, options): V below one row block, V just past the 4096 block; chunks of 8 leave a ragged
    # last chunk; ignored rows; an empty batch; every token ignored
    cases = [
        ("T17-V97-mean-bias-wgrad", 17, 59, 97, bf16, dict(reduction="mean", bias=True, weight_grad=True,
                                                           chunk_size=8)),
        ("T3-V4099-none-softcap", 3, 64, 4099, bf16, dict(reduction="none", softcap=30.0)),
        ("T129-V129-sum-scale", 129, 17, 129, F32, dict(reduction="sum", logit_scale=0.5, chunk_size=32,
                                                        weight_grad=True)),
        ("T1-V3", 1, 3, 3, bf16, dict(reduction="mean")),
        ("T0-empty", 0, 32, 97, bf16, dict(reduction="mean")),
        ("T17-all-ignored", 17, 32, 97, bf16, dict(reduction="mean", ignore_all=True, weight_grad=True)),
    ]
    if quick:
        cases = cases[:2] + cases[4:5]

    def one(backend, T, H, V, dtype, opts):
        opts = dict(opts)
        with_bias, weight_grad = opts.pop("bias", False), opts.pop("weight_grad", False)
        ignore_all = opts.pop("ignore_all", False)
        hidden = rand((T, H), dtype, device, grad=True, seed=1)
        weight = (rand((V, H), torch.float64, device, seed=2) / math.sqrt(H)).to(dtype).requires_grad_(weight_grad)
        bias = rand((V,), dtype, device, scale=0.1, grad=True, seed=3) if with_bias else None
        g = torch.Generator().manual_seed(4)
        labels = torch.randint(0, V, (T,), generator=g)
        labels[torch.rand(T, generator=g) < 0.3] = -100
        if ignore_all:
            labels.fill_(-100)
        labels = labels.to(device)

        def call(be, h, w, b):
            kw = dict(opts) if be != "reference" else {k: x for k, x in opts.items() if k != "chunk_size"}
            return linear_cross_entropy(h, w, labels, bias=b, backend=be, **kw)

        against_reference(runner, "loss", call, backend, (hidden, weight, bias), dtype)

    for backend in fast_backends("linear_cross_entropy", device):
        for name, T, H, V, dtype, opts in cases:
            runner.run(f"linear_cross_entropy/{backend}/{name}-{DTYPE_NAMES[dtype]}",
                       lambda: one(backend, T, H, V, dtype, opts))


# --- RMSNorm -------------------------------------------------------------------------------------------------------

def rms_norm_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    # (rows, hidden, dtype, offset, residual, weight_grad)
    cases = [(1, 1, bf16, 0.0, False, True), (3, 17, bf16, 1.0, True, True), (97, 129, bf16, 0.0, True, False),
             (17, 4099, F32, 1.0, False, True), (0, 64, bf16, 0.0, True, True)]
    if quick:
        cases = cases[1:3] + cases[4:]

    def one(backend, rows, hidden, dtype, offset, residual, weight_grad):
        x = rand((rows, hidden), dtype, device, grad=True, seed=1)
        w = (rand((hidden,), torch.float64, device, scale=0.1, seed=2) + 1.0 - offset).to(dtype)
        w.requires_grad_(weight_grad)
        r = rand((rows, hidden), dtype, device, grad=True, seed=3) if residual else None

        def call(be, x_, w_, r_):
            return rms_norm(x_, w_, 1e-6, offset=offset, residual=r_, backend=be)

        against_reference(runner, "rms_norm", call, backend, (x, w, r), dtype)

    for backend in fast_backends("rms_norm", device):
        for rows, hidden, dtype, offset, residual, weight_grad in cases:
            name = (f"rms_norm/{backend}/{rows}x{hidden}-{DTYPE_NAMES[dtype]}-offset{offset:g}"
                    f"{'-residual' if residual else ''}{'' if weight_grad else '-frozen-weight'}")
            runner.run(name, lambda: one(backend, rows, hidden, dtype, offset, residual, weight_grad))


# --- RoPE ----------------------------------------------------------------------------------------------------------

def rope_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    # (B, Hq, Hk, S, D, dtype, transposed, cos shared over the batch)
    cases = [(1, 1, 1, 1, 2, bf16, False, False), (2, 3, 1, 17, 64, bf16, True, False),
             (1, 4, 2, 97, 96, F32, True, True), (3, 2, 5, 3, 128, bf16, False, True),
             (2, 2, 2, 0, 16, bf16, False, False)]
    if quick:
        cases = cases[1:2] + cases[3:]

    def one(backend, B, Hq, Hk, S, D, dtype, transposed, shared):
        def heads(h, seed):
            if transposed:  # transformers' [B, S, H, D] storage seen as [B, H, S, D]
                return rand((B, S, h, D), dtype, device, seed=seed).transpose(1, 2).requires_grad_()
            return rand((B, h, S, D), dtype, device, grad=True, seed=seed)

        q, k = heads(Hq, 1), heads(Hk, 2)
        angle = torch.rand(1 if shared else B, S, D // 2, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64) * 6.3
        angle = torch.cat((angle, angle), -1)
        cos, sin = angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype)

        def call(be, q_, k_):
            c, s = (cos, sin) if be != "reference" else (cos.double(), sin.double())
            return rope(q_, k_, c, s, backend=be)

        against_reference(runner, "rope", call, backend, (q, k), dtype)

    for backend in fast_backends("rope", device):
        for B, Hq, Hk, S, D, dtype, transposed, shared in cases:
            name = (f"rope/{backend}/B{B}-Hq{Hq}-Hk{Hk}-S{S}-D{D}-{DTYPE_NAMES[dtype]}"
                    f"{'-strided' if transposed else ''}{'-shared-cos' if shared else ''}")
            runner.run(name, lambda: one(backend, B, Hq, Hk, S, D, dtype, transposed, shared))


# --- SwiGLU / GeGLU ------------------------------------------------------------------------------------------------

def gated_activation_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    fns = {"silu": lambda g, u, be: swiglu(g, u, backend=be), "gelu": lambda g, u, be: geglu(g, u, backend=be),
           "gelu_tanh": lambda g, u, be: geglu(g, u, "tanh", backend=be)}
    # (activation, shape, dtype, split): split takes gate and up as two views of one fused [.., 2n] tensor
    cases = [("silu", (3, 17), bf16, False), ("gelu", (97, 129), F32, False), ("gelu_tanh", (1,), bf16, False),
             ("silu", (0, 5), bf16, False), ("gelu_tanh", (17, 97), bf16, True), ("silu", (4099,), F32, True)]
    if quick:
        cases = cases[:1] + cases[3:5]

    def one(backend, activation, shape, dtype, split):
        if split:
            fused = rand((*shape[:-1], 2 * shape[-1]), dtype, device, scale=3.0, seed=1)
            gate, up = (t.requires_grad_() for t in fused.chunk(2, dim=-1))
        else:
            gate = rand(shape, dtype, device, scale=3.0, grad=True, seed=1)
            up = rand(shape, dtype, device, grad=True, seed=2)
        # the reference copies are made contiguous by fresh(); the kernel's inputs stay views
        got_leaves = [gate, up]
        outs, grads = forward_backward(lambda: fns[activation](*got_leaves, backend), got_leaves)
        if runner.check:
            ref = [fresh(t, torch.float64) for t in (gate, up)]
            ref_outs, ref_grads = forward_backward(lambda: fns[activation](*ref, "reference"), ref)
            for i, (g, w) in enumerate(zip((*outs, *grads), (*ref_outs, *ref_grads))):
                runner.close(f"{activation} #{i}", g, w, dtype)

    for backend in fast_backends("gated_activation", device):
        for activation, shape, dtype, split in cases:
            name = (f"gated_activation/{backend}/{activation}-{'x'.join(map(str, shape))}-{DTYPE_NAMES[dtype]}"
                    f"{'-split-views' if split else ''}")
            runner.run(name, lambda: one(backend, activation, shape, dtype, split))


# --- LoRA ----------------------------------------------------------------------------------------------------------

class _Nf4Base:
    """A frozen base weight kept NF4-packed; ``dequantize()`` runs the given ``dequantize_nf4`` backend."""

    def __init__(self, w: torch.Tensor, backend: str):
        self.q = quantize_nf4(w.detach().float(), blocksize=64, nested=True)
        self.q["dtype"] = w.dtype
        self.backend = backend

    @property
    def shape(self):
        return self.q["shape"]

    def dequantize(self):
        return dequantize_nf4(**self.q, backend=self.backend)


def _projection(in_f, out_f, r, dtype, device, seed, adapter_dtype=None):
    w = (rand((out_f, in_f), torch.float64, device, seed=seed) / math.sqrt(in_f)).to(dtype)
    a = (rand((r, in_f), torch.float64, device, seed=seed + 1) / math.sqrt(in_f)).to(adapter_dtype or dtype)
    b = (rand((out_f, r), torch.float64, device, seed=seed + 2) / math.sqrt(r)).to(adapter_dtype or dtype)
    return w, a.requires_grad_(), b.requires_grad_()


def lora_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    nf4_backends = fast_backends("dequantize_nf4", device)

    def flat(projs):
        return [t for p in projs for t in p]

    def regroup(ts, n):
        return [tuple(ts[3 * i:3 * i + 3]) for i in range(n)]

    def run_kind(backend, kind, x, projs, dtype, activation="swiglu", nf4=None):
        """projs: (W, A, B) triples; with ``nf4`` the kernel's base weights are NF4 objects dequantized by that
        backend, and the reference gets their dense float64 values."""
        n = len(projs)
        bases = [_Nf4Base(p[0], nf4) for p in projs] if nf4 else None

        def call(be, x_, *ts):
            ps = regroup(list(ts), n)
            if be != "reference" and bases is not None:
                ps = [(base, a, b) for base, (_, a, b) in zip(bases, ps)]
            if kind == "linear":
                return lora_linear(x_, *ps[0], 1.5, backend=be)
            if kind == "qkv":
                return lora_qkv(x_, *ps, 1.5, backend=be)
            return lora_mlp(x_, *ps, 1.5, activation, backend=be)

        tensors = flat(projs)
        if bases is not None:  # the reference's dense weights: what the kernel will dequantize
            from fastsft.reference.nf4 import dequantize_nf4 as ref_dequantize

            for i, base in enumerate(bases):
                tensors[3 * i] = ref_dequantize(**base.q)
        against_reference(runner, f"lora {kind}", call, backend, (x, *tensors), dtype)

    def linear(backend, T, in_f, out_f, r, dtype, nf4=None, adapter_dtype=None):
        x = rand((T, in_f), dtype, device, grad=True, seed=1)
        run_kind(backend, "linear", x, [_projection(in_f, out_f, r, dtype, device, 10, adapter_dtype)], dtype,
                 nf4=nf4)

    def qkv(backend, T, in_f, outs, r, dtype):
        x = rand((2, T, in_f), dtype, device, grad=True, seed=1)
        run_kind(backend, "qkv", x, [_projection(in_f, o, r, dtype, device, 10 * (i + 1)) for i, o in
                                     enumerate(outs)], dtype)

    def mlp(backend, T, hidden, inter, r, dtype, activation, nf4=None):
        x = rand((T, hidden), dtype, device, grad=True, seed=1)
        projs = [_projection(hidden, inter, r, dtype, device, 10), _projection(hidden, inter, r, dtype, device, 20),
                 _projection(inter, hidden, r, dtype, device, 30)]
        run_kind(backend, "mlp", x, projs, dtype, activation, nf4=nf4)

    def peft_layer(backend, dtype):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear

        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(59, 97, bias=False))
        model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["proj"],
                                                   init_lora_weights=False), model)
        model = model.to(device=device, dtype=dtype)
        layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
        layer.base_layer.weight.requires_grad_(False)
        adapter = layer.active_adapters[0]
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        x = rand((17, 59), dtype, device, grad=True, seed=1)
        out = fused_lora_forward(layer, x, backend=backend)
        if out is None:
            raise AssertionError(f"fused_lora_forward declined the PEFT layer: {lora_eligibility(layer)}")
        outs, grads = forward_backward(lambda: out, (x, a, b))
        if runner.check:
            x2 = fresh(x)
            want, want_grads = forward_backward(lambda: layer(x2), (x2, a, b))
            for i, (g, w) in enumerate(zip((*outs, *grads), (*want, *want_grads))):
                runner.close(f"peft #{i}", g, w, dtype)

    cases = [
        ("linear-T17-59x97-r3", lambda be: linear(be, 17, 59, 97, 3, bf16)),
        ("linear-T0-empty", lambda be: linear(be, 0, 64, 32, 8, bf16)),
        ("linear-f32-adapters-bf16-x", lambda be: linear(be, 3, 96, 129, 16, bf16, adapter_dtype=F32)),
        ("qkv-T3-64x(64,32,32)-r8", lambda be: qkv(be, 3, 64, (64, 32, 32), 8, bf16)),
        ("mlp-swiglu-T17-59x129-r4", lambda be: mlp(be, 17, 59, 129, 4, bf16, "swiglu")),
        ("mlp-geglu_tanh-T1-32x97-r1-f32", lambda be: mlp(be, 1, 32, 97, 1, F32, "geglu_tanh")),
        ("mlp-geglu-T0-empty", lambda be: mlp(be, 0, 32, 64, 2, bf16, "geglu")),
        ("peft-fused_lora_forward", lambda be: peft_layer(be, bf16)),
    ]
    for nf4 in nf4_backends:
        cases.append((f"linear-nf4-{nf4}-T17-59x97", lambda be, nf4=nf4: linear(be, 17, 59, 97, 3, bf16, nf4=nf4)))
        cases.append((f"mlp-nf4-{nf4}-T3-64x129", lambda be, nf4=nf4: mlp(be, 3, 64, 129, 4, bf16, "swiglu",
                                                                          nf4=nf4)))
    if quick:
        cases = [c for c in cases if c[0].startswith(("linear-T17", "qkv", "mlp-swiglu", "mlp-nf4"))]
    for backend in fast_backends("lora", device):
        for name, fn in cases:
            dtype_note = "" if "f32" in name else f"-{DTYPE_NAMES[bf16]}"
            runner.run(f"lora/{backend}/{name}{dtype_note}", lambda: fn(backend))


# --- NF4 dequantization --------------------------------------------------------------------------------------------

def nf4_cases(runner, quick):
    device = runner.device
    bf16 = runner.dtype(BF16)
    # (shape, dtype, blocksize, nested, into a reused buffer); odd element counts end in half a byte
    cases = [((1,), bf16, 64, False, False), ((3, 17), bf16, 64, True, False), ((97, 129), F16, 32, True, True),
             ((129, 97), F32, 4096, False, False), ((17, 4099), bf16, 128, True, False),
             ((0, 64), bf16, 64, False, False)]
    if quick:
        cases = cases[1:3] + cases[5:]
    from fastsft.reference.nf4 import dequantize_nf4 as ref_dequantize

    def one(backend, shape, dtype, blocksize, nested, into):
        w = rand(shape, F32, device, scale=3.0, seed=1)
        q = quantize_nf4(w, blocksize=blocksize, nested=nested)
        q["dtype"] = dtype
        out = torch.full(shape, float("nan"), dtype=dtype, device=device) if into else None
        got = dequantize_nf4(**q, out=out, backend=backend)
        if into and got.data_ptr() != out.data_ptr():
            raise AssertionError("out= was not written in place")
        want = ref_dequantize(**q)
        if not torch.equal(got.cpu(), want.cpu()):  # bit for bit, NaN-free
            raise AssertionError(f"{int((got.cpu() != want.cpu()).sum())} of {got.numel()} elements differ from "
                                 "the reference")

    for backend in fast_backends("dequantize_nf4", device):
        for shape, dtype, blocksize, nested, into in cases:
            name = (f"nf4/{backend}/{'x'.join(map(str, shape))}-{DTYPE_NAMES[dtype]}-block{blocksize}"
                    f"{'-nested' if nested else ''}{'-into' if into else ''}")
            runner.run(name, lambda: one(backend, shape, dtype, blocksize, nested, into))


CASES = {"attention": attention_cases, "linear_cross_entropy": linear_cross_entropy_cases, "rms_norm": rms_norm_cases,
         "rope": rope_cases, "gated_activation": gated_activation_cases, "lora": lora_cases, "nf4": nf4_cases}


def planted_fault(device) -> int:
    """A Triton kernel whose mask lets one program read one element past the end of its input."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read_one_past_end(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs <= n), mask=offs < n)

    x = torch.randn(1000, device=device)
    out = torch.empty_like(x)
    _read_one_past_end[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("planted fault ran: under memcheck it must be reported as an invalid read", flush=True)
    return 0


def main(args) -> int:
    device = torch.device(args.device)
    if args.planted_fault:
        return planted_fault(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; --device cpu checks this script's logic on the CPU", flush=True)
        return 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"sanitize_kernels: {where}, ops {','.join(args.ops)}{' (quick)' if args.quick else ''}", flush=True)
    runner = Runner(device, check=not args.no_check)
    start = time.perf_counter()
    for op in args.ops:
        CASES[op](runner, args.quick)
    print(f"{runner.cases} cases, {len(runner.failed)} failed ({time.perf_counter() - start:.0f} s)", flush=True)
    for name in runner.failed:
        print(f"  failed: {name}")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
