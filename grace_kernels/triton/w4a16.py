"""Triton W4A16 and W8A16 GEMMs on the canonical pack-quantized layout, with split-K for small M.

y[M, N] = x[M, K] @ W^T, W[n, k] = scale[n, k // G] * (u(n, k) - 2**(BITS - 1)), with u the BITS-bit
field k of row n: bits BITS * (k % P) .. of int32 word k // P, P = 32 / BITS (BITS 4: eight nibbles a
word, grace_kernels.int4; BITS 8: four bytes, grace_kernels.int8). One kernel serves both widths.
With HAS_ZP (an asymmetric weight) W[n, k] = scale[n, g] * (q(n, k) - z(n, g)), g = k // G, z the BITS-bit
field n % P of zero-point word (n // P, g) minus 2**(BITS - 1) (compressed-tensors packs zero points along N).

A program owns a [BLOCK_M, BLOCK_N] output tile and one slice of K (split-K): for decode (M = 1..16)
the M x N grid alone has too few tiles to fill the GPU, so K is cut into SPLIT_K parts that write float32 partial tiles, summed afterwards in a fixed order
(deterministic, unlike atomics). BLOCK_K divides the group size, so each K step reads one scale per
row; steps of a whole group (128) spilled (python -m grace_kernels.aot).

Each word is loaded once per code position it feeds (32 / BITS loads of the same address, served by
L1); a layout that feeds the tensor cores straight from one wide load is what
``repack_for_kernel`` and the CUDA kernel (csrc/w4a16/) are for. This kernel runs where that one
does not: GPUs without the built extension, shapes it does not take, and CPU CI under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grace_kernels._backend import triton_interpret
from grace_kernels.kernel_spec import KernelSpec
from grace_kernels.triton._rounding import cast_rne


@triton.jit
def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  DOT_F32: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k[None, :], mask=rm[:, None] < M, other=0.0)
        words = tl.load(w_ptr + rn[:, None].to(tl.int64) * (K // (32 // BITS)) + (k[None, :] // (32 // BITS)),
                        mask=rn[:, None] < N, other=0)
        q = ((words >> ((k[None, :] % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        scale = tl.load(s_ptr + rn.to(tl.int64) * n_groups + k0 // GROUP, mask=rn < N, other=0.0)
        if HAS_ZP:
            # One zero point per (row, group); BLOCK_K divides the group, so one load per step. z_ptr is a
            # dummy (never read) when HAS_ZP is off.
            z_words = tl.load(z_ptr + (rn // (32 // BITS)).to(tl.int64) * n_groups + k0 // GROUP, mask=rn < N,
                              other=0)
            z = ((z_words >> ((rn % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
            q = q - z[:, None]
        # Dequantized in float32 (q * scale is exact there: |q| <= 255 times a half-precision scale) and rounded once to the activation dtype for
        # the tensor cores: one rounding per weight, the error budget of any half-precision GEMM.
        w = cast_rne(q.to(tl.float32) * scale.to(tl.float32)[:, None], x_ptr.dtype.element_ty)
        if DOT_F32:
            # Only under TRITON_INTERPRET=1: its bf16 tl.dot multiplies raw bit patterns. The operands
            # are already rounded to bf16, so upcasting them computes the same products.
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        elif x.dtype == tl.float32:
            # A float32 tl.dot defaults to TF32 on tensor-core GPUs (10-bit mantissas, about 1e-3 relative
            # error); float32 callers ask for float32 accuracy, so keep full-precision products (the
            # interpreter ignores this argument: the GPU test and the AOT IR check cover it).
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


BLOCK_K = 32
# float32 (IEEE) dots run on the FMA units with the operand tiles in registers: BLOCK_K 32 over 4 warps
# spilled (255 registers plus stack frames); BLOCK_K 16 (Triton 3.6's smallest dot K) over 8 warps with one
# stage fits on sm_80 and sm_90 (python -m grace_kernels.aot). It is the accuracy fallback, not a fast path.
FP32_LAUNCH = {"BLOCK_K": 16, "num_warps": 8, "num_stages": 1}
HALF_LAUNCH = {"BLOCK_K": BLOCK_K, "num_warps": 4, "num_stages": 3}


def _launch(dtype) -> dict:
    return FP32_LAUNCH if dtype in (torch.float32, "fp32") else HALF_LAUNCH


def _config(m: int, n: int, k: int, group_size: int) -> tuple[int, int, int]:
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Aim for about 4 programs per SM of a 132-SM H100 in decode; K stays a multiple of the group.
    groups = k // group_size
    split = max(1, min(groups, 528 // max(1, tiles)))
    return block_m, block_n, split


def wna16_matmul(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, *,
                 bits: int, zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [M, N] = x2d [M, K] @ dequant(packed, scales[, zero_points])^T for ``bits`` 4 or 8: packed int32
    [N, K * bits / 32], 32 / bits codes per word; zero_points None (symmetric) or int32
    [ceil(N * bits / 32), K / group_size] (grace_kernels.reference.w4a16.pack_zero_points). The caller adds
    the bias and casts."""
    m, k = x2d.shape
    n = packed.shape[0]
    block_m, block_n, split = _config(m, n, k, group_size)
    groups = k // group_size
    k_per_split = triton.cdiv(groups, split) * group_size
    split = triton.cdiv(k, k_per_split)
    part = torch.empty(split, m, n, device=x2d.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    launch = _launch(x2d.dtype)
    has_zp = zero_points is not None
    _wna16_kernel[grid](x2d, packed, scales, zero_points if has_zp else packed, part, m, n, k, k_per_split,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(launch["BLOCK_K"], group_size), GROUP=group_size,
                        DOT_F32=triton_interpret() and x2d.dtype == torch.bfloat16, BITS=bits, HAS_ZP=has_zp,
                        num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    return part.sum(0) if split > 1 else part[0]


AOT_SPECS = [
    KernelSpec(_wna16_kernel, {"x_ptr": f"*{dt}", "w_ptr": "*i32", "s_ptr": f"*{dt}", "z_ptr": "*i32",
                               "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32"},
               {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": _launch(dt)["BLOCK_K"], "GROUP": 128, "DOT_F32": False,
                "BITS": bits, "HAS_ZP": zp},
               num_warps=_launch(dt)["num_warps"], num_stages=_launch(dt)["num_stages"],
               label=f"int{bits}{',zp' if zp else ''},{dt},m{bm}")
    # zero points are served at 8 bits only (an asymmetric 4-bit checkpoint is read as symmetric 8-bit codes)
    for bits, zp in ((4, False), (8, False), (8, True)) for dt in ("fp16", "bf16", "fp32") for bm in (16, 64)
]
