"""The INT8 weight format: compressed-tensors "pack-quantized" with 8-bit codes (symmetric, group-wise).

    packed  int32 [N, K / 4]     u = q + 128, four per word, low byte first along K
    scales  [N, K / group_size]  float16 or bfloat16, finite and > 0, symmetric (no zero point)
    W[n, k] = scales[n, k // group_size] * q[n, k],  q in [-128, 127]

with N >= 1, K >= 1, K % 4 == 0, K % group_size == 0 and group_size in :data:`GROUP_SIZES`: what
``grace export`` writes for an INT8 run and what vLLM's WNA16 path (``CompressedTensorsWNA16``, 8-bit
group scheme) loads. The INT8 twin of :mod:`grace_kernels.int4`; there is no CUDA-kernel layout (the
W8A16 GEMM runs on Triton or the reference). Violations raise ValueError naming the argument.

Asymmetric weights (compressed-tensors ``symmetric: false``, what llm-compressor writes for an asymmetric
W8A16 scheme) add group-wise zero points in compressed-tensors' own layout:

    zero_points  int32 [ceil(N / 4), K / group_size]   u = z + 128, four per word along N, low byte first
    W[n, k] = scales[n, g] * (q[n, k] - z[n, g]),  g = k // group_size,  q, z in [-128, 127]

so q - z spans [-255, 255] (the bit mapping: grace_kernels.reference.w8a16).
"""

from __future__ import annotations

import dataclasses

import torch

from grace_kernels.int4 import GROUP_SIZES, SCALE_DTYPES, _check_tensor, check_codes_and_scales, check_weight_shape
from grace_kernels.reference import w8a16 as ref
from grace_kernels.reference.w4a16 import zero_point_words

__all__ = ["GROUP_SIZES", "SCALE_DTYPES", "Int8Weight", "pack_int8", "unpack_int8", "unpack_int8_zero_points"]


def check_format(n: int, k: int, group_size: int) -> None:
    """ValueError unless [n, k] with ``group_size`` is a shape the INT8 format can hold."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if n < 1 or k < 1:
        raise ValueError(f"an INT8 weight needs at least one row and one column, got shape [{n}, {k}]")
    if k % ref.PER_WORD or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of {ref.PER_WORD} and of group_size {group_size}")


@dataclasses.dataclass
class Int8Weight:
    """An INT8 weight [N, K]: ``packed`` int32 [N, K/4], ``scales`` [N, K/group_size] float16/bfloat16, and
    for an asymmetric weight ``zero_points`` int32 [ceil(N/4), K/group_size] (None: symmetric).

    Construction checks dtypes, shapes and devices (ValueError), not the values (see :func:`pack_int8`).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 128
    zero_points: torch.Tensor | None = None

    def __post_init__(self):
        self.shape = check_weight_shape(self.shape)
        n, k = self.shape
        check_format(n, k, self.group_size)
        _check_tensor("packed", self.packed, (torch.int32,), (n, k // ref.PER_WORD))
        _check_tensor("scales", self.scales, SCALE_DTYPES, (n, k // self.group_size), ("packed", self.packed))
        if self.zero_points is not None:
            _check_tensor("zero_points", self.zero_points, (torch.int32,),
                          (zero_point_words(n, bits=ref.BITS), k // self.group_size), ("packed", self.packed))

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32: scales * q, or scales * (q - z) for an asymmetric weight (exact)."""
        return ref.dequantize_int8_ref(self.packed, self.scales, self.group_size, zero_points=self.zero_points)

    def to(self, device) -> Int8Weight:
        zero = None if self.zero_points is None else self.zero_points.to(device)
        return Int8Weight(self.packed.to(device), self.scales.to(device), self.shape, self.group_size, zero)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (packed codes, scales, zero points)."""
        zero = 0 if self.zero_points is None else self.zero_points.numel() * 4
        return self.packed.numel() * 4 + self.scales.numel() * self.scales.element_size() + zero


def pack_int8(codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
              zero_points: torch.Tensor | None = None) -> Int8Weight:
    """Pack int8 codes [N, K] in [-128, 127] with per-group scales [N, K/group_size] into an :class:`Int8Weight`;
    with int8 ``zero_points`` [N, K/group_size] (any int8 value) the weight is asymmetric, W = scale * (q - z).

    Raises ValueError naming the argument: codes not 2-D int8, K not a multiple of 4 and of group_size,
    group_size not in :data:`GROUP_SIZES`, scales not float16/bfloat16 [N, K/group_size] on the codes'
    device, or not finite and > 0; zero_points not int8 [N, K/group_size] on the codes' device.
    """
    n, k = check_codes_and_scales(codes, scales, group_size, check_format)
    packed_zero = None
    if zero_points is not None:
        _check_tensor("zero_points", zero_points, (torch.int8,), (n, k // group_size), ("codes", codes))
        packed_zero = ref.pack_int8_zero_points_ref(zero_points)
    return Int8Weight(ref.pack_int8_ref(codes), scales.contiguous(), (n, k), group_size, packed_zero)


def unpack_int8(weight: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], scales [N, K/group_size]): the exact inverse of :func:`pack_int8` for a symmetric
    weight; an asymmetric weight's zero points: :func:`unpack_int8_zero_points`."""
    if not isinstance(weight, Int8Weight):
        raise ValueError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    return ref.unpack_int8_ref(weight.packed), weight.scales


def unpack_int8_zero_points(weight: Int8Weight) -> torch.Tensor | None:
    """int8 zero points [N, K/group_size] of an asymmetric weight (as given to :func:`pack_int8`); None when
    the weight is symmetric."""
    if not isinstance(weight, Int8Weight):
        raise ValueError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    if weight.zero_points is None:
        return None
    return ref.unpack_int8_zero_points_ref(weight.zero_points, weight.shape[0])
