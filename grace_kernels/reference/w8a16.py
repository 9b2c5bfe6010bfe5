"""INT8 weight-only GEMM in plain PyTorch: packing in the canonical checkpoint format, dequantization,
and y = x @ dequant(W)^T with float32 accumulation. Signatures match :mod:`grace_kernels.ops.w8a16`.

Canonical format (compressed-tensors "pack-quantized" with ``num_bits: 8``, what vLLM's WNA16 path loads):
    weight_packed int32 [N, K / 4]: u = q + 128 in [0, 255], four per word, low byte first along K
                  (word j of a row holds k = 4j .. 4j + 3, k = 4j in bits 0-7)
    weight_scale  [N, K / group_size] float16 / bfloat16
    W[n, k] = weight_scale[n, k // group_size] * q[n, k],  q in [-128, 127]
"""

from __future__ import annotations

import torch

PER_WORD = 4
_SHIFTS = torch.arange(0, 32, 8, dtype=torch.int32)


def pack_int8_ref(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-128, 127] -> int32 [N, K / 4] (u = q + 128, low byte first)."""
    n, k = codes.shape
    u = (codes.to(torch.int64) + 128).view(n, k // PER_WORD, PER_WORD)
    words = (u << _SHIFTS.to(torch.int64).to(codes.device)).sum(-1)
    # the top byte makes words >= 2**31: wrap them to the int32 bit pattern
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int8_ref(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K / 4] -> int8 codes [N, K] in [-128, 127]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xFF  # arithmetic shift; the mask drops the sign
    return (u - 128).to(torch.int8).reshape(packed.shape[0], -1)


def dequantize_int8_ref(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] in float32: scale * q (exact: |q| <= 128 times a half-precision scale fits float32's 24 bits)."""
    q = unpack_int8_ref(packed).float()
    return q * scales.float().repeat_interleave(group_size, dim=1)


def w8a16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) accumulated in float32, returned in x's dtype; x is [..., K]."""
    w = dequantize_int8_ref(packed, scales, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
