"""What the INT4 and INT8 weight-only linear layers share: the compressed-tensors buffers (``weight_packed``
int32 [N, K * bits / 32], ``weight_scale`` [N, K / group_size] float16/bfloat16, ``weight_shape`` int64 [2]),
a frozen ``bias``, and the constructors from a packed weight and from a trained LSQ QuantLinear."""

from __future__ import annotations

import torch
from torch import nn

from grace_kernels.int4 import SCALE_DTYPES


class PackedLinear(nn.Module):
    """Base of W4A16Linear and W8A16Linear; a subclass sets ``bits``, ``_pack`` (codes, scales, group_size ->
    its weight object) and ``_weight`` (the buffers as that object)."""

    bits: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        per_word = 32 // self.bits
        if in_features % group_size or in_features % per_word:
            raise ValueError(f"in_features {in_features} must be a multiple of {per_word} and of group_size "
                             f"{group_size}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self._register_weight(scale_dtype, device)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype or scale_dtype),
                                 requires_grad=False) if bias else None

    def _register_weight(self, scale_dtype: torch.dtype, device) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("weight_packed", torch.zeros(n, k * self.bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(n, k // self.group_size, dtype=scale_dtype, device=device))

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    @torch.no_grad()
    def _copy_weight_(self, weight) -> None:
        self.weight_packed.copy_(weight.packed)
        self.weight_scale.copy_(weight.scales)

    @classmethod
    @torch.no_grad()
    def _from_weight(cls, weight, bias: torch.Tensor | None, **kwargs):
        """A layer holding a copy of ``weight`` (and of ``bias``), on the weight's device; ``kwargs`` go to the
        subclass's constructor."""
        n, k = weight.shape
        layer = cls(k, n, bias=bias is not None, group_size=weight.group_size, scale_dtype=weight.scales.dtype,
                    bias_dtype=None if bias is None else bias.dtype, device=weight.packed.device, **kwargs)
        layer._copy_weight_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, quant_linear, scale_dtype: torch.dtype | None = None):
        """The codes and scales a trained LSQ QuantLinear of this layer's bit width represents.

        Scales are stored in ``scale_dtype`` (default: the QuantLinear's own scale_dtype, else bfloat16) and
        the codes are computed against exactly those stored scales, so the output equals QuantLinear's
        forward with ``scale_dtype`` set to the same dtype, up to matmul rounding. A layer trained with that
        scale_dtype (``QuantLinear(..., scale_dtype=torch.bfloat16)``) exports exactly.

        Raises ValueError when the QuantLinear has another bit width.
        """
        from grace_kernels.ops.lsq import lsq_quantize

        if quant_linear.bits != cls.bits:
            raise ValueError(f"{cls.__name__} holds {cls.bits}-bit codes; this layer has bits={quant_linear.bits}")
        sd = scale_dtype or quant_linear.scale_dtype or torch.bfloat16
        codes, scales = lsq_quantize(quant_linear.weight, quant_linear.log_scale, bits=cls.bits,
                                     group_size=quant_linear.group_size, scale_dtype=sd)
        return cls._from_weight(cls._pack(codes, scales, quant_linear.group_size), quant_linear.bias)
