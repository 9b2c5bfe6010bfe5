"""W4A16 GEMM: the Triton split-K kernel vs cuBLAS on the dequantized weight, on the linear layers of
LLaVA-1.5-7B and Qwen2-VL-2B. (The comparison with torch's aten._weight_int4pack_mm that issue 5 asks
for is not here yet: converting our codes to its scale-and-zero layout needs a GPU to validate.)

Effective GB/s counts the bytes a W4A16 GEMM must move: the packed weights and scales, x and y.
Weights rotate through several copies larger than L2 so each call streams them from HBM, as in
decode. TFLOP/s is 2 M N K over the time. On a CPU machine only the reference path runs, at small
sizes, to keep the file exercised; its numbers say nothing about the kernels.
"""

import pytest
import torch
from harness import Report, device, device_name, hardware_limits, time_ms
from shapes import CPU_LINEAR_SHAPES, LINEAR_SHAPES

import grace_kernels as gk
from grace_kernels.testing import make_weight

ON_GPU = torch.cuda.is_available()
MS = [1, 4, 16, 32, 64, 128, 256, 1024, 4096] if ON_GPU else [1, 16]
SHAPES = LINEAR_SHAPES if ON_GPU else CPU_LINEAR_SHAPES
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]
BACKENDS = ["triton", "cublas-dequant"] if ON_GPU else ["reference"]


@pytest.fixture(scope="module")
def report():
    r = Report("w4a16_matmul")
    yield r
    r.finish()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name,n,k", SHAPES)
def test_w4a16(name, n, k, m, dtype, backend, report):
    dev = device()
    scale_dtype = dtype if dtype != torch.float32 else torch.float16
    copies = 8 if ON_GPU else 1   # 8 x (4096 x 11008 / 2 bytes) is well above an H100's 50 MB L2
    weights = [gk.quantize_rtn(make_weight(n, k, seed=i), scale_dtype=scale_dtype).to(dev) for i in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=dtype)
    it = iter(range(10 ** 9))
    if backend == "cublas-dequant":
        dense = [w.dequantize().to(dtype) for w in weights]
        fn = lambda: x @ dense[next(it) % copies].t()  # noqa: E731
    else:
        with gk.use_backend(backend):
            fn = lambda: gk.w4a16_matmul(x, weights[next(it) % copies])  # noqa: E731
            fn()
    with gk.use_backend(backend if backend in ("triton", "reference") else None):
        ms = time_ms(fn, warmup=3, reps=20 if ON_GPU else 3)
    gbytes = (weights[0].nbytes + (m * k + m * n) * x.element_size()) / 1e9
    peak_gbs, peak_tflops = hardware_limits()
    report.add(layer=name, m=m, n=n, k=k, dtype=str(dtype).removeprefix("torch."), backend=backend, ms=ms,
               gb_per_s=gbytes / (ms / 1e3), pct_peak_bw=(100 * gbytes / (ms / 1e3) / peak_gbs) if peak_gbs else None,
               tflops=2 * m * n * k / (ms / 1e3) / 1e12, device=device_name())
