"""Triton kernels for group-wise LSQ fake quantization.

Layout: W is [R, C] row-major, groups are GROUP consecutive columns, scales are [R, C // GROUP].
A program owns a [BLOCK_R, GROUP] tile: whole groups only, so the backward can reduce each
group's scale gradient inside the tile and write it once (no atomics, no [R, C] temporary, no
second pass). Ragged R is masked; C is a multiple of GROUP (validated by the caller).

The scales are computed on the host from the log-scales (a tiny [R, C // GROUP] tensor), so the
kernels divide by exactly the float32 values the reference divides by; division is IEEE
round-to-nearest (div_rn) and rounding is half-to-even, which makes the forward bit-exact
against the reference in every dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grace_kernels.kernel_spec import KernelSpec
from grace_kernels.triton._rounding import cast_rne

# 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude < 2**22 to the nearest
# integer, ties to even (the FPU's rounding mode). libdevice.rint does the same on GPUs but does
# not run under the interpreter; |v| <= 128 here because v is clamped first.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _lsq_quantize_tile(w_ptr, s_ptr, pid_r, pid_g, R, C, n_groups, QN: tl.constexpr, QP: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_g * GROUP + tl.arange(0, GROUP)
    rmask = rows < R
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    w = tl.load(w_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows.to(tl.int64) * n_groups + pid_g, mask=rmask, other=1.0)
    v = tl.math.div_rn(w, s[:, None])
    vc = tl.minimum(tl.maximum(v, -QN), QP)
    q = (vc + _RNE_MAGIC) - _RNE_MAGIC
    return offs, rmask, s, v, q


@triton.jit
def _lsq_fwd_kernel(w_ptr, s_ptr, out_ptr, R, C, n_groups, QN: tl.constexpr, QP: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs, rmask, s, v, q = _lsq_quantize_tile(w_ptr, s_ptr, pid_r, pid_g, R, C, n_groups, QN, QP, GROUP, BLOCK_R)
    out = q * s[:, None]
    tl.store(out_ptr + offs, cast_rne(out, out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _lsq_bwd_kernel(dout_ptr, w_ptr, s_ptr, dw_ptr, gsum_ptr, R, C, n_groups, QN: tl.constexpr, QP: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs, rmask, s, v, q = _lsq_quantize_tile(w_ptr, s_ptr, pid_r, pid_g, R, C, n_groups, QN, QP, GROUP, BLOCK_R)
    g = tl.load(dout_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    inside = (v >= -QN) & (v <= QP)
    tl.store(dw_ptr + offs, tl.where(inside, g, 0.0).to(dw_ptr.dtype.element_ty), mask=rmask[:, None])
    # d out / d s under the straight-through estimator: q - v inside the range, q where clipped.
    gsum = tl.sum(tl.where(inside, q - v, q) * g, axis=1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(gsum_ptr + rows.to(tl.int64) * n_groups + pid_g, gsum, mask=rmask)


def _block_rows(group_size: int) -> int:
    # A [BLOCK_R, GROUP] tile of 2048 elements: 16 per thread with 4 warps. 4096-element tiles
    # compiled to 170-210 registers (about 8 resident warps per SM, too few to hide HBM latency);
    # 2048 keeps the backward near 100 registers (see `python -m grace_kernels.aot`).
    return max(1, 2048 // group_size)


def _grid(R: int, C: int, group_size: int, block_r: int):
    return (triton.cdiv(R, block_r), C // group_size)


def _check_shapes(weight: torch.Tensor, scale: torch.Tensor, group_size: int, grad_out: torch.Tensor | None = None):
    # The kernels index whole groups without a column mask and the scales by row and group: shapes
    # that disagree would read out of bounds. The public op checks them first; this guards the
    # torch.ops entry points, which skip the wrapper.
    R, C = weight.shape
    if C % group_size or tuple(scale.shape) != (R, C // group_size):
        raise ValueError(f"scales {tuple(scale.shape)} do not match weight {tuple(weight.shape)} with group_size "
                         f"{group_size}")
    if grad_out is not None and grad_out.shape != weight.shape:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} does not match weight {tuple(weight.shape)}")


def lsq_fake_quant_fwd(weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """out = clamp(rne(w / s)) * s, with ``scale`` float32 [R, C // group_size]."""
    _check_shapes(weight, scale, group_size)
    w = weight.contiguous()
    out = torch.empty_like(w)
    R, C = w.shape
    block_r = _block_rows(group_size)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    _lsq_fwd_kernel[_grid(R, C, group_size, block_r)](
        w, scale.contiguous(), out, R, C, C // group_size, QN=qn, QP=qp, GROUP=group_size, BLOCK_R=block_r)
    return out


def lsq_fake_quant_bwd(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d weight, per-group sum of dout * (q - v or q)) — the caller applies grad_scale * s."""
    _check_shapes(weight, scale, group_size, grad_out)
    w = weight.contiguous()
    g = grad_out.contiguous()
    R, C = w.shape
    dw = torch.empty_like(w)
    gsum = torch.empty(R, C // group_size, device=w.device, dtype=torch.float32)
    block_r = _block_rows(group_size)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    _lsq_bwd_kernel[_grid(R, C, group_size, block_r)](
        g, w, scale.contiguous(), dw, gsum, R, C, C // group_size, QN=qn, QP=qp, GROUP=group_size, BLOCK_R=block_r)
    return dw, gsum


def _specs() -> list[KernelSpec]:
    specs = []
    # Block sizes depend only on the group size, so one spec per (dtype, group size) covers every
    # real model shape (4096x4096, 11008x4096, 4096x11008, 1536x1536, 8960x1536 all launch these).
    for dt in ("bf16", "fp16", "fp32"):
        for gs in (32, 64, 128, 256):
            cx = {"QN": 8, "QP": 7, "GROUP": gs, "BLOCK_R": _block_rows(gs)}
            specs.append(KernelSpec(_lsq_fwd_kernel, {"w_ptr": f"*{dt}", "s_ptr": "*fp32", "out_ptr": f"*{dt}",
                                                      "R": "i32", "C": "i32", "n_groups": "i32"},
                                    cx, label=f"{dt},g{gs}"))
            specs.append(KernelSpec(_lsq_bwd_kernel, {"dout_ptr": f"*{dt}", "w_ptr": f"*{dt}", "s_ptr": "*fp32",
                                                      "dw_ptr": f"*{dt}", "gsum_ptr": "*fp32", "R": "i32",
                                                      "C": "i32", "n_groups": "i32"},
                                    cx, label=f"{dt},g{gs}"))
    return specs


AOT_SPECS = _specs()
