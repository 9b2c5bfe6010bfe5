"""Triton kernels for batched, ragged linear CKA on centered, normalized token features.

Inputs are packed: Xs [total, dS], Xt [total, dT] (float32, already l2-normalized per token and
centered per sample, so H K H = Xc Xc^T), sample b owning rows cu[b]:cu[b+1].

Forward (one launch for the whole batch): program (tile, b) owns the Gram tile (ti, tj) of sample
b, builds K~_S and K~_T tiles with tl.dot over the feature dimension, and reduces them at once to
the three Frobenius products <T,S>, <S,S>, <T,T>. Only the upper triangle is computed (K~ is
symmetric: off-diagonal tiles count twice). Each program writes its three partial sums to its own
slot, and the host sums the slots: deterministic, unlike atomics, which matters for bit-for-bit
resumable training. Tiles past a sample's length (ragged batches) do no work.

Backward: with L_b = 1 - <T,S> / sqrt(<S,S><T,T>), dL/dK~_S = G = cT*T + cS*S per sample
(cT = -g/sqrt(bc), cS = g*a/(b*sqrt(bc))), and dL/dXc_S = 2 G Xc_S. One launch writes G
(packed per sample, n_b^2 floats), a second computes 2 G Xc_S; the O(n d) chain rule through
the centering and normalization runs in PyTorch.

tl.dot uses 3xTF32 on GPUs: CKA divides nearly equal quantities when the models are aligned, and
single-pass TF32 (10-bit mantissa) would cost about three decimal digits of the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grace_kernels.kernel_spec import KernelSpec

# Gram kernels: 64 x 64 output tiles, 16-wide steps along the features. Wider steps (32, 64) or
# two 64 x 64 fp32 accumulators with 32-wide steps spill under 3xTF32, which splits every operand
# into a high and a low part (python -m grace_kernels.aot).
BLOCK_N = 64
BLOCK_D = 16
# The 2 G Xc kernel keeps one [32, 32] accumulator: 168 registers, no spills.
DX_BLOCK_N = 32
DX_BLOCK_D = 32


@triton.jit
def _gram_tile(x_ptr, start, n, d, ti, tj, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        c = k + cols
        a = tl.load(x_ptr + (start + ri[:, None]).to(tl.int64) * d + c[None, :],
                    mask=(ri[:, None] < n) & (c[None, :] < d), other=0.0)
        b = tl.load(x_ptr + (start + rj[:, None]).to(tl.int64) * d + c[None, :],
                    mask=(rj[:, None] < n) & (c[None, :] < d), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32x3")
    return acc


@triton.jit
def _cka_fwd_kernel(xs_ptr, xt_ptr, cu_ptr, part_ptr, ds, dt, n_tiles,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    ti = tile // n_tiles
    tj = tile % n_tiles
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    ts = 0.0
    ss = 0.0
    tt = 0.0
    if (tj >= ti) & (tj * BLOCK_N < n):
        ks = _gram_tile(xs_ptr, start, n, ds, ti, tj, BLOCK_N, BLOCK_D)
        kt = _gram_tile(xt_ptr, start, n, dt, ti, tj, BLOCK_N, BLOCK_D)
        w = tl.where(ti == tj, 1.0, 2.0)
        ts = w * tl.sum(tl.sum(kt * ks, axis=1), axis=0)
        ss = w * tl.sum(tl.sum(ks * ks, axis=1), axis=0)
        tt = w * tl.sum(tl.sum(kt * kt, axis=1), axis=0)
    out = part_ptr + (b.to(tl.int64) * n_tiles * n_tiles + tile) * 3
    tl.store(out, ts)
    tl.store(out + 1, ss)
    tl.store(out + 2, tt)


@triton.jit
def _cka_bwd_g_kernel(xs_ptr, xt_ptr, cu_ptr, goff_ptr, coef_ptr, g_ptr, ds, dt, n_tiles,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    ti = tile // n_tiles
    tj = tile % n_tiles
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    if (ti * BLOCK_N < n) & (tj * BLOCK_N < n):
        ks = _gram_tile(xs_ptr, start, n, ds, ti, tj, BLOCK_N, BLOCK_D)
        kt = _gram_tile(xt_ptr, start, n, dt, ti, tj, BLOCK_N, BLOCK_D)
        c_t = tl.load(coef_ptr + 2 * b)
        c_s = tl.load(coef_ptr + 2 * b + 1)
        g = c_t * kt + c_s * ks
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        base = tl.load(goff_ptr + b)
        tl.store(g_ptr + base + ri[:, None].to(tl.int64) * n + rj[None, :], g,
                 mask=(ri[:, None] < n) & (rj[None, :] < n))


@triton.jit
def _cka_bwd_dx_kernel(g_ptr, xs_ptr, cu_ptr, goff_ptr, dx_ptr, ds, n_tiles, d_tiles,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ti = pid // d_tiles
    td = pid % d_tiles
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    if ti * BLOCK_N < n:
        base = tl.load(goff_ptr + b)
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        c = td * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(0, n, BLOCK_N):
            rj = j + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + base + ri[:, None].to(tl.int64) * n + rj[None, :],
                        mask=(ri[:, None] < n) & (rj[None, :] < n), other=0.0)
            x = tl.load(xs_ptr + (start + rj[:, None]).to(tl.int64) * ds + c[None, :],
                        mask=(rj[:, None] < n) & (c[None, :] < ds), other=0.0)
            acc = tl.dot(g, x, acc, input_precision="tf32x3")
        tl.store(dx_ptr + (start + ri[:, None]).to(tl.int64) * ds + c[None, :], 2.0 * acc,
                 mask=(ri[:, None] < n) & (c[None, :] < ds))


def _tiles(n_max: int) -> int:
    return max(1, triton.cdiv(n_max, BLOCK_N))


def cka_sums(xs: torch.Tensor, xt: torch.Tensor, cu: torch.Tensor, n_max: int) -> torch.Tensor:
    """[B, 3] float32: <K~T, K~S>, <K~S, K~S>, <K~T, K~T> per sample."""
    b = cu.numel() - 1
    nt = _tiles(n_max)
    part = torch.empty(b, nt * nt, 3, device=xs.device, dtype=torch.float32)
    cu32 = cu.to(torch.int32)
    _cka_fwd_kernel[(nt * nt, b)](xs, xt, cu32, part, xs.shape[1], xt.shape[1], nt,
                                 BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return part.sum(1)


def cka_grad_centered(xs: torch.Tensor, xt: torch.Tensor, cu: torch.Tensor, n_max: int,
                      coef: torch.Tensor) -> torch.Tensor:
    """dL/dXc_S = 2 G Xc_S with G = coef[b,0] * K~T + coef[b,1] * K~S per sample."""
    b = cu.numel() - 1
    nt = _tiles(n_max)
    lens = (cu[1:] - cu[:-1])
    goff = torch.zeros(b, dtype=torch.int64, device=xs.device)
    goff[1:] = torch.cumsum(lens * lens, 0)[:-1]
    g = torch.empty(int((lens * lens).sum()), device=xs.device, dtype=torch.float32)
    cu32 = cu.to(torch.int32)
    _cka_bwd_g_kernel[(nt * nt, b)](xs, xt, cu32, goff, coef.contiguous(), g, xs.shape[1], xt.shape[1], nt,
                                   BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dx = torch.zeros_like(xs)
    d_tiles = triton.cdiv(xs.shape[1], DX_BLOCK_D)
    row_tiles = triton.cdiv(n_max, DX_BLOCK_N)
    _cka_bwd_dx_kernel[(row_tiles * d_tiles, b)](g, xs, cu32, goff, dx, xs.shape[1], row_tiles, d_tiles,
                                                BLOCK_N=DX_BLOCK_N, BLOCK_D=DX_BLOCK_D)
    return dx


_PTRS = {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "cu_ptr": "*i32"}
AOT_SPECS = [
    KernelSpec(_cka_fwd_kernel, {**_PTRS, "part_ptr": "*fp32", "ds": "i32", "dt": "i32", "n_tiles": "i32"},
               {"BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}, num_warps=4, num_stages=2),
    KernelSpec(_cka_bwd_g_kernel, {**_PTRS, "goff_ptr": "*i64", "coef_ptr": "*fp32", "g_ptr": "*fp32",
                                   "ds": "i32", "dt": "i32", "n_tiles": "i32"},
               {"BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}, num_warps=4, num_stages=2),
    KernelSpec(_cka_bwd_dx_kernel, {"g_ptr": "*fp32", "xs_ptr": "*fp32", "cu_ptr": "*i32", "goff_ptr": "*i64",
                                    "dx_ptr": "*fp32", "ds": "i32", "n_tiles": "i32", "d_tiles": "i32"},
               {"BLOCK_N": DX_BLOCK_N, "BLOCK_D": DX_BLOCK_D}, num_warps=4, num_stages=2),
]
