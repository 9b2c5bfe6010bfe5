"""Peer implementations the benchmarks compare against: torch's own int4 GEMM (tinygemm).

``aten._weight_int4pack_mm`` (CUDA, bfloat16 activations) and ``aten._weight_int4pack_mm_for_cpu``
(CPU) multiply x by W[n, k] = (u - 8) * scale + zero, with u the unsigned nibble. Our format stores
q = u - 8 with symmetric scales, so zero = 0 reproduces our dequantized weight exactly; the same codes
and scales feed both, and callers check the first result against x @ dequant(W) before timing.
"""

from __future__ import annotations

import torch

import grace_kernels as gk

INNER_K_TILES = 8  # tinygemm's packing parameter (2, 4 or 8); 8 is what torchao uses for K >= 1024


def int4pack_weight(weight: gk.Int4Weight, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scales_and_zeros) of ``weight`` for torch's int4 GEMM on ``device``.

    ``scales_and_zeros`` is [K / group_size, N, 2] bfloat16 (CUDA) or the scales' own dtype (CPU).
    Raises RuntimeError / NotImplementedError where torch has no int4 GEMM for this device or shape.
    """
    device = torch.device(device)
    codes, scales = gk.unpack_int4(weight)
    u = codes.to(device=device, dtype=torch.int32) + 8
    scales = scales.to(device)
    if device.type == "cuda":
        # The CUDA packing takes uint8 [N, K / 2] with the even k in the high nibble.
        packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8),
                                                            INNER_K_TILES)
        sz_dtype = torch.bfloat16
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, INNER_K_TILES)
        sz_dtype = scales.dtype
    s = scales.t().to(sz_dtype)
    return packed, torch.stack([s, torch.zeros_like(s)], -1).contiguous()


def int4pack_mm(x: torch.Tensor, pack: tuple[torch.Tensor, torch.Tensor], group_size: int) -> torch.Tensor:
    """x [M, K] @ W^T with torch's int4 GEMM: [M, N] in x's dtype (CUDA: bfloat16 x only)."""
    packed, scales_and_zeros = pack
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros.to(x.dtype))
