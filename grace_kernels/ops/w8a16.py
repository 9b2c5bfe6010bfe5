"""INT8 weight-only (W8A16) GEMM: y = x @ W^T (+ bias), W an INT8 weight (grace_kernels.int8), symmetric or
asymmetric (zero points).

x [..., K] float16/bfloat16/float32 with any number of rows M, accumulated in float32, returned in x's
dtype. Entry point ``w8a16_matmul(x, weight: Int8Weight, bias)``; op ``grace_kernels::w8a16_matmul``
(x [M, K], packed, scales, group_size, zero_points=None) -> float32 [M, N], with
W[n, k] = scales[n, g] * (q[n, k] - z[n, g]) per group g = k // group_size (z = 0 without zero points).

Backends (grace_kernels._backend): there is no CUDA-extension kernel for 8-bit codes, symmetric or not.
    triton     the W4A16 split-K kernel with 8-bit fields (grace_kernels.triton.w4a16, ``BITS=8``; the zero
               points a constexpr-gated load, ``HAS_ZP``): CUDA tensors, and CPU tensors under
               TRITON_INTERPRET=1;
    reference  dequantize, then a float32 matmul.
"""

from __future__ import annotations

import torch

from grace_kernels.int8 import Int8Weight
from grace_kernels.ops.w4a16 import _check_x_bias as check_x_bias
from grace_kernels.ops.w4a16 import wna16_fake, wna16_impl
from grace_kernels.reference import w8a16 as ref

torch.library.define("grace_kernels::w8a16_matmul",
                     "(Tensor x, Tensor packed, Tensor scales, int group_size, Tensor? zero_points=None) -> Tensor")


@torch.library.impl("grace_kernels::w8a16_matmul", ("cpu", "cuda"))
def _w8a16_matmul_impl(x, packed, scales, group_size, zero_points=None):
    return wna16_impl("w8a16_matmul", ref.BITS, x, packed, scales, group_size, zero_points)


@torch.library.register_fake("grace_kernels::w8a16_matmul")
def _(x, packed, scales, group_size, zero_points=None):
    return wna16_fake(ref.BITS, x, packed, scales, zero_points)


def w8a16_matmul(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), float32 accumulation, in x's dtype.

    Args:
        x: [..., K] floating, on the weight's device.
        weight: an :class:`Int8Weight` [N, K], symmetric (W = scale * q) or asymmetric (zero points:
            W = scale * (q - z) per group, computed exactly in float32 before the one rounding to x's dtype).
        bias: [N] or None, added in float32 before the final rounding.

    Returns [..., N] in x's dtype. Raises ValueError on mismatched shapes or devices, RuntimeError when a
    forced backend cannot run the call (``cuda``: no CUDA kernel exists for 8-bit codes).
    """
    if not isinstance(weight, Int8Weight):
        raise ValueError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    n, k = weight.shape
    check_x_bias(x, n, k, bias, weight.packed.device)
    x2d = x.reshape(-1, k).contiguous()
    y = torch.ops.grace_kernels.w8a16_matmul(x2d, weight.packed, weight.scales, weight.group_size, weight.zero_points)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
