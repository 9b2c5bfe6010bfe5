"""QuantLinear: an nn.Linear trained through group-wise LSQ fake quantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grace_kernels.ops.lsq import lsq_fake_quant, lsq_init_log_scale, lsq_quantize


class QuantLinear(nn.Linear):
    """y = x @ lsq_fake_quant(W, log_scale)^T + b.

    ``weight`` and ``log_scale`` (float32 [out, in // group_size]) are both trained; the forward
    sees exactly the weights an INT4 (or INT``bits``) checkpoint will hold, and with
    ``scale_dtype`` set, exactly its fp16/bf16 scales too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 128, scale_dtype: torch.dtype | None = None, device=None, dtype=None):
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.log_scale = nn.Parameter(
            lsq_init_log_scale(self.weight.detach(), bits=bits, group_size=group_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, *, method: str = "percentile",
                    scale_dtype: torch.dtype | None = None) -> QuantLinear:
        """A QuantLinear sharing nothing with ``linear``: weights copied, scales initialised by ``method``."""
        if linear.in_features % group_size:
            raise ValueError(f"in_features {linear.in_features} is not a multiple of group_size {group_size}")
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.bits, q.group_size, q.scale_dtype = bits, group_size, scale_dtype
        q.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        q.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        q.log_scale = nn.Parameter(
            lsq_init_log_scale(q.weight.detach(), bits=bits, group_size=group_size, method=method))
        return q

    def fake_quant_weight(self) -> torch.Tensor:
        return lsq_fake_quant(self.weight, self.log_scale, bits=self.bits, group_size=self.group_size,
                              scale_dtype=self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant_weight()
        # Under autocast the matmul runs in the autocast dtype; the fake-quant grid is computed in float32.
        return F.linear(x, w.to(x.dtype) if not torch.is_autocast_enabled() else w, self.bias)

    @torch.no_grad()
    def quantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [out, in], scales [out, in // group_size]) as :func:`lsq_quantize` returns them."""
        return lsq_quantize(self.weight, self.log_scale, bits=self.bits, group_size=self.group_size,
                            scale_dtype=self.scale_dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the fake-quantized weight (same dtype and device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.fake_quant_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        sd = f", scale_dtype={self.scale_dtype}" if self.scale_dtype is not None else ""
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}{sd}"
