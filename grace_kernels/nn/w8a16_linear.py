"""W8A16Linear: an INT8 weight-only linear layer in the compressed-tensors checkpoint layout."""

from __future__ import annotations

import torch

from grace_kernels.int8 import Int8Weight, pack_int8
from grace_kernels.nn._packed_linear import PackedLinear
from grace_kernels.ops.w8a16 import w8a16_matmul
from grace_kernels.reference.w8a16 import BITS


class W8A16Linear(PackedLinear):
    """y = x @ (scale * q)^T + b with q in [-128, 127] packed four to an int32.

    Buffers (the compressed-tensors names): ``weight_packed`` int32 [N, K/4], ``weight_scale``
    [N, K/group_size] float16/bfloat16, ``weight_shape`` int64 [2]; ``bias`` [N] (a frozen parameter) or
    None. Forward runs :func:`grace_kernels.ops.w8a16.w8a16_matmul` (Triton or the reference).
    """

    bits = BITS
    _pack = staticmethod(pack_int8)

    @property
    def int8_weight(self) -> Int8Weight:
        """The weight (views of the buffers)."""
        return Int8Weight(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                          self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_matmul(x, self.int8_weight, None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def from_int8_weight(cls, weight: Int8Weight, bias: torch.Tensor | None = None) -> W8A16Linear:
        """A layer holding a copy of ``weight`` (and of ``bias``), on the weight's device."""
        return cls._from_weight(weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.scale_dtype}, bits=8")
