"""W4A16 on a GPU: the Triton and CUDA kernels vs x @ dequant(W) on real model shapes, the dequantize kernel
bit for bit, the large-M crossover under CUDA graphs, and W4A16KernelLinear's memory. Skipped without a GPU
(tests/conftest.py); the tests that need the CUDA extension ask for the ``cuda_ext`` fixture."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.dense_crossover import DENSE_ENV
from grace_kernels.nn import W4A16Linear
from grace_kernels.testing import assert_close_to_gold, make_weight

pytestmark = pytest.mark.gpu


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 1536), (8960, 1536), (1536, 8960), (256, 1536)]

# "cuda" is the fused kernel, "cuda-dense" the large-M path (dequantize kernel + cuBLAS), each forced.
_DENSE_POLICY = {"cuda": "never", "cuda-dense": "always"}


@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda-dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 257, 4096])
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_gpu_parity(m, n, k, dtype, backend, monkeypatch, request):
    """LLaVA-1.5-7B and Qwen2-VL-2B layers: the kernel vs x @ dequant(W) in float32."""
    if backend.startswith("cuda"):
        request.getfixturevalue("cuda_ext")
    w = gk.quantize_rtn(make_weight(n, k, device="cuda"), scale_dtype=dtype)
    if backend.startswith("cuda"):
        w = gk.repack_for_kernel(w)
        monkeypatch.setenv(DENSE_ENV, _DENSE_POLICY[backend])
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    gold = x.float() @ w.dequantize().t()
    lowp = x @ w.dequantize().to(dtype).t()
    with gk.use_backend(backend.removesuffix("-dense")):
        y = gk.w4a16_matmul(x, w)
    assert y.dtype == dtype
    assert_close_to_gold(y.float(), lowp.float(), gold, atol=1e-2, name=f"w4a16[{backend}]")


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_kernel_bias_leading_dims_and_half_blocks(dtype):
    # N = 192 leaves the last 128-column block half empty; M = 2 x 9 rows; bias added in float32.
    w = gk.quantize_rtn(make_weight(192, 1024, device="cuda"), scale_dtype=dtype)
    x = torch.randn(2, 9, 1024, device="cuda", dtype=dtype)
    bias = torch.randn(192, device="cuda", dtype=dtype)
    gold = x.float() @ w.dequantize().t() + bias.float()
    lowp = x @ w.dequantize().to(dtype).t() + bias
    with gk.use_backend("cuda"):
        y = gk.w4a16_matmul(x, w, bias)
    assert y.shape == (2, 9, 192)
    assert_close_to_gold(y.float(), lowp.float(), gold, atol=1e-2, name="w4a16[cuda]")
    for layer in (W4A16Linear.from_int4_weight(w, bias), W4A16Linear.from_int4_weight(w, bias).to_kernel_layout()):
        assert_close_to_gold(layer(x).float(), lowp.float(), gold, atol=1e-2, name=f"{type(layer).__name__}[cuda]")


@pytest.mark.usefixtures("cuda_ext")
def test_gpu_unsupported_shapes_fall_back_or_raise():
    w = gk.quantize_rtn(make_weight(96, 256, device="cuda"))  # N % 64 != 0
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    gold = x.float() @ w.dequantize().t()
    torch.testing.assert_close(gk.w4a16_matmul(x, w).float(), gold, rtol=1e-2, atol=1e-2)  # Triton
    with gk.use_backend("cuda"), pytest.raises(RuntimeError, match="N % 64"):
        gk.w4a16_matmul(x, w)
    w = gk.repack_for_kernel(gk.quantize_rtn(make_weight(64, 256, device="cuda")))
    with pytest.raises(ValueError, match="K % 128"):  # the C++ check, reached only by calling the op directly
        torch.ops.grace_kernels.w4a16_matmul_repacked(x[:, :192].contiguous(), w.kernel_packed[:12], w.kernel_scales,
                                                      128, None)


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (192, 1024)])
def test_gpu_dequantize_kernel_is_bit_exact(n, k, dtype):
    w = gk.repack_for_kernel(gk.quantize_rtn(make_weight(n, k, device="cuda"), scale_dtype=dtype))
    d = torch.ops.grace_kernels.w4a16_dequantize_repacked(w.kernel_packed, w.kernel_scales, 128)
    assert torch.equal(d.view(torch.int16), w.dequantize().to(dtype).view(torch.int16))


@pytest.mark.usefixtures("cuda_ext")
def test_gpu_crossover_measures_then_replays_in_a_cuda_graph():
    """Auto dispatch at M = 512: measured on the first eager call; a CUDA graph captured afterwards bakes the
    measured choice in; a shape first seen while capturing runs the fused kernel, unmeasured."""
    from grace_kernels.ops import w4a16 as ops

    ops.DENSE_CROSSOVER.clear()
    w = gk.repack_for_kernel(gk.quantize_rtn(make_weight(4096, 4096, device="cuda")))
    x = torch.randn(512, 4096, device="cuda", dtype=torch.float16)
    gold = x.float() @ w.dequantize().t()
    lowp = x @ w.dequantize().half().t()
    y = gk.w4a16_matmul(x, w)
    (row,) = ops.DENSE_CROSSOVER.table()
    assert row["m_bucket"] == 512 and row["kernel_ms"] > 0 and row["dense_ms"] > 0, row
    assert_close_to_gold(y.float(), lowp.float(), gold, atol=1e-2, name=f"w4a16[auto:{row['choice']}]")
    x2 = torch.randn(300, 4096, device="cuda", dtype=torch.float16)  # bucket 512 is known; 300 -> 512 too
    x3 = torch.randn(1500, 4096, device="cuda", dtype=torch.float16)  # bucket 2048: unknown while capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y2 = gk.w4a16_matmul(x2, w)
        y3 = gk.w4a16_matmul(x3, w)
    graph.replay()
    torch.cuda.synchronize()
    assert len(ops.DENSE_CROSSOVER.table()) == 1  # nothing was timed during the capture
    for xi, yi in ((x2, y2), (x3, y3)):
        assert_close_to_gold(yi.float(), (xi @ w.dequantize().half().t()).float(), xi.float() @ w.dequantize().t(),
                             atol=1e-2, name="w4a16[graph]")


@pytest.mark.usefixtures("cuda_ext")
def test_gpu_kernel_layout_linear_matches_and_holds_one_copy():
    layer = W4A16Linear.from_linear(torch.nn.Linear(4096, 4096), scale_dtype=torch.float16).cuda()
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    y = layer(x)  # the canonical layer repacks for the kernel on every call
    torch.cuda.synchronize()
    canonical_only = torch.cuda.memory_allocated()
    served = layer.to_kernel_layout()
    del layer
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= canonical_only  # converted once: one copy of the INT4 weight
    assert torch.equal(served(x), y)  # the same kernel on the same bits
