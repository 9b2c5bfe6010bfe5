"""INT4 weight-only GEMM in plain PyTorch: packing in the canonical checkpoint format, dequantization,
and y = x @ dequant(W)^T with float32 accumulation. Signatures match :mod:`grace_kernels.ops.w4a16`.

Canonical format (compressed-tensors "pack-quantized", what export writes and serving engines load):
    weight_packed int32 [N, K / 8]: u = q + 8 in [0, 15], eight per word, low nibble first along K
                  (word j of a row holds k = 8j .. 8j + 7, k = 8j in bits 0-3)
    weight_scale  [N, K / group_size] float16 / bfloat16
    W[n, k] = weight_scale[n, k // group_size] * q[n, k]
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble s of a word lives at bits 4s .. 4s + 3


def pack_int4_ref(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> int32 [N, K / 8] (canonical)."""
    u = (codes.to(torch.int32) + 8).view(codes.shape[0], -1, 8)
    # OR the eight nibbles together in int64, then reinterpret the low 32 bits as int32 (the top
    # nibble makes the word negative when it is >= 8, exactly as the format stores it).
    words = torch.zeros(u.shape[:2], dtype=torch.int64, device=u.device)
    for s in range(8):
        words |= u[..., s].to(torch.int64) << (4 * s)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K / 8] -> int8 codes [N, K] in [-8, 7]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # arithmetic shift; the mask drops the sign
    return (u - 8).to(torch.int8).reshape(packed.shape[0], -1)


def dequantize_int4_ref(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] in float32: scale * q (exact: |q| <= 8 times a half-precision scale fits float32)."""
    q = unpack_int4_ref(packed).float()
    return q * scales.float().repeat_interleave(group_size, dim=1)


def w4a16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) accumulated in float32, returned in x's dtype; x is [..., K]."""
    w = dequantize_int4_ref(packed, scales, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
