"""INT4 weight-only (W4A16) GEMM and the canonical INT4 weight format.

Format (compressed-tensors "pack-quantized"; what ``grace export`` writes and serving engines load):
    packed  int32 [N, K / 8]     u = q + 8, eight 4-bit values per word, low nibble first along K
    scales  [N, K / group_size]  float16 or bfloat16, symmetric (no zero point)
    W[n, k] = scales[n, k // group_size] * q[n, k],  q in [-8, 7]

GEMM: y = x @ W^T (+ bias), x [..., K] float16/bfloat16 with any number of rows M, accumulated in
float32 (split-K partial sums included), returned in x's dtype.

Backends (grace_kernels._backend): a Triton split-K kernel on CUDA tensors (and on CPU tensors under
TRITON_INTERPRET=1), the PyTorch reference (dequantize, then a float32 matmul) otherwise. The CUDA
extension kernel of issue 5 is not built yet.

Shape rules: K % 8 == 0 and K % group_size == 0 (the format itself); group_size in {32, 64, 128,
256}. Any M and N. Violations raise ValueError naming them.
"""

from __future__ import annotations

import dataclasses

import torch

from grace_kernels._backend import select_backend
from grace_kernels.reference import w4a16 as ref

SCALE_DTYPES = (torch.float16, torch.bfloat16)
GROUP_SIZES = (32, 64, 128, 256)


@dataclasses.dataclass
class Int4Weight:
    """An INT4 weight in the canonical format. ``packed`` int32 [N, K/8], ``scales`` [N, K/group_size]."""

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 128

    def __post_init__(self):
        n, k = self.shape
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape) != (n, k // 8):
            raise ValueError(f"packed must be int32 [{n}, {k // 8}], got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        if self.scales.dtype not in SCALE_DTYPES or tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"scales must be float16/bfloat16 [{n}, {k // self.group_size}], got "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32."""
        return ref.dequantize_int4_ref(self.packed, self.scales, self.group_size)

    def to(self, device) -> Int4Weight:
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.shape, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * 4 + self.scales.numel() * self.scales.element_size()


def _check_codes_scales(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = codes.shape
    if k % 8 or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of 8 and of group_size {group_size}")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be float16 or bfloat16, got {scales.dtype}")
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"scales must have shape {(n, k // group_size)}, got {tuple(scales.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(f"codes must be in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]")


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Pack int8 codes [N, K] in [-8, 7] with per-group scales into the canonical :class:`Int4Weight`."""
    _check_codes_scales(codes, scales, group_size)
    return Int4Weight(ref.pack_int4_ref(codes), scales.contiguous(), tuple(codes.shape), group_size)


def unpack_int4(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], scales): the exact inverse of :func:`pack_int4`."""
    return ref.unpack_int4_ref(weight.packed), weight.scales


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """Round-to-nearest INT4 with absmax / 7 scales per group (the PTQ baseline)."""
    if not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D floating tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    w = weight.float().view(n, k // group_size, group_size)
    scales = (w.abs().amax(-1) / 7).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    codes = torch.round(w / scales.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8).view(n, k)
    return pack_int4(codes, scales, group_size)


@torch.library.custom_op("grace_kernels::w4a16_matmul", mutates_args=())
def _w4a16_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] -> float32 [M, N]."""
    if select_backend("w4a16_matmul", x.device) == "triton":
        from grace_kernels.triton import w4a16 as tri

        return tri.w4a16_matmul(x, packed, scales.to(x.dtype), group_size)
    return x.float() @ ref.dequantize_int4_ref(packed, scales, group_size).t()


@_w4a16_op.register_fake
def _(x, packed, scales, group_size):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), float32 accumulation, in x's dtype. x: [..., K] float16/bfloat16/float32."""
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    if not x.is_floating_point() or x.shape[-1] != k:
        raise ValueError(f"x must be floating with last dimension K = {k}, got {x.dtype} {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.device != weight.packed.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.packed.device}")
    x2d = x.reshape(-1, k).contiguous()
    y = _w4a16_op(x2d, weight.packed, weight.scales, weight.group_size)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
