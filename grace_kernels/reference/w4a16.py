"""INT4 weight-only GEMM in plain PyTorch: packing in the canonical checkpoint format, dequantization,
and y = x @ dequant(W)^T with float32 accumulation. Signatures match :mod:`grace_kernels.ops.w4a16`.

Canonical format (compressed-tensors "pack-quantized", what export writes and serving engines load):
    weight_packed int32 [N, K / 8]: u = q + 8 in [0, 15], eight per word, low nibble first along K
                  (word j of a row holds k = 8j .. 8j + 7, k = 8j in bits 0-3)
    weight_scale  [N, K / group_size] float16 / bfloat16
    W[n, k] = weight_scale[n, k // group_size] * q[n, k]

Kernel layout (what ``repack_for_kernel`` produces for the CUDA kernel, csrc/w4a16/): the weight is cut
into tiles of 16 k x 64 n. Tile (kt, nt) is 128 int32 words, 4 per lane of a warp, so that one 16-byte
load per lane holds that lane's mma.m16n8k16 B fragments of all eight n8 sub-tiles of the tile:
    kernel_packed int32 [K / 16, 2 N]: row kt, words nt * 128 + lane * 4 + w, lane = 4 g + t
    nibble p = 4 h + 2 rhi + rlo of word w of lane (g, t) in tile (kt, nt) holds u[n, k] with
        n = 64 nt + 8 (2 w + rhi) + g,   k = 16 kt + 8 rlo + 2 t + h
(per the PTX fragment layout, lane (g, t) owns B[k, n] for n = g, k in {2t, 2t+1, 2t+8, 2t+9} of each
n8 sub-tile). Nibbles p and p + 4 (h = 0, 1: two consecutive k) sit 16 bits apart, so masking a word
with 0x000F000F (or 0x00F000F0) yields the two halves of one half2 register directly (the lop3 trick).
    kernel_scales [K / group_size, N]: row = group, and within each 64-column block position
        8 g + j holds column 8 j + g, so lane (g, t) reads its eight sub-tiles' scales as 16 bytes.
"""

from __future__ import annotations

import functools

import torch

# The canonical format of both code widths (bits 4 and 8; grace_kernels.reference.w8a16 holds the 8-bit
# names): 32 / bits codes per int32 word, u = q + 2^(bits - 1), field s of a word at bits s * bits and up.


def pack_codes(codes: torch.Tensor, *, bits: int) -> torch.Tensor:
    """int8 codes [N, K] in [-2^(bits-1), 2^(bits-1) - 1] -> int32 [N, K * bits / 32] (canonical)."""
    per_word = 32 // bits
    u = (codes.to(torch.int64) + (1 << (bits - 1))).reshape(codes.shape[0], -1, per_word)
    # The fields are disjoint, so their sum is their OR; in int64, then the low 32 bits reinterpreted as int32
    # (a top field >= 2^(bits-1) makes the word negative, exactly as the format stores it).
    words = (u << torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, *, bits: int) -> torch.Tensor:
    """int32 [N, K * bits / 32] -> int8 codes [N, K] (the inverse of :func:`pack_codes`)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops the sign
    return (u - (1 << (bits - 1))).to(torch.int8).reshape(packed.shape[0], -1)


def zero_point_words(n: int, *, bits: int) -> int:
    """Rows of the packed zero points of an N-row weight: ceil(N * bits / 32)."""
    return -(-n * bits // 32)


def pack_zero_points(zero: torch.Tensor, *, bits: int) -> torch.Tensor:
    """int8 zero points [N, G] in [-2^(bits-1), 2^(bits-1) - 1] -> int32 [ceil(N * bits / 32), G].

    compressed-tensors' layout for group-wise zero points (``weight_zero_point``): the fields of a word run
    along the output dimension N, u = z + 2^(bits - 1), field t of word (j, g) at bits t * bits and up holds
    z[j * 32 / bits + t, g]; rows past N are padded with u = 0 (as compressed-tensors pads)."""
    n = zero.shape[0]
    pad = zero_point_words(n, bits=bits) * (32 // bits) - n
    padded = torch.nn.functional.pad(zero.t().to(torch.int16), (0, pad), value=-(1 << (bits - 1))).to(torch.int8)
    return pack_codes(padded, bits=bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, n: int, *, bits: int) -> torch.Tensor:
    """int32 [ceil(N * bits / 32), G] -> int8 zero points [N, G] (the inverse of :func:`pack_zero_points`)."""
    return unpack_codes(packed.t().contiguous(), bits=bits)[:, :n].t().contiguous()


def dequantize_codes(packed: torch.Tensor, scales: torch.Tensor, group_size: int, *, bits: int,
                     zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in float32: scale * q, or scale * (q - z) with packed ``zero_points`` (:func:`pack_zero_points`).

    Exact: |q - z| <= 2^bits - 1 <= 255 (8 bits) times a half-precision scale (11 bits) fits float32's 24."""
    q = unpack_codes(packed, bits=bits).float()
    if zero_points is not None:
        z = unpack_zero_points(zero_points, packed.shape[0], bits=bits).float()
        q = q - z.repeat_interleave(group_size, dim=1)
    return q * scales.float().repeat_interleave(group_size, dim=1)


def wna16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None, *, bits: int,
                     zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) accumulated in float32, returned in x's dtype; x is [..., K]; W as
    :func:`dequantize_codes` gives it (with zero points when ``zero_points`` is given)."""
    y = x.float() @ dequantize_codes(packed, scales, group_size, bits=bits, zero_points=zero_points).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# The INT4 names (signatures as grace_kernels.ops.w4a16's): codes in [-8, 7], eight per word.
pack_int4_ref = functools.partial(pack_codes, bits=4)
unpack_int4_ref = functools.partial(unpack_codes, bits=4)
dequantize_int4_ref = functools.partial(dequantize_codes, bits=4)
w4a16_matmul_ref = functools.partial(wna16_matmul_ref, bits=4)


# Kernel layout: tiles of KERNEL_TILE_K x KERNEL_TILE_N; see the module docstring for the bit mapping.
KERNEL_TILE_K = 16
KERNEL_TILE_N = 64
# Dimensions of one row's codes viewed as [nt, w, rhi, g, kt, rlo, t, h] (n = 64 nt + 8 (2 w + rhi) + g,
# k = 16 kt + 8 rlo + 2 t + h), and the order the kernel layout stores them in: [kt, nt, g, t, w, h, rhi, rlo].
_TO_KERNEL = (4, 0, 3, 6, 1, 7, 2, 5)
_FROM_KERNEL = tuple(_TO_KERNEL.index(d) for d in range(8))


def repack_to_kernel_ref(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (int32 [N, K / 8], scales [N, G]) -> kernel layout (int32 [K / 16, 2 N], scales [G, N])."""
    codes = unpack_int4_ref(packed)
    n, k = codes.shape
    c = codes.view(n // 64, 4, 2, 8, k // 16, 2, 4, 2).permute(_TO_KERNEL).reshape(k // 16, 16 * n)
    g = scales.shape[1]
    s = scales.view(n // 64, 8, 8, g).permute(3, 0, 2, 1).reshape(g, n)
    return pack_int4_ref(c), s.contiguous()


def repack_from_kernel_ref(kernel_packed: torch.Tensor,
                           kernel_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of :func:`repack_to_kernel_ref`."""
    k16, n2 = kernel_packed.shape
    n, k = n2 // 2, k16 * 16
    c = unpack_int4_ref(kernel_packed).view(k // 16, n // 64, 8, 4, 4, 2, 2, 2).permute(_FROM_KERNEL).reshape(n, k)
    g = kernel_scales.shape[0]
    s = kernel_scales.view(g, n // 64, 8, 8).permute(1, 3, 2, 0).reshape(n, g)
    return pack_int4_ref(c), s.contiguous()


def w4a16_matmul_repacked_ref(x: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor,
                              group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`w4a16_matmul_ref` on a weight in the kernel layout; x is [M, K], the result [M, N] in x's dtype."""
    packed, scales = repack_from_kernel_ref(kernel_packed, kernel_scales)
    return w4a16_matmul_ref(x, packed, scales, group_size, bias)
