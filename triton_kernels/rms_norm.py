"""RMSNorm forward and backward in Triton (one row in registers: hidden up to 65,536).

Forward: one program per row computes ``s = x (+ residual)``, ``rstd`` and ``y = s * rstd * (offset + w)`` in
float32. Backward: a fixed number of programs, each over a contiguous range of rows, writes ``dx`` row by row
and keeps its rows' weight-gradient terms in registers, stored once as that program's float32 partial row;
the partial rows are summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastsft.triton_kernels.launch import cdiv, eager_direct_triton_op, launcher, next_power_of_2

from fastsft.fakes import rms_norm_backward_fake, rms_norm_forward_fake


@triton.jit
def _rms_norm_forward_kernel(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, H, eps, offset,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * H can pass 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    base = row * H
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + base + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)  # rounded, as the unfused add
        tl.store(s_ptr + base + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols, (xf * rstd * (w + offset)).to(y_ptr.dtype.element_ty), mask=mask)


# rows (the batch's token count) and rows_per_program change per batch: not specialized, so one compiled
# variant serves every batch (see flash_attention.PER_BATCH_ARGS)
@triton.jit(do_not_specialize=["rows", "rows_per_program"])
def _rms_norm_backward_kernel(gy_ptr, gs_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, partial_ptr, rows, H,
                              rows_per_program, offset,
                              HAS_GS: tl.constexpr, DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for row in range(start, end):
        base = row * H
        g = tl.load(gy_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.load(s_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        gw = g * w
        mean = tl.sum(gw * xhat, axis=0) / H
        dx = rstd * (gw - xhat * mean)
        if HAS_GS:
            dx += tl.load(gs_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DW:
            acc += g * xhat
    if DW:
        tl.store(partial_ptr + pid * H + cols, acc, mask=mask)


def _block(hidden: int) -> tuple[int, int]:
    block = next_power_of_2(max(hidden, 1))
    return block, 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the CPU interpreter: few programs keep it quick


@eager_direct_triton_op("fastsft::rms_norm_forward_triton", mutates_args={})
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float,
                     offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, s, rstd)`` of contiguous ``x`` [rows, H] (and ``residual``): see ``fastsft::rms_norm_forward``."""
    rows, hidden = x.shape
    y, s, rstd = rms_norm_forward_fake(x, weight, residual, eps, offset)
    if rows == 0 or hidden == 0:
        return y, s, rstd
    block, warps = _block(hidden)
    has_res = residual is not None
    launcher(_rms_norm_forward_kernel)[(rows,)](
        x, residual if has_res else x, weight, y, s if has_res else y, rstd, hidden, eps, offset,
        HAS_RES=has_res, BLOCK=block, num_warps=warps)
    return y, s, rstd


@eager_direct_triton_op("fastsft::rms_norm_backward_triton", mutates_args={})
def rms_norm_backward(grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, offset: float, compute_weight_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ds, dweight)``: see ``fastsft::rms_norm_backward`` (``dweight`` float32, empty unless asked)."""
    rows, hidden = s.shape
    dx = torch.empty_like(s)
    programs = _programs(rows, s.device)
    per_program = cdiv(rows, programs) if rows else 0
    programs = cdiv(rows, per_program) if rows else 1
    partial = torch.zeros(programs if compute_weight_grad else 0, hidden, device=s.device, dtype=torch.float32)
    if rows and hidden:
        block, warps = _block(hidden)
        launcher(_rms_norm_backward_kernel)[(programs,)](
            grad_y, grad_sum if grad_sum is not None else grad_y, s, weight, rstd, dx,
            partial if compute_weight_grad else dx, rows, hidden, per_program, offset,
            HAS_GS=grad_sum is not None, DW=compute_weight_grad, BLOCK=block, num_warps=warps)
    dw = partial.sum(0) if compute_weight_grad else s.new_empty(0, dtype=torch.float32)
    return dx, dw


# Explicit fakes, shared with the compiled ops: the traced default would launch the kernels on fake tensors
# under TRITON_INTERPRET.
rms_norm_forward.register_fake(rms_norm_forward_fake)
rms_norm_backward.register_fake(rms_norm_backward_fake)
