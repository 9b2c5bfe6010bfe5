"""INT4 linear layers: W4A16Linear (the canonical checkpoint layout) and W4A16KernelLinear (the CUDA kernel's).

Each object holds its weight in one layout, fixed when it is built. Both write and read the same state dict,
the compressed-tensors names: ``weight_packed`` int32 [N, K/8], ``weight_scale`` [N, K/group_size]
float16/bfloat16, ``weight_shape`` int64 [2] and ``bias``; a W4A16KernelLinear converts at that boundary.
For serving on the CUDA kernel, convert once at load time (:func:`convert_to_kernel_layout`, or
:meth:`W4A16Linear.to_kernel_layout` per layer), as Marlin's ``Layer.pack`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from grace_kernels.int4 import (
    SCALE_DTYPES,
    Int4Weight,
    pack_int4,
    quantize_rtn,
    repack_for_kernel,
    repack_to_canonical,
)
from grace_kernels.nn._packed_linear import PackedLinear
from grace_kernels.ops.w4a16 import cuda_kernel_unsupported, w4a16_matmul, w4a16_matmul_repacked


class W4A16Linear(PackedLinear):
    """y = x @ (scale * q)^T + b with q in [-8, 7] packed eight to an int32, in the canonical layout.

    Buffers: ``weight_packed`` int32 [N, K/8], ``weight_scale`` [N, K/group_size] float16/bfloat16,
    ``weight_shape`` int64 [2]; ``bias`` [N] (a frozen parameter) or None. Forward runs
    :func:`grace_kernels.w4a16_matmul`; on the CUDA kernel's path that repacks the weight on every call, so
    serve a :class:`W4A16KernelLinear` there (:meth:`to_kernel_layout`).
    """

    layout = "canonical"
    bits = 4
    _pack = staticmethod(pack_int4)

    @property
    def int4_weight(self) -> Int4Weight:
        """The weight in the canonical format (views of the buffers)."""
        return Int4Weight(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                          self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return w4a16_matmul(x, self.int4_weight, bias)

    @classmethod
    def from_int4_weight(cls, weight: Int4Weight, bias: torch.Tensor | None = None):
        """A layer holding a copy of ``weight`` (and of ``bias``), on the weight's device."""
        return cls._from_weight(weight, bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, scale_dtype: torch.dtype | None = None):
        """Round-to-nearest INT4 with absmax / 7 scales (the RTN post-training baseline)."""
        sd = scale_dtype or (linear.weight.dtype if linear.weight.dtype in SCALE_DTYPES else torch.float16)
        return cls.from_int4_weight(quantize_rtn(linear.weight, group_size, sd), linear.bias)

    def to_kernel_layout(self) -> W4A16KernelLinear:
        """A :class:`W4A16KernelLinear` holding this layer's weight (converted once) and bias.

        Raises ValueError when the CUDA kernel cannot take this layer (N % 64, K % 128, group_size 128).
        """
        layer = W4A16KernelLinear.from_int4_weight(self.int4_weight, self.bias)
        layer.weight_shape = self.weight_shape.clone()  # where this layer keeps it (e.g. moved with the model)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.scale_dtype}, layout={self.layout}")


class W4A16KernelLinear(W4A16Linear):
    """A :class:`W4A16Linear` whose weight is held only in the CUDA kernel's layout (for serving).

    Buffers: ``kernel_packed`` int32 [K/16, 2N] and ``kernel_scales`` [K/group_size, N] (the layout of
    :func:`grace_kernels.repack_for_kernel`), ``weight_shape``; ``bias``. It has no ``weight_packed`` /
    ``weight_scale`` buffers: ``state_dict`` converts to those canonical tensors and ``load_state_dict``
    converts from them, so checkpoints are the same as a W4A16Linear's. Forward runs
    :func:`grace_kernels.w4a16_matmul_repacked`: the CUDA kernel reads the buffers directly; on CPU (and
    GPUs without the extension) the canonical weight is rebuilt per call (correct, slow).

    Raises ValueError at construction when the CUDA kernel cannot take the shape (N % 64, K % 128,
    group_size 128).
    """

    layout = "kernel"

    def _register_weight(self, scale_dtype: torch.dtype, device) -> None:
        n, k, gs = self.out_features, self.in_features, self.group_size
        why = cuda_kernel_unsupported(n, k, gs, scale_dtype)
        if why is not None:
            raise ValueError(f"W4A16KernelLinear: {why}")
        self.register_buffer("kernel_packed", torch.zeros(k // 16, 2 * n, dtype=torch.int32, device=device))
        self.register_buffer("kernel_scales", torch.ones(k // gs, n, dtype=scale_dtype, device=device))

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.kernel_scales.dtype

    @property
    def int4_weight(self) -> Int4Weight:
        """The weight in the canonical format, rebuilt from the kernel layout (new tensors)."""
        return repack_to_canonical(self.kernel_packed, self.kernel_scales, self.group_size)

    @torch.no_grad()
    def _copy_weight_(self, weight: Int4Weight) -> None:
        w = repack_for_kernel(weight)
        self.kernel_packed.copy_(w.kernel_packed)
        self.kernel_scales.copy_(w.kernel_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return w4a16_matmul_repacked(x, self.kernel_packed, self.kernel_scales, bias, self.group_size)

    def to_kernel_layout(self) -> W4A16KernelLinear:
        return self

    # The checkpoint format is the canonical one: convert at the state-dict boundary.
    _CANONICAL = ("weight_packed", "weight_scale")
    _KERNEL = ("kernel_packed", "kernel_scales")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The order nn.Module writes for a W4A16Linear: parameters, then buffers.
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        w = self.int4_weight
        destination[prefix + "weight_packed"], destination[prefix + "weight_scale"] = w.packed, w.scales
        destination[prefix + "weight_shape"] = self.weight_shape if keep_vars else self.weight_shape.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        canonical = [prefix + name for name in self._CANONICAL]
        kernel = [prefix + name for name in self._KERNEL]
        local = {key: value for key, value in state_dict.items() if key not in canonical and key not in kernel}
        if strict:  # the kernel layout's names are never checkpoint names
            unexpected_keys.extend(key for key in kernel if key in state_dict)
        absent = [key for key in canonical if key not in state_dict]
        if not absent:
            packed, scales = (state_dict[key] for key in canonical)
            try:
                w = repack_for_kernel(Int4Weight(packed, scales.to(self.kernel_scales.dtype),
                                                 (self.out_features, self.in_features), self.group_size))
            except ValueError as e:
                error_msgs.append(f"{prefix}weight_packed / {prefix}weight_scale do not fit "
                                  f"{self.__class__.__name__}: {e}")
                return
            local[kernel[0]], local[kernel[1]] = w.kernel_packed, w.kernel_scales
        missing = []
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing, unexpected_keys, error_msgs)
        # What the checkpoint lacks, under the names a checkpoint holds.
        missing_keys.extend([key for key in missing if key not in kernel] + absent)


def convert_to_kernel_layout(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace, in place, every :class:`W4A16Linear` submodule of ``model`` that the CUDA kernel takes by a
    :class:`W4A16KernelLinear` holding the same weight (converted once); returns how many were replaced.

    ``dtype`` is the activations' dtype (float16/bfloat16 for the kernel); None: each layer's scale dtype.
    Layers the kernel cannot take (N % 64, K % 128, group_size 128, dtype) keep the canonical layout.
    ``model`` itself is not replaced, only its submodules.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not W4A16Linear or not name:
            continue
        if cuda_kernel_unsupported(module.out_features, module.in_features, module.group_size,
                                   dtype or module.scale_dtype) is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.to_kernel_layout())
        replaced += 1
    return replaced
