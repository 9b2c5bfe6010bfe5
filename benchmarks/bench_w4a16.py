"""W4A16 GEMM on the linear layers of LLaVA-1.5-7B and Qwen2-VL-2B: our CUDA kernel (csrc/w4a16/) and our
Triton kernel against cuBLAS on the dequantized weight and against torch's own int4 GEMM
(aten._weight_int4pack_mm, bfloat16 only), all timed in the same run so the speedups compare like with like.

Our CUDA paths, each timed on its own: "cuda" the fused kernel, "cuda-dense" the large-M alternative
(our dequantize kernel, then cuBLAS), "cuda-auto" what w4a16_matmul dispatches to (from M >= 128 the
faster of the two, measured at the first call), so the table shows where the crossover falls. On GPUs
every candidate is timed as GPU time per call inside a CUDA graph (harness.time_ms(graph=True)).

Effective GB/s counts the bytes a W4A16 GEMM must move: the packed weights and scales, x and y; "% peak"
compares it with the device's DRAM bandwidth. Weights rotate through several copies larger than L2, so
each call streams them from HBM as in decode (the cuBLAS baseline rotates its dense copies too).
TFLOP/s is 2 M N K over the time. Speedups are the cuBLAS (or int4pack) time over ours.

On a CPU machine only the reference path and torch's dequantize + matmul run, at small sizes, to keep
the file exercised; their numbers say nothing about the kernels, and no results file is written.
"""

import functools

import pytest
import torch
from harness import QUICK, Report, device, device_name, hardware_limits, time_ms
from peers import int4pack_mm, int4pack_weight
from shapes import CPU_LINEAR_SHAPES, LINEAR_SHAPES

import grace_kernels as gk
from grace_kernels import _ext
from grace_kernels.ops import w4a16 as w4a16_ops
from grace_kernels.ops.w4a16 import cuda_kernel_unsupported
from grace_kernels.testing import make_weight

ON_GPU = torch.cuda.is_available()
MS = ([1, 16, 64, 256, 4096] if QUICK else [1, 4, 16, 32, 64, 128, 256, 1024, 4096]) if ON_GPU else [1, 16]
SHAPES = LINEAR_SHAPES if ON_GPU else CPU_LINEAR_SHAPES
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]
OURS = (["cuda", "cuda-dense", "cuda-auto"] if ON_GPU and _ext.C is not None else []) + (
    ["triton"] if ON_GPU else ["reference"])
BASELINE = "cublas-dequant" if ON_GPU else "torch-dequant"
COPIES = 8 if ON_GPU else 1  # 8 x (4096 x 11008 / 2 bytes) is well above an H100's 50 MB L2


@pytest.fixture(scope="module")
def report():
    r = Report("w4a16_matmul")
    yield r
    r.finish()


def _int4pack_fn(weights, x):
    """torch's int4 GEMM (benchmarks/peers.py) on the same codes and scales, or (None, reason) where it does not
    run; the first call is checked against x @ dequant(W) before anything is timed."""
    if not ON_GPU or x.dtype != torch.bfloat16:
        return None, "runs on CUDA with bfloat16 only"
    try:
        packs = [int4pack_weight(w, x.device) for w in weights]
        y = int4pack_mm(x, packs[0], weights[0].group_size)
        gold = x.float() @ weights[0].dequantize().t()
        err = ((y.float() - gold).norm() / gold.norm()).item()
        if not err < 1e-2:
            return None, f"its result differs from x @ dequant(W) (relative error {err:.2e}): format mismatch"
    except (RuntimeError, NotImplementedError) as e:
        return None, f"{type(e).__name__}: {str(e)[:120]}"
    return packs, None


@functools.cache
def _weights(n, k, dtype):
    """COPIES of one RTN-quantized weight (canonical, kernel layout, dense in dtype), built once per shape and
    dtype and shared by every M: the copies only need distinct addresses to rotate through L2."""
    dev = device()
    scale_dtype = dtype if dtype != torch.float32 else torch.float16
    w = gk.quantize_rtn(make_weight(n, k, device=dev), scale_dtype=scale_dtype)
    weights = [gk.Int4Weight(w.packed.clone(), w.scales.clone(), w.shape, w.group_size) for _ in range(COPIES)]
    repacked = [gk.repack_for_kernel(c) for c in weights] if not cuda_kernel_unsupported(n, k, w.group_size, dtype) \
        and ON_GPU else None
    dense = [c.dequantize().to(dtype) for c in weights]
    return weights, repacked, dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name,n,k", SHAPES)
def test_w4a16(name, n, k, m, dtype, report):
    dev = device()
    weights, repacked, dense = _weights(n, k, dtype)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    it = iter(range(10 ** 9))
    fns = {}
    fns[BASELINE] = lambda: x @ dense[next(it) % COPIES].t()
    for backend in OURS:
        if backend.startswith("cuda"):
            if repacked is None:
                continue
            ws = repacked  # repacked once, at load time, as a model would
        else:
            ws = weights
        fns[backend] = _ours(backend, x, ws, it)
    packs, why = _int4pack_fn(weights, x)
    if packs is not None:
        fns["aten-int4pack"] = lambda: int4pack_mm(x, packs[next(it) % COPIES], weights[0].group_size)
    elif ON_GPU:
        print(f"aten._weight_int4pack_mm skipped for {name} m={m} {dtype}: {why}")

    times = {b: time_ms(fn, warmup=3, reps=20 if ON_GPU else 3, graph=ON_GPU) for b, fn in fns.items()}
    gbytes = (weights[0].nbytes + (m * k + m * n) * x.element_size()) / 1e9
    peak_gbs, _ = hardware_limits()
    for backend, ms in times.items():
        report.add(layer=name, m=m, n=n, k=k, dtype=str(dtype).removeprefix("torch."), backend=backend, ms=ms,
                   gb_per_s=gbytes / (ms / 1e3),
                   pct_peak_bw=(100 * gbytes / (ms / 1e3) / peak_gbs) if peak_gbs else None,
                   tflops=2 * m * n * k / (ms / 1e3) / 1e12,
                   speedup_vs_cublas=times[BASELINE] / ms,
                   speedup_vs_int4pack=(times["aten-int4pack"] / ms) if "aten-int4pack" in times else None,
                   device=device_name())


def _ours(backend, x, weights, it):
    if backend in ("cuda", "cuda-dense"):  # one CUDA path on its own, whatever the dispatch would choose
        path = w4a16_ops._cuda_kernel_matmul if backend == "cuda" else w4a16_ops._cuda_dense_matmul

        def one_path():
            w = weights[next(it) % COPIES]
            return path(x, w.kernel_packed, w.kernel_scales, w.group_size, None)

        return one_path

    def fn():
        with gk.use_backend(backend.removesuffix("-auto")):
            return gk.w4a16_matmul(x, weights[next(it) % COPIES])

    return fn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16])
@pytest.mark.parametrize("name,n,k", SHAPES)
def test_w4a16_dequantize(name, n, k, dtype, report):
    """The large-M path's dequantize kernel: bytes moved (int4 weights + scales in, dense weight out) per
    second against the DRAM peak, and against the eager PyTorch dequantization of the same weight."""
    canonical, repacked, _ = _weights(n, k, dtype)
    weights = repacked or [gk.repack_for_kernel(w) for w in canonical]
    it = iter(range(10 ** 9))
    op = torch.ops.grace_kernels.w4a16_dequantize_repacked

    def ours():
        w = weights[next(it) % COPIES]
        return op(w.kernel_packed, w.kernel_scales, w.group_size)

    def eager():
        return weights[next(it) % COPIES].dequantize().to(dtype)

    fns = {"torch-eager": eager}
    if not ON_GPU or _ext.C is not None:
        fns["cuda" if ON_GPU else "reference"] = ours  # on CPU the op runs its reference implementation
    times = {b: time_ms(fn, warmup=2, reps=20 if ON_GPU else 3, graph=ON_GPU) for b, fn in fns.items()}
    gbytes = (weights[0].nbytes + n * k * torch.finfo(dtype).bits // 8) / 1e9
    peak_gbs, _ = hardware_limits()
    for backend, ms in times.items():
        report.add(layer=f"dequantize:{name}", m=0, n=n, k=k, dtype=str(dtype).removeprefix("torch."),
                   backend=backend, ms=ms, gb_per_s=gbytes / (ms / 1e3),
                   pct_peak_bw=(100 * gbytes / (ms / 1e3) / peak_gbs) if peak_gbs else None,
                   speedup_vs_eager=times["torch-eager"] / ms, device=device_name())
