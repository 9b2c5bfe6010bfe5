"""INT4 weight-only (W4A16) GEMM: y = x @ W^T (+ bias), W an INT4 weight (grace_kernels.int4).

x [..., K] float16/bfloat16 with any number of rows M (float32 on the Triton and reference paths only),
accumulated in float32 (split-K partial sums included), returned in x's dtype. The weight format, its
checks and the repacking live in :mod:`grace_kernels.int4`; this module holds the op schemas, their fake
and per-device implementations, and the two entry points, which share one dispatch:

    w4a16_matmul(x, weight: Int4Weight, bias)                       the canonical weight (kernel layout optional)
    w4a16_matmul_repacked(x, kernel_packed, kernel_scales, bias)    a weight held only in the kernel layout

Backends (grace_kernels._backend):
    cuda       the CUDA extension kernel (csrc/w4a16/, op ``grace_kernels::w4a16_matmul_repacked``) on
               CUDA tensors when grace_kernels._C is built and the shape is one it takes
               (:func:`cuda_kernel_unsupported`: float16/bfloat16 x, K % 128 == 0, N % 64 == 0,
               group_size == 128). Other shapes fall back to Triton (a layer whose N is not a multiple of 64
               can be zero-padded to one to use the CUDA kernel); forcing the cuda backend on such a shape
               raises RuntimeError naming the rule. From M >= DENSE_MIN_M rows the cuda backend may instead
               dequantize the weight once (op ``grace_kernels::w4a16_dequantize_repacked``, bit-exactly the
               weight the kernel multiplies) and hand x @ W^T to cuBLAS (torch.nn.functional.linear, so its
               accumulation follows torch.backends.cuda.matmul's reduced-precision settings), where measured
               faster (grace_kernels.dense_crossover; ``GRACE_KERNELS_W4A16_DENSE=auto|never|always``).
    triton     a Triton split-K kernel on the canonical layout (CUDA tensors without the extension, and
               CPU tensors under TRITON_INTERPRET=1): op ``grace_kernels::w4a16_matmul``;
    reference  dequantize, then a float32 matmul: the same op's CPU path.

Shape rules: those of the format (K % 8 == 0, K % group_size == 0, group_size in {32, 64, 128, 256}).
Any M and N. Violations raise ValueError naming them.
"""

from __future__ import annotations

import torch

from grace_kernels._backend import select_backend
from grace_kernels.dense_crossover import DenseCrossover
from grace_kernels.int4 import Int4Weight, check_kernel_layout, repack_for_kernel, repack_to_canonical
from grace_kernels.reference import w4a16 as ref

# ------------------------------------------------------------------------------------------ op schemas
# Schemas are defined here; each backend registers its implementation per device: the Triton kernel and the
# reference below, the CUDA kernels in the extension (csrc/torch_bindings.cpp, TORCH_LIBRARY_IMPL ... CUDA).

# The canonical-layout GEMM: x [M, K] -> float32 [M, N] (the caller adds bias and casts).
torch.library.define("grace_kernels::w4a16_matmul",
                     "(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor")
# The CUDA kernel's GEMM on the kernel layout: x [M, K] -> [M, N] in x's dtype, bias float32 [N] or None.
torch.library.define(
    "grace_kernels::w4a16_matmul_repacked",
    "(Tensor x, Tensor kernel_packed, Tensor kernel_scales, int group_size, Tensor? bias=None) -> Tensor",
)
# The dense weight for the large-M path: W [N, K] = scale * q in kernel_scales' dtype, rounded once per
# element exactly as the GEMM rounds it.
torch.library.define(
    "grace_kernels::w4a16_dequantize_repacked",
    "(Tensor kernel_packed, Tensor kernel_scales, int group_size) -> Tensor",
)


def canonical_backend(op: str, device: torch.device | str) -> str:
    """The backend of the canonical-layout GEMMs (``w4a16_matmul``'s non-CUDA path, ``w8a16_matmul``, zero
    points included): no CUDA-extension kernel reads that layout, so ``triton`` on CUDA tensors (and on CPU
    under TRITON_INTERPRET=1), else ``reference``. Raises RuntimeError as :func:`select_backend`."""
    return select_backend(op, device)


def w4a16_backend(device: torch.device | str, cuda_unsupported: str | None = None) -> str:
    """The backend :func:`w4a16_matmul` runs on for tensors on ``device``: ``cuda`` (the extension's kernel)
    where it is built for the device and takes the shape (``cuda_unsupported`` None), else as
    :func:`canonical_backend`. Raises RuntimeError as :func:`select_backend`."""
    return select_backend("w4a16_matmul", device, has_cuda_impl=True, cuda_unsupported=cuda_unsupported)


def wna16_impl(op: str, bits: int, x, packed, scales, group_size: int, zero_points=None) -> torch.Tensor:
    """The implementation of the canonical-layout GEMM of both code widths (w4a16_matmul, w8a16_matmul), with
    optional packed zero points (int32 [ceil(N * bits / 32), groups]; only the w8a16 op takes them).

    CUDA: the Triton kernel (no CUDA-extension kernel reads this layout or zero points); CPU: the reference,
    or the Triton kernel under TRITON_INTERPRET=1. A forced backend wins on either device (select_backend
    raises where it cannot run)."""
    if canonical_backend(op, x.device) == "triton":
        from grace_kernels.triton import w4a16 as tri

        return tri.wna16_matmul(x, packed, scales.to(x.dtype), group_size, bits=bits, zero_points=zero_points)
    return x.float() @ ref.dequantize_codes(packed, scales, group_size, bits=bits, zero_points=zero_points).t()


def wna16_fake(bits: int, x, packed, scales=None, zero_points=None) -> torch.Tensor:
    """The fake implementation of both widths: float32 [M, N] (shape checks of x, packed, zero_points)."""
    torch._check(x.dim() == 2 and packed.dim() == 2, lambda: "x and packed must be 2-D")
    torch._check(x.shape[1] == packed.shape[1] * (32 // bits), lambda: "x's K does not match packed")
    if zero_points is not None:
        words = ref.zero_point_words(packed.shape[0], bits=bits)
        torch._check(zero_points.dim() == 2 and zero_points.shape[0] == words
                     and zero_points.shape[1] == scales.shape[1],
                     lambda: f"zero_points must be [{words}, groups], got {tuple(zero_points.shape)}")
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


@torch.library.impl("grace_kernels::w4a16_matmul", ("cpu", "cuda"))
def _w4a16_matmul_impl(x, packed, scales, group_size):
    return wna16_impl("w4a16_matmul", 4, x, packed, scales, group_size)


@torch.library.register_fake("grace_kernels::w4a16_matmul")
def _(x, packed, scales, group_size):
    return wna16_fake(4, x, packed)


@torch.library.impl("grace_kernels::w4a16_matmul_repacked", "cpu")
def _w4a16_matmul_repacked_cpu(x, kernel_packed, kernel_scales, group_size, bias=None):
    return ref.w4a16_matmul_repacked_ref(x, kernel_packed, kernel_scales, group_size, bias)


@torch.library.register_fake("grace_kernels::w4a16_matmul_repacked")
def _(x, kernel_packed, kernel_scales, group_size, bias=None):
    torch._check(x.dim() == 2 and kernel_packed.dim() == 2, lambda: "x and kernel_packed must be 2-D")
    torch._check(x.shape[1] == kernel_packed.shape[0] * 16, lambda: "x's K does not match kernel_packed")
    return x.new_empty(x.shape[0], kernel_packed.shape[1] // 2)


@torch.library.impl("grace_kernels::w4a16_dequantize_repacked", "cpu")
def _w4a16_dequantize_repacked_cpu(kernel_packed, kernel_scales, group_size):
    packed, scales = ref.repack_from_kernel_ref(kernel_packed, kernel_scales)
    return ref.dequantize_int4_ref(packed, scales, group_size).to(kernel_scales.dtype)


@torch.library.register_fake("grace_kernels::w4a16_dequantize_repacked")
def _(kernel_packed, kernel_scales, group_size):
    torch._check(kernel_packed.dim() == 2, lambda: "kernel_packed must be 2-D")
    return kernel_scales.new_empty(kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16)


# ------------------------------------------------------------------------------------------ dispatch


def cuda_kernel_unsupported(n: int, k: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why the CUDA kernel cannot take this GEMM, or None when it can."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 or bfloat16, got {dtype}"
    if k % 128 or n % 64:
        return f"the CUDA kernel needs K % 128 == 0 and N % 64 == 0, got K = {k}, N = {n}"
    if group_size != 128:
        return f"the CUDA kernel needs group_size 128, got {group_size}"
    return None


def _cuda_kernel_matmul(x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The fused CUDA kernel: x2d [M, K] -> [M, N] in x2d's dtype."""
    # The kernel copies rows with 16-byte cp.async. A traced graph (torch.compile) has no addresses to test:
    # there the copy is always made; inductor fuses it into the producer, and its buffers are 16-byte aligned.
    if torch.compiler.is_compiling() or x2d.data_ptr() % 16:
        x2d = x2d.clone()
    bias32 = None if bias is None else bias.float().contiguous()
    return torch.ops.grace_kernels.w4a16_matmul_repacked(x2d, kernel_packed, kernel_scales.to(x2d.dtype), group_size,
                                                         bias32)


def _cuda_dense_matmul(x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The large-M alternative: the dequantize kernel, then cuBLAS."""
    dense = torch.ops.grace_kernels.w4a16_dequantize_repacked(kernel_packed, kernel_scales.to(x2d.dtype), group_size)
    return torch.nn.functional.linear(x2d, dense, None if bias is None else bias.to(x2d.dtype))


# The cuda backend's GEMM: the fused kernel, or from DENSE_MIN_M rows the measured faster of it and dense.
DENSE_CROSSOVER = DenseCrossover(_cuda_kernel_matmul, _cuda_dense_matmul)


def _check_x_bias(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be floating with last dimension K = {k}, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")


def _matmul(x: torch.Tensor, n: int, k: int, group_size: int, bias: torch.Tensor | None, device: torch.device,
            canonical, kernel) -> torch.Tensor:
    """The one dispatch of both entry points. ``canonical()`` -> (packed, scales) and ``kernel()`` ->
    (kernel_packed, kernel_scales) give the weight in the layout the chosen backend reads; only that one
    is called."""
    _check_x_bias(x, n, k, bias, device)
    x2d = x.reshape(-1, k).contiguous()
    backend = w4a16_backend(x2d.device, cuda_kernel_unsupported(n, k, group_size, x2d.dtype))
    if backend == "cuda":
        y = DENSE_CROSSOVER(x2d, *kernel(), group_size, bias)
    else:
        y = torch.ops.grace_kernels.w4a16_matmul(x2d, *canonical(), group_size)
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), float32 accumulation, in x's dtype.

    Args:
        x: [..., K] float16/bfloat16 (float32 runs on the Triton/reference paths only).
        weight: an :class:`Int4Weight` [N, K]; on the CUDA path its kernel layout is used, computed here
            on every call when absent (call :func:`repack_for_kernel` once at load time instead, or serve
            a ``W4A16KernelLinear``). From M >= DENSE_MIN_M rows the CUDA path may run dequantize + cuBLAS
            instead of the fused kernel, where measured faster (module docstring).
        bias: [N] or None, added in float32 before the final rounding.

    Returns [..., N] in x's dtype. Raises ValueError on mismatched shapes or devices, RuntimeError when a
    forced backend cannot run the call.
    """
    if not isinstance(weight, Int4Weight):
        raise ValueError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    n, k = weight.shape

    def kernel():
        w = repack_for_kernel(weight)
        return w.kernel_packed, w.kernel_scales

    return _matmul(x, n, k, weight.group_size, bias, weight.packed.device,
                   lambda: (weight.packed, weight.scales), kernel)


def w4a16_matmul_repacked(x: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor,
                          bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """:func:`w4a16_matmul` on a weight held only in the CUDA kernel's layout (what a ``W4A16KernelLinear``
    keeps): no canonical copy is needed on the CUDA path. Elsewhere (CPU, or a GPU without the extension)
    the canonical weight is rebuilt for the call.

    Args: x [..., K]; kernel_packed int32 [K/16, 2N]; kernel_scales [K/group_size, N] float16/bfloat16;
    bias [N] or None. Raises as :func:`w4a16_matmul`, and ValueError when the weight does not fit the kernel
    layout.
    """
    n, k = check_kernel_layout(kernel_packed, kernel_scales, group_size)

    def canonical():
        w = repack_to_canonical(kernel_packed, kernel_scales, group_size)
        return w.packed, w.scales

    return _matmul(x, n, k, group_size, bias, kernel_packed.device, canonical, lambda: (kernel_packed, kernel_scales))
