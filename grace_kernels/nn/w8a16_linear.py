"""W8A16Linear: an INT8 weight-only linear layer in the compressed-tensors checkpoint layout, symmetric or
asymmetric (group-wise zero points)."""

from __future__ import annotations

import torch

from grace_kernels.int8 import Int8Weight, pack_int8
from grace_kernels.nn._packed_linear import PackedLinear
from grace_kernels.ops.w8a16 import w8a16_matmul
from grace_kernels.reference.w4a16 import zero_point_words
from grace_kernels.reference.w8a16 import BITS


class W8A16Linear(PackedLinear):
    """y = x @ (scale * q)^T + b, or x @ (scale * (q - z))^T + b when ``asymmetric``, q in [-128, 127] packed
    four to an int32.

    Buffers (the compressed-tensors names): ``weight_packed`` int32 [N, K/4], ``weight_scale``
    [N, K/group_size] float16/bfloat16, ``weight_shape`` int64 [2], and with ``asymmetric=True``
    ``weight_zero_point`` int32 [ceil(N/4), K/group_size] (compressed-tensors' layout: four 8-bit zero points
    per word along N); ``bias`` [N] (a frozen parameter) or None. Forward runs
    :func:`grace_kernels.ops.w8a16.w8a16_matmul` (Triton or the reference: no CUDA kernel exists for 8-bit
    codes, with or without zero points).
    """

    bits = BITS
    _pack = staticmethod(pack_int8)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype | None = None, device=None,
                 asymmetric: bool = False):
        self.asymmetric = bool(asymmetric)   # read by _register_weight, which the base constructor calls
        super().__init__(in_features, out_features, bias, group_size=group_size, scale_dtype=scale_dtype,
                         bias_dtype=bias_dtype, device=device)

    def _register_weight(self, scale_dtype: torch.dtype, device) -> None:
        super()._register_weight(scale_dtype, device)
        if self.asymmetric:
            # all-zero words: z = -128 under the all-zero codes' q = -128, so an unloaded layer's weight is 0
            words, groups = zero_point_words(self.out_features, bits=BITS), self.in_features // self.group_size
            self.register_buffer("weight_zero_point", torch.zeros(words, groups, dtype=torch.int32, device=device))

    @property
    def int8_weight(self) -> Int8Weight:
        """The weight (views of the buffers)."""
        return Int8Weight(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                          self.group_size, self.weight_zero_point if self.asymmetric else None)

    @torch.no_grad()
    def _copy_weight_(self, weight: Int8Weight) -> None:
        if (weight.zero_points is not None) != self.asymmetric:
            raise ValueError(f"an {'a' if weight.zero_points is not None else ''}symmetric weight does not fit a "
                             f"W8A16Linear with asymmetric={self.asymmetric}")
        super()._copy_weight_(weight)
        if self.asymmetric:
            self.weight_zero_point.copy_(weight.zero_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_matmul(x, self.int8_weight, None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def from_int8_weight(cls, weight: Int8Weight, bias: torch.Tensor | None = None) -> W8A16Linear:
        """A layer holding a copy of ``weight`` (symmetric, or asymmetric with its zero points) and of ``bias``,
        on the weight's device."""
        return cls._from_weight(weight, bias, asymmetric=weight.zero_points is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.scale_dtype}, bits=8"
                f"{', asymmetric=True' if self.asymmetric else ''}")
