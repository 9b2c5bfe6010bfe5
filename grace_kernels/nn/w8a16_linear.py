"""W8A16Linear: an INT8 weight-only linear layer in the compressed-tensors checkpoint layout."""

from __future__ import annotations

import torch
from torch import nn

from grace_kernels.int4 import SCALE_DTYPES
from grace_kernels.int8 import Int8Weight, pack_int8
from grace_kernels.ops.w8a16 import w8a16_matmul
from grace_kernels.reference.w8a16 import PER_WORD


class W8A16Linear(nn.Module):
    """y = x @ (scale * q)^T + b with q in [-128, 127] packed four to an int32.

    Buffers (the compressed-tensors names): ``weight_packed`` int32 [N, K/4], ``weight_scale``
    [N, K/group_size] float16/bfloat16, ``weight_shape`` int64 [2]; ``bias`` [N] (a frozen parameter) or
    None. Forward runs :func:`grace_kernels.ops.w8a16.w8a16_matmul` (Triton or the reference).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if in_features % group_size or in_features % PER_WORD:
            raise ValueError(f"in_features {in_features} must be a multiple of {PER_WORD} and of group_size "
                             f"{group_size}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // PER_WORD, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, dtype=scale_dtype,
                                                        device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype or scale_dtype),
                                 requires_grad=False) if bias else None

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    @property
    def int8_weight(self) -> Int8Weight:
        """The weight (views of the buffers)."""
        return Int8Weight(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                          self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_matmul(x, self.int8_weight, None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    @torch.no_grad()
    def from_int8_weight(cls, weight: Int8Weight, bias: torch.Tensor | None = None) -> W8A16Linear:
        """A layer holding a copy of ``weight`` (and of ``bias``), on the weight's device."""
        n, k = weight.shape
        layer = cls(k, n, bias=bias is not None, group_size=weight.group_size, scale_dtype=weight.scales.dtype,
                    bias_dtype=None if bias is None else bias.dtype, device=weight.packed.device)
        layer.weight_packed.copy_(weight.packed)
        layer.weight_scale.copy_(weight.scales)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, quant_linear, scale_dtype: torch.dtype | None = None) -> W8A16Linear:
        """The codes and scales a trained 8-bit LSQ QuantLinear represents, as
        :meth:`W4A16Linear.from_quant_linear` does for 4 bits (scales in ``scale_dtype``, default the
        layer's own, else bfloat16; codes computed against exactly those scales)."""
        from grace_kernels.ops.lsq import lsq_quantize

        if quant_linear.bits != 8:
            raise ValueError(f"W8A16 holds 8-bit codes; this layer has bits={quant_linear.bits}")
        sd = scale_dtype or quant_linear.scale_dtype or torch.bfloat16
        codes, scales = lsq_quantize(quant_linear.weight, quant_linear.log_scale, bits=8,
                                     group_size=quant_linear.group_size, scale_dtype=sd)
        return cls.from_int8_weight(pack_int8(codes, scales, quant_linear.group_size), quant_linear.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.scale_dtype}, bits=8")
