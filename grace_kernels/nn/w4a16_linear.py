"""W4A16Linear: a linear layer holding an INT4 weight in the canonical pack-quantized format."""

from __future__ import annotations

import torch
from torch import nn

from grace_kernels.ops.w4a16 import (
    SCALE_DTYPES,
    Int4Weight,
    cuda_kernel_unsupported,
    pack_int4,
    quantize_rtn,
    repack_for_kernel,
    repack_to_canonical,
    w4a16_matmul,
    w4a16_matmul_repacked,
)


class W4A16Linear(nn.Module):
    """y = x @ (scale * q)^T + b with q in [-8, 7] packed eight to an int32.

    The state dict holds exactly the compressed-tensors names: ``weight_packed`` int32 [N, K/8],
    ``weight_scale`` [N, K/group_size] float16/bfloat16, ``weight_shape`` int64 [2], and ``bias``.
    On CUDA inputs the CUDA kernel's layout (:func:`repack_for_kernel`) is computed once and cached
    outside the state dict, keyed on the buffers' identity and version so that loading a state dict
    or moving the module invalidates it. That keeps both layouts in memory; for serving, call
    :meth:`use_kernel_layout_` once after loading: the buffers then hold only the kernel layout (half the
    INT4 weight memory), while ``state_dict`` still writes, and ``load_state_dict`` still reads, the
    canonical format.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if in_features % group_size or in_features % 8:
            raise ValueError(f"in_features {in_features} must be a multiple of 8 and of group_size {group_size}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, dtype=scale_dtype,
                                                        device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        bias_dtype = bias_dtype or scale_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype),
                                 requires_grad=False) if bias else None
        self._kernel_cache: tuple[tuple, Int4Weight] | None = None
        # "canonical": weight_packed int32 [N, K/8], weight_scale [N, K/gs]. "kernel": weight_packed int32
        # [K/16, 2N], weight_scale [K/gs, N], the CUDA kernel's layout (use_kernel_layout_).
        self.layout = "canonical"

    @property
    def int4_weight(self) -> Int4Weight:
        """The weight in the canonical format (rebuilt from the kernel layout when that is all the layer holds)."""
        if self.layout == "kernel":
            return repack_to_canonical(self.weight_packed, self.weight_scale, self.group_size)
        return Int4Weight(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                          self.group_size)

    @torch.no_grad()
    def use_kernel_layout_(self) -> W4A16Linear:
        """Keep only the CUDA kernel's layout in the buffers (in place; returns self).

        For serving: the canonical copy is dropped, so the INT4 weights take their packed size once
        rather than twice. Forward on CUDA reads the buffers directly; on CPU it rebuilds the canonical
        weight per call (correct, slow). ``state_dict`` converts back to the canonical format and
        ``load_state_dict`` accepts it (and keeps the kernel layout). Raises ValueError when the CUDA
        kernel cannot take this layer's shape (N % 64, K % 128, group_size 128).
        """
        if self.layout == "kernel":
            return self
        why = cuda_kernel_unsupported(self.out_features, self.in_features, self.group_size, self.weight_scale.dtype)
        if why is not None:
            raise ValueError(f"use_kernel_layout_: {why}")
        w = repack_for_kernel(self.int4_weight)
        self.weight_packed, self.weight_scale = w.kernel_packed, w.kernel_scales
        self.layout, self._kernel_cache = "kernel", None
        return self

    def _to_canonical_(self) -> None:
        w = self.int4_weight
        self.weight_packed, self.weight_scale = w.packed, w.scales
        self.layout = "canonical"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "kernel":  # the checkpoint format is the canonical one, whatever the layer holds
            w = self.int4_weight
            destination[prefix + "weight_packed"], destination[prefix + "weight_scale"] = w.packed, w.scales

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        kernel = self.layout == "kernel"
        if kernel:
            self._to_canonical_()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if kernel:
            self.use_kernel_layout_()

    @classmethod
    def from_int4_weight(cls, weight: Int4Weight, bias: torch.Tensor | None = None) -> W4A16Linear:
        n, k = weight.shape
        layer = cls(k, n, bias=bias is not None, group_size=weight.group_size, scale_dtype=weight.scales.dtype,
                    bias_dtype=None if bias is None else bias.dtype, device=weight.packed.device)
        layer.weight_packed.copy_(weight.packed)
        layer.weight_scale.copy_(weight.scales)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    scale_dtype: torch.dtype | None = None) -> W4A16Linear:
        """Round-to-nearest INT4 with absmax / 7 scales (the RTN post-training baseline)."""
        sd = scale_dtype or (linear.weight.dtype if linear.weight.dtype in SCALE_DTYPES else torch.float16)
        return cls.from_int4_weight(quantize_rtn(linear.weight, group_size, sd), linear.bias)

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, quant_linear, scale_dtype: torch.dtype | None = None) -> W4A16Linear:
        """The codes and scales a trained LSQ QuantLinear (4 bits) represents.

        Scales are stored in ``scale_dtype`` (default: the QuantLinear's own scale_dtype, else
        bfloat16) and the codes are computed against exactly those stored scales, so the output equals
        QuantLinear's forward with ``scale_dtype`` set to the same dtype, up to matmul rounding. A layer
        trained with that scale_dtype (``QuantLinear(..., scale_dtype=torch.bfloat16)``) exports exactly.
        """
        from grace_kernels.ops.lsq import lsq_quantize

        if quant_linear.bits != 4:
            raise ValueError(f"W4A16 holds 4-bit codes; this layer has bits={quant_linear.bits}")
        sd = scale_dtype or quant_linear.scale_dtype or torch.bfloat16
        codes, scales = lsq_quantize(quant_linear.weight, quant_linear.log_scale, bits=4,
                                     group_size=quant_linear.group_size, scale_dtype=sd)
        return cls.from_int4_weight(pack_int4(codes, scales, quant_linear.group_size), quant_linear.bias)

    def kernel_weight(self) -> Int4Weight:
        """:attr:`int4_weight` with the CUDA kernel's layout filled in, repacked only when the buffers changed."""
        if self.layout == "kernel":
            return self.int4_weight
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_packed, self.weight_scale))
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, repack_for_kernel(self.int4_weight))
        return self._kernel_cache[1]

    def _weight_for(self, x: torch.Tensor) -> Int4Weight:
        if x.device.type != "cuda" or cuda_kernel_unsupported(self.out_features, self.in_features, self.group_size,
                                                              x.dtype):
            return self.int4_weight
        return self.kernel_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.layout == "kernel":
            return w4a16_matmul_repacked(x, self.weight_packed, self.weight_scale, bias, self.group_size)
        return w4a16_matmul(x, self._weight_for(x), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.weight_scale.dtype}, layout={self.layout}")
