"""INT4 weight-only (W4A16) GEMM and the canonical INT4 weight format.

Format (compressed-tensors "pack-quantized"; what ``grace export`` writes and serving engines load):
    packed  int32 [N, K / 8]     u = q + 8, eight 4-bit values per word, low nibble first along K
    scales  [N, K / group_size]  float16 or bfloat16, symmetric (no zero point)
    W[n, k] = scales[n, k // group_size] * q[n, k],  q in [-8, 7]

Kernel layout (``repack_for_kernel``, converted once at load time, bit-exactly invertible with
``repack_to_canonical``): ``kernel_packed`` int32 [K / 16, 2 N] and ``kernel_scales`` [K / group_size, N],
tiles of 16 x 64 ordered so that one 16-byte load per lane feeds mma.m16n8k16 B fragments, nibbles
interleaved for the lop3 int4-to-half conversion; the bit mapping is in grace_kernels.reference.w4a16.

GEMM: y = x @ W^T (+ bias), x [..., K] float16/bfloat16 with any number of rows M, accumulated in
float32 (split-K partial sums included), returned in x's dtype.

Backends (grace_kernels._backend):
    cuda       the CUDA extension kernel (csrc/w4a16/, op ``grace_kernels::w4a16_matmul_repacked``) on
               CUDA tensors when grace_kernels._C is built and the shape is one it takes: float16/bfloat16
               x, K % 128 == 0, N % 64 == 0, group_size == 128. Other shapes fall back to Triton (a
               layer whose N is not a multiple of 64 can be zero-padded to one to use the CUDA kernel);
               forcing the cuda backend on such a shape raises ValueError naming the rule.
               From M >= DENSE_MIN_M rows the GEMM is bound by math, not by the weight stream, and the
               cuda backend may instead dequantize the weight once (op
               ``grace_kernels::w4a16_dequantize_repacked``, bit-exactly the weight the kernel multiplies)
               and hand x @ W^T to cuBLAS (torch.nn.functional.linear, so its accumulation follows
               torch.backends.cuda.matmul's reduced-precision settings). Which one runs is measured, not
               guessed: the first call of each (device, dtype, N, K, bias, M rounded up to a power of two)
               times both on its own inputs and remembers the faster (see :class:`DenseCrossover`;
               ``GRACE_KERNELS_W4A16_DENSE=auto|never|always`` overrides it).
    triton     a Triton split-K kernel on the canonical layout (CUDA tensors without the extension, and
               CPU tensors under TRITON_INTERPRET=1);
    reference  dequantize, then a float32 matmul (CPU).

Shape rules: K % 8 == 0 and K % group_size == 0 (the format itself); group_size in {32, 64, 128,
256}. Any M and N. Violations raise ValueError naming them.

``w4a16_matmul_repacked`` is the same GEMM on a weight held only in the kernel layout (a served
W4A16Linear after ``use_kernel_layout_``), with no canonical copy on the CUDA path.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
from collections.abc import Callable

import torch

from grace_kernels import _backend
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
    # The CUDA kernel's layout of the same weight, filled by repack_for_kernel (None until then).
    kernel_packed: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    kernel_scales: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

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
        moved = [None if t is None else t.to(device) for t in (self.kernel_packed, self.kernel_scales)]
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.shape, self.group_size, *moved)

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


def _check_kernel_tiles(n: int, k: int) -> None:
    if n % ref.KERNEL_TILE_N or k % ref.KERNEL_TILE_K:
        raise ValueError(f"the kernel layout needs N % {ref.KERNEL_TILE_N} == 0 and K % {ref.KERNEL_TILE_K} == 0, "
                         f"got N = {n}, K = {k} (zero-pad out_features to a multiple of {ref.KERNEL_TILE_N})")


def repack_for_kernel(weight: Int4Weight) -> Int4Weight:
    """The weight with ``kernel_packed`` int32 [K/16, 2N] and ``kernel_scales`` [K/group_size, N] filled in.

    Pure PyTorch on the weight's device (CPU or GPU); run it once at load time. Returns a new
    :class:`Int4Weight` sharing the canonical tensors (the same object if it is already repacked).
    Raises ValueError unless N % 64 == 0 and K % 16 == 0.
    """
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    if weight.kernel_packed is not None and weight.kernel_scales is not None:
        return weight
    _check_kernel_tiles(*weight.shape)
    kernel_packed, kernel_scales = ref.repack_to_kernel_ref(weight.packed, weight.scales)
    return dataclasses.replace(weight, kernel_packed=kernel_packed, kernel_scales=kernel_scales)


def repack_to_canonical(kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """The exact inverse of :func:`repack_for_kernel`: kernel layout -> canonical :class:`Int4Weight`."""
    if kernel_packed.dtype != torch.int32 or kernel_packed.dim() != 2 or kernel_packed.shape[1] % 2:
        raise ValueError(f"kernel_packed must be int32 [K/16, 2N], got {kernel_packed.dtype} "
                         f"{tuple(kernel_packed.shape)}")
    n, k = kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16
    _check_kernel_tiles(n, k)
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide K = {k}, got {group_size}")
    if kernel_scales.dtype not in SCALE_DTYPES or tuple(kernel_scales.shape) != (k // group_size, n):
        raise ValueError(f"kernel_scales must be float16/bfloat16 [{k // group_size}, {n}], got "
                         f"{kernel_scales.dtype} {tuple(kernel_scales.shape)}")
    packed, scales = ref.repack_from_kernel_ref(kernel_packed, kernel_scales)
    return Int4Weight(packed, scales, (n, k), group_size, kernel_packed, kernel_scales)


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


# The CUDA kernel's op: the schema lives here and the CPU implementation is the reference; the extension
# (csrc/torch_bindings.cpp) registers only the CUDA implementation.
torch.library.define(
    "grace_kernels::w4a16_matmul_repacked",
    "(Tensor x, Tensor kernel_packed, Tensor kernel_scales, int group_size, Tensor? bias=None) -> Tensor",
)


@torch.library.impl("grace_kernels::w4a16_matmul_repacked", "cpu")
def _w4a16_repacked_cpu(x, kernel_packed, kernel_scales, group_size, bias=None):
    return ref.w4a16_matmul_repacked_ref(x, kernel_packed, kernel_scales, group_size, bias)


@torch.library.register_fake("grace_kernels::w4a16_matmul_repacked")
def _(x, kernel_packed, kernel_scales, group_size, bias=None):
    torch._check(x.dim() == 2 and kernel_packed.dim() == 2, lambda: "x and kernel_packed must be 2-D")
    torch._check(x.shape[1] == kernel_packed.shape[0] * 16, lambda: "x's K does not match kernel_packed")
    return x.new_empty(x.shape[0], kernel_packed.shape[1] // 2)


# The dense weight for the large-M path: W [N, K] = scale * q in kernel_scales' dtype, rounded once per
# element exactly as the GEMM rounds it (csrc/w4a16/w4a16_dequant.cu registers the CUDA implementation).
torch.library.define(
    "grace_kernels::w4a16_dequantize_repacked",
    "(Tensor kernel_packed, Tensor kernel_scales, int group_size) -> Tensor",
)


@torch.library.impl("grace_kernels::w4a16_dequantize_repacked", "cpu")
def _w4a16_dequantize_repacked_cpu(kernel_packed, kernel_scales, group_size):
    packed, scales = ref.repack_from_kernel_ref(kernel_packed, kernel_scales)
    return ref.dequantize_int4_ref(packed, scales, group_size).to(kernel_scales.dtype)


@torch.library.register_fake("grace_kernels::w4a16_dequantize_repacked")
def _(kernel_packed, kernel_scales, group_size):
    torch._check(kernel_packed.dim() == 2, lambda: "kernel_packed must be 2-D")
    return kernel_scales.new_empty(kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16)


def cuda_kernel_unsupported(n: int, k: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why the CUDA kernel cannot take this GEMM, or None when it can."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 or bfloat16, got {dtype}"
    if k % 128 or n % 64:
        return f"the CUDA kernel needs K % 128 == 0 and N % 64 == 0, got K = {k}, N = {n}"
    if group_size != 128:
        return f"the CUDA kernel needs group_size 128, got {group_size}"
    return None


def _pick_backend(weight: Int4Weight, x: torch.Tensor) -> str:
    backend = select_backend("w4a16_matmul", x.device, has_cuda_impl=True)
    if backend == "cuda":
        why = cuda_kernel_unsupported(*weight.shape, weight.group_size, x.dtype)
        if why is not None:
            if _backend._forced() == "cuda":
                raise ValueError(f"backend 'cuda' was forced but {why}")
            backend = select_backend("w4a16_matmul", x.device, has_cuda_impl=False)
    return backend


DENSE_ENV = "GRACE_KERNELS_W4A16_DENSE"
DENSE_POLICIES = ("auto", "never", "always")
# Below this many rows the fused kernel is not measured against dequantize + cuBLAS: a W4A16 GEMM of up to
# a few dozen rows is bound by the weight stream, which the fused kernel reads at 4 bits and the dense path
# at 16 (after writing them), so it cannot lose there (the targets are 2x or more up to M = 64).
DENSE_MIN_M = 128


def dense_policy() -> str:
    """``GRACE_KERNELS_W4A16_DENSE``: auto (measure, the default), never (fused kernel), always (dense)."""
    name = os.environ.get(DENSE_ENV, "").strip().lower() or "auto"
    if name not in DENSE_POLICIES:
        raise ValueError(f"{DENSE_ENV}={name!r} is not one of {DENSE_POLICIES}")
    return name


def _cuda_time_ms(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, torch.Tensor]:
    """Median of reps timed calls (CUDA events) after one untimed call; returns it and the last output."""
    out = fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


class DenseCrossover:
    """Remembers, per GEMM shape, whether the fused kernel or dequantize + cuBLAS is faster.

    The crossover depends on the GPU, the shape and cuBLAS's own heuristics, so it is measured where it
    is used rather than written down: :meth:`run` times both candidates on the call's own inputs the first
    time a key is seen (a few milliseconds, once per shape and power-of-two bucket of M), remembers the
    winner and returns its output. The dense path must win by ``margin`` (5%) to be chosen, since it
    costs an N x K transient (where that transient does not fit, the fused kernel is kept). While a CUDA
    graph is being captured or torch.compile is tracing nothing can be timed: a known key runs its
    winner, an unknown one the fused kernel (warm a model up eagerly before capturing it to have the
    measured choice baked in).
    """

    def __init__(self, timer: Callable[[Callable[[], torch.Tensor], int], tuple[float, torch.Tensor]] = _cuda_time_ms,
                 reps: int = 5, margin: float = 0.05):
        self.timer, self.reps, self.margin = timer, reps, margin
        self._choices: dict[tuple, str] = {}
        self._times: dict[tuple, dict[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(x: torch.Tensor, n: int, k: int, has_bias: bool) -> tuple:
        m = x.shape[0]
        return (str(x.device), str(x.dtype).removeprefix("torch."), n, k, has_bias, 1 << (m - 1).bit_length())

    def run(self, key: tuple, kernel: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor]) -> torch.Tensor:
        choice = self._choices.get(key)
        if choice is None:
            if _cannot_time():
                return kernel()
            t_kernel, y_kernel = self.timer(kernel, self.reps)
            try:
                t_dense, y_dense = self.timer(dense, self.reps)
            except torch.OutOfMemoryError:  # no room for the N x K transient: the fused kernel needs none
                t_dense, y_dense = float("inf"), None
            choice = "dense" if t_dense < (1 - self.margin) * t_kernel else "kernel"
            with self._lock:
                self._choices[key] = choice
                self._times[key] = {"kernel": t_kernel, "dense": t_dense}
            return y_dense if choice == "dense" else y_kernel
        return dense() if choice == "dense" else kernel()

    def table(self) -> list[dict]:
        """The decisions so far, with the times (ms) they were made on: one row per key."""
        names = ("device", "dtype", "n", "k", "bias", "m_bucket")
        with self._lock:
            return [{**dict(zip(names, key, strict=True)), "choice": choice,
                     **{f"{path}_ms": ms for path, ms in self._times[key].items()}}
                    for key, choice in self._choices.items()]

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()
            self._times.clear()


def _cannot_time() -> bool:
    # A capture needs an initialised CUDA context; asking without one would create it (or fail on CPU hosts).
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


DENSE_CROSSOVER = DenseCrossover()


def _cuda_kernel_matmul(x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                        bias: torch.Tensor | None) -> torch.Tensor:
    if x2d.data_ptr() % 16:  # the kernel copies rows with 16-byte cp.async
        x2d = x2d.clone()
    bias32 = None if bias is None else bias.float().contiguous()
    return torch.ops.grace_kernels.w4a16_matmul_repacked(x2d, kernel_packed, kernel_scales.to(x2d.dtype), group_size,
                                                         bias32)


def _cuda_dense_matmul(x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    dense = torch.ops.grace_kernels.w4a16_dequantize_repacked(kernel_packed, kernel_scales.to(x2d.dtype), group_size)
    return torch.nn.functional.linear(x2d, dense, None if bias is None else bias.to(x2d.dtype))


def _cuda_matmul(x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    args = (x2d, kernel_packed, kernel_scales, group_size, bias)
    policy = dense_policy()
    if policy == "always":
        return _cuda_dense_matmul(*args)
    if policy == "never" or x2d.shape[0] < DENSE_MIN_M:
        return _cuda_kernel_matmul(*args)
    n, k = kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16
    return DENSE_CROSSOVER.run(DenseCrossover.key(x2d, n, k, bias is not None),
                               lambda: _cuda_kernel_matmul(*args), lambda: _cuda_dense_matmul(*args))


def _check_x_bias(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, device: torch.device) -> None:
    if not x.is_floating_point() or x.shape[-1] != k:
        raise ValueError(f"x must be floating with last dimension K = {k}, got {x.dtype} {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")


def w4a16_matmul_repacked(x: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor,
                          bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """:func:`w4a16_matmul` on a weight held only in the CUDA kernel's layout (what a served
    W4A16Linear keeps, see ``W4A16Linear.use_kernel_layout_``): no canonical copy is needed on the CUDA
    path. Elsewhere (CPU, or a GPU without the extension) the canonical weight is rebuilt for the call.

    Args: x [..., K]; kernel_packed int32 [K/16, 2N]; kernel_scales [K/group_size, N]; bias [N] or None.
    """
    if kernel_packed.dtype != torch.int32 or kernel_packed.dim() != 2 or kernel_packed.shape[1] % 2:
        raise ValueError(f"kernel_packed must be int32 [K/16, 2N], got {kernel_packed.dtype} "
                         f"{tuple(kernel_packed.shape)}")
    n, k = kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16
    _check_x_bias(x, n, k, bias, kernel_packed.device)
    if (kernel_packed.device.type == "cuda" and cuda_kernel_unsupported(n, k, group_size, x.dtype) is None
            and select_backend("w4a16_matmul", x.device, has_cuda_impl=True) == "cuda"):
        if kernel_scales.dtype not in SCALE_DTYPES or tuple(kernel_scales.shape) != (k // group_size, n):
            raise ValueError(f"kernel_scales must be float16/bfloat16 [{k // group_size}, {n}], got "
                             f"{kernel_scales.dtype} {tuple(kernel_scales.shape)}")
        y = _cuda_matmul(x.reshape(-1, k).contiguous(), kernel_packed, kernel_scales, group_size, bias)
        return y.reshape(*x.shape[:-1], n)
    return w4a16_matmul(x, repack_to_canonical(kernel_packed, kernel_scales, group_size), bias)


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), float32 accumulation, in x's dtype.

    Args:
        x: [..., K] float16/bfloat16 (float32 runs on the Triton/reference paths only).
        weight: an :class:`Int4Weight` [N, K]; on the CUDA path its kernel layout is used, computed here
            on every call when absent (call :func:`repack_for_kernel` once at load time instead;
            W4A16Linear caches it). From M >= DENSE_MIN_M rows the CUDA path may run dequantize + cuBLAS
            instead of the fused kernel, where measured faster (module docstring).
        bias: [N] or None, added in float32 before the final rounding.

    Returns [..., N] in x's dtype. Raises ValueError on mismatched shapes or devices.
    """
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    _check_x_bias(x, n, k, bias, weight.packed.device)
    x2d = x.reshape(-1, k).contiguous()
    if _pick_backend(weight, x2d) == "cuda":
        w = repack_for_kernel(weight)
        return _cuda_matmul(x2d, w.kernel_packed, w.kernel_scales, w.group_size, bias).reshape(*x.shape[:-1], n)
    y = _w4a16_op(x2d, weight.packed, weight.scales, weight.group_size)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
