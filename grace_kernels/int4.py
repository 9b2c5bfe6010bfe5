"""The INT4 weight format: the canonical checkpoint layout, the CUDA kernel's layout, and the conversions.

Canonical format (compressed-tensors "pack-quantized"; what ``grace export`` writes and serving engines load):
    packed  int32 [N, K / 8]     u = q + 8, eight 4-bit values per word, low nibble first along K
    scales  [N, K / group_size]  float16 or bfloat16, finite and > 0, symmetric (no zero point)
    W[n, k] = scales[n, k // group_size] * q[n, k],  q in [-8, 7]
with N >= 1, K >= 1, K % 8 == 0, K % group_size == 0 and group_size in :data:`GROUP_SIZES`.

Kernel layout (:func:`repack_for_kernel`, converted once at load time, bit-exactly invertible with
:func:`repack_to_canonical`): ``kernel_packed`` int32 [K / 16, 2 N] and ``kernel_scales`` [K / group_size, N],
tiles of 16 x 64 ordered so that one 16-byte load per lane feeds mma.m16n8k16 B fragments, nibbles
interleaved for the lop3 int4-to-half conversion; it needs N % 64 == 0 and K % 16 == 0. The bit mapping
is in grace_kernels.reference.w4a16.

Every check of the format lives here: :class:`Int4Weight` checks the shapes and dtypes of its tensors at
construction, :func:`pack_int4` additionally the values of what enters the format (codes in [-8, 7],
scales finite and > 0). Violations raise ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses

import torch

from grace_kernels.reference import w4a16 as ref

SCALE_DTYPES = (torch.float16, torch.bfloat16)
GROUP_SIZES = (32, 64, 128, 256)


def check_format(n: int, k: int, group_size: int) -> None:
    """ValueError unless [n, k] with ``group_size`` is a shape the canonical format can hold."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if n < 1 or k < 1:
        raise ValueError(f"an INT4 weight needs at least one row and one column, got shape [{n}, {k}]")
    if k % 8 or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of 8 and of group_size {group_size}")


def check_kernel_tiles(n: int, k: int) -> None:
    """ValueError unless the kernel layout can hold an [n, k] weight (whole 16 x 64 tiles)."""
    if n % ref.KERNEL_TILE_N or k % ref.KERNEL_TILE_K:
        raise ValueError(f"the kernel layout needs N % {ref.KERNEL_TILE_N} == 0 and K % {ref.KERNEL_TILE_K} == 0, "
                         f"got N = {n}, K = {k} (zero-pad out_features to a multiple of {ref.KERNEL_TILE_N})")


def _check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, int],
                  same_device_as: tuple[str, torch.Tensor] | None = None) -> None:
    """ValueError naming ``name`` unless ``t`` is a tensor of one of ``dtypes`` with ``shape`` and, when
    ``same_device_as`` = (other name, other tensor) is given, on that tensor's device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if same_device_as is not None and t.device != same_device_as[1].device:
        raise ValueError(f"{name} is on {t.device} but {same_device_as[0]} is on {same_device_as[1].device}")


def check_kernel_layout(kernel_packed: torch.Tensor, kernel_scales: torch.Tensor,
                        group_size: int) -> tuple[int, int]:
    """(N, K) of a weight in the kernel layout; ValueError on any tensor that does not fit it."""
    if (not isinstance(kernel_packed, torch.Tensor) or kernel_packed.dtype != torch.int32 or kernel_packed.dim() != 2
            or kernel_packed.shape[1] % 2):
        raise ValueError(f"kernel_packed must be int32 [K/16, 2N], got {getattr(kernel_packed, 'dtype', None)} "
                         f"{list(getattr(kernel_packed, 'shape', ()))}")
    n, k = kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16
    check_format(n, k, group_size)
    check_kernel_tiles(n, k)
    _check_tensor("kernel_scales", kernel_scales, SCALE_DTYPES, (k // group_size, n), ("kernel_packed", kernel_packed))
    return n, k


def check_scale_values(scales: torch.Tensor, name: str = "scales") -> None:
    """ValueError unless every scale is finite and > 0 (one reduction; a sync on GPUs)."""
    if scales.numel() and not bool(((scales > 0) & torch.isfinite(scales)).all()):
        bad = scales[~((scales > 0) & torch.isfinite(scales))].flatten()[:4].tolist()
        raise ValueError(f"{name} must be finite and > 0, got values such as {bad}")


def check_weight_shape(shape) -> tuple[int, int]:
    """``shape`` as (N, K); ValueError unless it is two ints."""
    if (not isinstance(shape, tuple | list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ValueError(f"shape must be two ints (N, K), got {shape!r}")
    return tuple(shape)


def check_codes_and_scales(codes, scales, group_size: int, check_shape=None) -> tuple[int, int]:
    """(N, K) of int8 ``codes`` [N, K] with ``scales`` [N, K/group_size] float16/bfloat16 on the codes' device,
    finite and > 0; ``check_shape(n, k, group_size)`` checks the format's shape rules (default: INT4's
    :func:`check_format`). ValueError naming the argument otherwise; the code range is the caller's."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int8 tensor, got {getattr(codes, 'dtype', type(codes))} "
                         f"with shape {tuple(getattr(codes, 'shape', ()))}")
    n, k = codes.shape
    (check_shape or check_format)(n, k, group_size)
    _check_tensor("scales", scales, SCALE_DTYPES, (n, k // group_size), ("codes", codes))
    check_scale_values(scales)
    return n, k


@dataclasses.dataclass
class Int4Weight:
    """An INT4 weight [N, K] in the canonical format: ``packed`` int32 [N, K/8], ``scales`` [N, K/group_size].

    ``kernel_packed`` int32 [K/16, 2N] and ``kernel_scales`` [K/group_size, N] are the same weight in the
    CUDA kernel's layout, filled by :func:`repack_for_kernel` (None until then). Construction checks that
    the tensors' dtypes and shapes agree with ``shape`` and ``group_size`` and that all of them are on one
    device (ValueError otherwise); it does not read the values (see :func:`pack_int4`).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 128
    kernel_packed: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    kernel_scales: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.shape = check_weight_shape(self.shape)
        n, k = self.shape
        check_format(n, k, self.group_size)
        _check_tensor("packed", self.packed, (torch.int32,), (n, k // 8))
        _check_tensor("scales", self.scales, SCALE_DTYPES, (n, k // self.group_size), ("packed", self.packed))
        if (self.kernel_packed is None) != (self.kernel_scales is None):
            raise ValueError("kernel_packed and kernel_scales must be given together")
        if self.kernel_packed is not None:
            if check_kernel_layout(self.kernel_packed, self.kernel_scales, self.group_size) != (n, k):
                raise ValueError(f"kernel_packed {list(self.kernel_packed.shape)} does not hold an [{n}, {k}] weight")
            if self.kernel_packed.device != self.packed.device:
                raise ValueError(f"kernel_packed is on {self.kernel_packed.device} but packed is on "
                                 f"{self.packed.device}")

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32."""
        return ref.dequantize_int4_ref(self.packed, self.scales, self.group_size)

    def to(self, device) -> Int4Weight:
        moved = [None if t is None else t.to(device) for t in (self.kernel_packed, self.kernel_scales)]
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.shape, self.group_size, *moved)

    @property
    def nbytes(self) -> int:
        """Bytes of the canonical tensors (packed codes and scales)."""
        return self.packed.numel() * 4 + self.scales.numel() * self.scales.element_size()


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Pack int8 codes [N, K] in [-8, 7] with per-group scales [N, K/group_size] into an :class:`Int4Weight`.

    Raises ValueError naming the argument: codes not 2-D int8 with N, K >= 1 or outside [-8, 7]; K not a
    multiple of 8 and of group_size; group_size not in :data:`GROUP_SIZES`; scales not float16/bfloat16
    [N, K/group_size] on the codes' device, or not finite and > 0.
    """
    n, k = check_codes_and_scales(codes, scales, group_size)
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise ValueError(f"codes must be in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]")
    return Int4Weight(ref.pack_int4_ref(codes), scales.contiguous(), (n, k), group_size)


def unpack_int4(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], scales [N, K/group_size]): the exact inverse of :func:`pack_int4`."""
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    return ref.unpack_int4_ref(weight.packed), weight.scales


def repack_for_kernel(weight: Int4Weight) -> Int4Weight:
    """The weight with ``kernel_packed`` int32 [K/16, 2N] and ``kernel_scales`` [K/group_size, N] filled in.

    Pure PyTorch on the weight's device (CPU or GPU); run it once at load time. Returns a new
    :class:`Int4Weight` sharing the canonical tensors (the same object if it is already repacked).
    Raises ValueError unless N % 64 == 0 and K % 16 == 0.
    """
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    if weight.kernel_packed is not None:
        return weight
    check_kernel_tiles(*weight.shape)
    kernel_packed, kernel_scales = ref.repack_to_kernel_ref(weight.packed, weight.scales)
    return dataclasses.replace(weight, kernel_packed=kernel_packed, kernel_scales=kernel_scales)


def repack_to_canonical(kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """The exact inverse of :func:`repack_for_kernel`: kernel layout -> canonical :class:`Int4Weight`.

    Raises ValueError when the tensors do not fit the kernel layout (:func:`check_kernel_layout`).
    """
    n, k = check_kernel_layout(kernel_packed, kernel_scales, group_size)
    packed, scales = ref.repack_from_kernel_ref(kernel_packed, kernel_scales)
    return Int4Weight(packed, scales, (n, k), group_size, kernel_packed, kernel_scales)


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """Round-to-nearest INT4 with absmax / 7 scales per group (the PTQ baseline).

    weight [N, K] floating, N, K >= 1, finite; scales are stored in ``scale_dtype`` (float16/bfloat16),
    an all-zero group gets the dtype's smallest normal scale. Raises ValueError naming the argument, also
    when a group's absmax / 7 overflows ``scale_dtype``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D floating tensor, got {getattr(weight, 'dtype', type(weight))} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
    n, k = weight.shape
    check_format(n, k, group_size)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    w = weight.float().view(n, k // group_size, group_size)
    absmax = w.abs().amax(-1)
    scales = (absmax / 7).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"weight's largest magnitude {float(absmax.max()):.4g} needs a scale beyond "
                         f"{scale_dtype}'s range")
    codes = torch.round(w / scales.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8).view(n, k)
    return pack_int4(codes, scales, group_size)
