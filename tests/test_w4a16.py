"""W4A16: packing and the kernel repack bit-exactly, the Triton split-K kernel and (on GPUs) the CUDA kernel
vs x @ dequant(W), the repacked op's CPU path, and W4A16Linear. The CUDA kernel's layout logic is proved
on CPU in test_w4a16_layout.py."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels import _ext
from grace_kernels.nn import QuantLinear, W4A16Linear
from grace_kernels.ops.w4a16 import cuda_kernel_unsupported
from grace_kernels.testing import assert_close_to_gold, make_weight, sqnr


def _codes(n, k, seed=0):
    return torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_pack_unpack_round_trip_is_bit_exact():
    codes = _codes(37, 384)
    scales = torch.rand(37, 3).half() + 0.01
    w = gk.pack_int4(codes, scales)
    assert w.packed.dtype == torch.int32 and w.packed.shape == (37, 48) and w.shape == (37, 384)
    c2, s2 = gk.unpack_int4(w)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)
    assert torch.equal(gk.pack_int4(c2, s2).packed, w.packed)


def test_canonical_nibble_order_by_hand():
    # u = q + 8, low nibble first along K: codes [-8, -7, 0, 1, 2, 3, 6, 7] -> u = [0, 1, 8, 9, 10, 11, 14, 15]
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7] * 4], dtype=torch.int8)
    w = gk.pack_int4(codes, torch.ones(1, 1, dtype=torch.float16), group_size=32)
    assert (w.packed[0, 0].item() & 0xFFFFFFFF) == 0xFEBA9810
    deq = w.dequantize()
    assert torch.equal(deq, codes.float())


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,gs", [(64, 128, 128), (192, 512, 128), (128, 256, 32), (64, 512, 256)])
def test_repack_for_kernel_round_trip_is_bit_exact(n, k, gs, scale_dtype):
    scales = (torch.rand(n, k // gs) + 0.01).to(scale_dtype)
    w = gk.repack_for_kernel(gk.pack_int4(_codes(n, k, seed=n + k), scales, group_size=gs))
    assert w.kernel_packed.dtype == torch.int32 and w.kernel_packed.shape == (k // 16, 2 * n)
    assert w.kernel_scales.dtype == scale_dtype and w.kernel_scales.shape == (k // gs, n)
    back = gk.repack_to_canonical(w.kernel_packed, w.kernel_scales, gs)
    assert torch.equal(back.packed, w.packed) and torch.equal(back.scales, w.scales) and back.shape == (n, k)
    assert gk.repack_for_kernel(w) is w  # already repacked: nothing recomputed
    moved = w.to("cpu")
    assert torch.equal(moved.kernel_packed, w.kernel_packed) and torch.equal(moved.kernel_scales, w.kernel_scales)


def test_repack_for_kernel_bits_by_hand():
    # Lane 0 (groupID 0, threadID 0) of tile (0, 0), word 0: nibbles (0, 4) = B[k 0, 1][n 0] of sub-tile 0,
    # (1, 5) = B[k 8, 9][n 0], (2, 6) = the same k of sub-tile 1 (n 8). Lane 5 (g 1, t 1) word 3 holds
    # sub-tiles 6 and 7 at n = 49, 57 and k = 2, 3, 10, 11.
    codes = torch.zeros(64, 128, dtype=torch.int8)
    for i, (nn, kk) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8), (0, 1), (0, 9), (8, 1), (8, 9)]):
        codes[nn, kk] = i - 8  # u = i at nibble i
    for i, (nn, kk) in enumerate([(49, 2), (49, 10), (57, 2), (57, 10), (49, 3), (49, 11), (57, 3), (57, 11)]):
        codes[nn, kk] = 7 - i  # u = 15 - i at nibble i
    w = gk.repack_for_kernel(gk.pack_int4(codes, torch.ones(64, 1, dtype=torch.float16)))
    assert (w.kernel_packed[0, 0].item() & 0xFFFFFFFF) == 0x76543210
    assert (w.kernel_packed[0, 5 * 4 + 3].item() & 0xFFFFFFFF) == 0x89ABCDEF
    perm = w.kernel_scales.new_tensor(range(64)).view(1, 64)
    assert torch.equal(gk.repack_to_canonical(w.kernel_packed, perm).scales[:, 0].view(8, 8),
                       perm.view(8, 8).t())  # position 8 g + j of the kernel scales holds column 8 j + g


@pytest.mark.parametrize("call,match", [
    (lambda: gk.repack_for_kernel(gk.pack_int4(_codes(40, 128), torch.ones(40, 1, dtype=torch.float16))), "N % 64"),
    (lambda: gk.repack_for_kernel("w"), "Int4Weight"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128, dtype=torch.int32), torch.ones(1, 64)), "kernel_scales"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128), torch.ones(1, 64, dtype=torch.float16)), "int32"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128, dtype=torch.int32), torch.ones(1, 64, dtype=torch.float16),
                                    group_size=256), "group_size"),
])
def test_repack_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cuda_kernel_shape_rules():
    assert cuda_kernel_unsupported(4096, 11008, 128, torch.bfloat16) is None
    assert "K % 128" in cuda_kernel_unsupported(4096, 4032, 64, torch.float16)
    assert "N % 64" in cuda_kernel_unsupported(96, 4096, 128, torch.float16)
    assert "group_size 128" in cuda_kernel_unsupported(64, 4096, 64, torch.float16)
    assert "float16 or bfloat16" in cuda_kernel_unsupported(64, 4096, 128, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repacked_op_cpu_matches_reference(dtype):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(128, 256), torch.rand(128, 2).to(dtype) * 0.1))
    x = torch.randn(5, 256).to(dtype)
    bias = torch.randn(128)
    y = torch.ops.grace_kernels.w4a16_matmul_repacked(x, w.kernel_packed, w.kernel_scales, 128, bias)
    assert y.dtype == dtype and torch.equal(y, (x.float() @ w.dequantize().t() + bias).to(dtype))


def test_opcheck_repacked_op():
    w = gk.repack_for_kernel(gk.pack_int4(_codes(64, 128), torch.full((64, 1), 0.1, dtype=torch.float16)))
    x = torch.randn(3, 128, dtype=torch.float16)
    for bias in (None, torch.randn(64)):
        torch.library.opcheck(torch.ops.grace_kernels.w4a16_matmul_repacked.default,
                              (x, w.kernel_packed, w.kernel_scales, 128, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_op_cpu_is_the_rounded_reference(dtype):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(192, 384), (torch.rand(192, 3) * 0.1 + 1e-3).to(dtype)))
    d = torch.ops.grace_kernels.w4a16_dequantize_repacked(w.kernel_packed, w.kernel_scales, 128)
    assert d.dtype == dtype and d.shape == (192, 384)
    assert torch.equal(d, w.dequantize().to(dtype))
    torch.library.opcheck(torch.ops.grace_kernels.w4a16_dequantize_repacked.default,
                          (w.kernel_packed, w.kernel_scales, 128))


# --- large M on the CUDA backend: fused kernel or dequantize + cuBLAS, by measurement (DenseCrossover).
# The two paths are the ops above, whose CPU implementations let the dispatch run here on CPU tensors.

class _FakeTimer:
    """Stands in for CUDA-event timing: runs the candidate once, reports the given milliseconds for the path
    it took (the last entry of ``calls``) and records what it timed."""

    def __init__(self, calls, kernel_ms, dense_ms):
        self.calls, self.ms, self.timed = calls, {"kernel": kernel_ms, "dense": dense_ms}, []

    def __call__(self, fn, reps):
        out = fn()
        self.timed.append(self.calls[-1])
        return self.ms[self.calls[-1]], out


def _dispatch(ops, x, w, b):
    """The CUDA backend's choice between the fused kernel and dequantize + dense GEMM, on CPU tensors."""
    return ops._cuda_matmul(x, w.kernel_packed, w.kernel_scales, w.group_size, b)


def _crossover_case(monkeypatch, kernel_ms, dense_ms, m=256, bias=True):
    from grace_kernels.ops import w4a16 as ops

    calls = []
    for path, real in (("kernel", ops._cuda_kernel_matmul), ("dense", ops._cuda_dense_matmul)):
        def traced(*args, real=real, path=path):
            calls.append(path)
            return real(*args)
        monkeypatch.setattr(ops, f"_cuda_{path}_matmul", traced)
    timer = _FakeTimer(calls, kernel_ms, dense_ms)
    crossover = ops.DenseCrossover(timer=timer)
    monkeypatch.setattr(ops, "DENSE_CROSSOVER", crossover)
    w = gk.repack_for_kernel(gk.pack_int4(_codes(128, 256), (torch.rand(128, 2) * 0.05 + 1e-3).half()))
    x = torch.randn(m, 256).half()
    b = torch.randn(128) if bias else None
    return ops, crossover, timer, calls, w, x, b


@pytest.mark.parametrize("kernel_ms,dense_ms,winner", [(1.0, 0.5, "dense"), (1.0, 0.97, "kernel"),
                                                      (0.4, 0.9, "kernel")])
def test_crossover_measures_once_and_keeps_the_faster(monkeypatch, kernel_ms, dense_ms, winner):
    ops, crossover, timer, calls, w, x, b = _crossover_case(monkeypatch, kernel_ms, dense_ms)
    gold = x.float() @ w.dequantize().t() + b
    for _ in range(3):
        y = _dispatch(ops, x, w, b)
        # Either path is x @ W^T: the CPU implementations round W to float16 (dense) or keep it exact.
        torch.testing.assert_close(y.float(), gold, rtol=2e-2, atol=2e-2)
    assert timer.timed == ["kernel", "dense"]  # measured on the first call only
    assert calls == ["kernel", "dense", winner, winner]
    (row,) = crossover.table()
    assert row["choice"] == winner and row["m_bucket"] == 256 and row["n"] == 128 and row["k"] == 256
    assert (row["kernel_ms"], row["dense_ms"]) == (kernel_ms, dense_ms)


def test_crossover_keys_on_m_bucket_and_bias(monkeypatch):
    ops, crossover, timer, calls, w, x, b = _crossover_case(monkeypatch, 1.0, 0.5, m=200)
    _dispatch(ops, x, w, b)
    _dispatch(ops, x[:129], w, b)  # same bucket (256): no new measurement
    _dispatch(ops, x[:128], w, b)  # bucket 128
    _dispatch(ops, x, w, None)  # without bias
    assert [r["m_bucket"] for r in crossover.table()] == [256, 128, 256]
    assert len(timer.timed) == 6


def test_small_m_and_policies_skip_the_measurement(monkeypatch):
    ops, crossover, timer, calls, w, x, b = _crossover_case(monkeypatch, 1.0, 0.1)
    _dispatch(ops, x[: ops.DENSE_MIN_M - 1], w, b)
    monkeypatch.setenv(ops.DENSE_ENV, "never")
    _dispatch(ops, x, w, b)
    monkeypatch.setenv(ops.DENSE_ENV, "always")
    _dispatch(ops, x[:3], w, b)
    assert calls == ["kernel", "kernel", "dense"] and timer.timed == [] and crossover.table() == []
    monkeypatch.setenv(ops.DENSE_ENV, "fastest")
    with pytest.raises(ValueError, match="GRACE_KERNELS_W4A16_DENSE"):
        _dispatch(ops, x, w, b)


def test_crossover_keeps_the_kernel_when_the_dense_weight_does_not_fit(monkeypatch):
    ops, crossover, timer, calls, w, x, b = _crossover_case(monkeypatch, 1.0, 0.1)

    def oom(*args):
        raise torch.OutOfMemoryError("no room for the dense weight")

    monkeypatch.setattr(ops, "_cuda_dense_matmul", oom)
    y = _dispatch(ops, x, w, b)
    torch.testing.assert_close(y.float(), x.float() @ w.dequantize().t() + b, rtol=2e-2, atol=2e-2)
    (row,) = crossover.table()
    assert row["choice"] == "kernel" and row["dense_ms"] == float("inf")
    _dispatch(ops, x, w, b)
    assert calls == ["kernel", "kernel"]


def test_crossover_does_not_time_while_capturing(monkeypatch):
    ops, crossover, timer, calls, w, x, b = _crossover_case(monkeypatch, 1.0, 0.5)
    monkeypatch.setattr(ops, "_cannot_time", lambda: True)
    _dispatch(ops, x, w, b)
    assert calls == ["kernel"] and timer.timed == [] and crossover.table() == []
    monkeypatch.setattr(ops, "_cannot_time", lambda: False)
    _dispatch(ops, x, w, b)  # measured now: dense wins
    monkeypatch.setattr(ops, "_cannot_time", lambda: True)
    _dispatch(ops, x, w, b)  # a known key runs its winner even while capturing
    assert calls == ["kernel", "kernel", "dense", "dense"]


def test_linear_kernel_weight_is_cached_until_the_buffers_change():
    layer = W4A16Linear.from_linear(torch.nn.Linear(128, 64))
    kw = layer.kernel_weight()
    assert layer.kernel_weight() is kw
    other = W4A16Linear.from_linear(torch.nn.Linear(128, 64))
    layer.load_state_dict(other.state_dict())
    kw2 = layer.kernel_weight()
    assert kw2 is not kw and torch.equal(kw2.kernel_packed, other.kernel_weight().kernel_packed)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,gs", [(1, 64, 256, 128), (3, 96, 512, 128), (17, 64, 256, 64), (5, 40, 128, 32)])
def test_triton_matches_dequantized_matmul(m, n, k, gs, dtype):
    g = torch.Generator().manual_seed(1)
    w = gk.pack_int4(_codes(n, k), (torch.rand(n, k // gs, generator=g) * 0.02 + 1e-3).to(dtype), group_size=gs)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    gold = x.double() @ w.dequantize().double().t() + bias.double()
    lowp = (x @ w.dequantize().to(dtype).t() + bias)  # the same GEMM done by torch in dtype
    with gk.use_backend("triton"):
        y_t = gk.w4a16_matmul(x, w, bias)
    with gk.use_backend("reference"):
        y_r = gk.w4a16_matmul(x, w, bias)
    assert y_t.dtype == dtype and y_t.shape == (m, n)
    assert_close_to_gold(y_t.double(), lowp.double(), gold, atol=1e-3, name="triton")
    assert_close_to_gold(y_r.double(), lowp.double(), gold, atol=1e-3, name="reference")


def test_leading_dims_and_split_k_sum():
    w = gk.pack_int4(_codes(64, 1024), torch.full((64, 8), 0.01, dtype=torch.float16))
    x = torch.randn(2, 3, 1024, dtype=torch.float16)
    with gk.use_backend("triton"):
        y = gk.w4a16_matmul(x, w)   # M = 6, N = 64: one tile, K split across programs
    ref_y = (x.float() @ w.dequantize().t()).half()
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y, ref_y, rtol=2e-3, atol=2e-3)


def test_from_linear_is_rtn_absmax():
    lin = torch.nn.Linear(256, 24)
    layer = W4A16Linear.from_linear(lin)
    codes, scales = gk.unpack_int4(layer.int4_weight)
    w = lin.weight.detach().view(24, 2, 128)
    torch.testing.assert_close(scales.float(), (w.abs().amax(-1) / 7).half().float())
    expect = torch.round(w / scales.float().unsqueeze(-1)).clamp(-8, 7).view(24, 256)
    assert torch.equal(codes.float(), expect)
    assert sqnr(layer.int4_weight.dequantize(), lin.weight.detach()) > 15  # INT4 keeps most of the signal


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_from_quant_linear_matches_the_trained_quant_linear(scale_dtype, reference_backend):
    q = QuantLinear.from_linear(torch.nn.Linear(256, 40), scale_dtype=scale_dtype)
    with torch.no_grad():
        q.log_scale.add_(0.05 * torch.randn_like(q.log_scale))  # as if trained
    layer = W4A16Linear.from_quant_linear(q)
    # The stored weights are exactly the fake-quantized ones.
    assert torch.equal(layer.int4_weight.dequantize(), q.fake_quant_weight().float())
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), q(x).detach(), rtol=1e-5, atol=1e-5)  # float32: matmul rounding only
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(layer(xb).float(), q(x).detach(), rtol=2e-2, atol=2e-2)


def test_state_dict_uses_compressed_tensors_names_and_round_trips():
    layer = W4A16Linear.from_linear(torch.nn.Linear(128, 16))
    sd = layer.state_dict()
    assert sd["weight_packed"].dtype == torch.int32 and sd["weight_packed"].shape == (16, 16)
    assert sd["weight_scale"].shape == (16, 1) and sd["weight_shape"].tolist() == [16, 128]
    other = W4A16Linear(128, 16, bias_dtype=torch.float32)
    other.load_state_dict(sd)
    x = torch.randn(2, 128)
    assert torch.equal(other(x), layer(x))


def test_kernel_layout_holds_one_copy_and_keeps_the_checkpoint_format():
    layer = W4A16Linear.from_linear(torch.nn.Linear(256, 192), scale_dtype=torch.bfloat16)
    x = torch.randn(3, 256)
    y, sd = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    bytes_before = sum(b.numel() * b.element_size() for b in layer.buffers())
    w = gk.repack_for_kernel(layer.int4_weight)
    assert layer.use_kernel_layout_() is layer and layer.layout == "kernel" and "layout=kernel" in repr(layer)
    # The buffers are the kernel layout itself, not a second copy beside the canonical one.
    assert torch.equal(layer.weight_packed, w.kernel_packed) and torch.equal(layer.weight_scale, w.kernel_scales)
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == bytes_before
    assert torch.equal(layer(x), y)  # on CPU: the canonical weight rebuilt per call, the same math
    out = layer.state_dict()
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)
    # Loading a canonical state dict keeps the kernel layout and takes the new weights.
    other = W4A16Linear.from_linear(torch.nn.Linear(256, 192), scale_dtype=torch.bfloat16)
    layer.load_state_dict(other.state_dict())
    assert layer.layout == "kernel" and torch.equal(layer(x), other(x))
    assert torch.equal(layer.int4_weight.packed, other.weight_packed)


def test_kernel_layout_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="N % 64"):
        W4A16Linear.from_linear(torch.nn.Linear(128, 96)).use_kernel_layout_()
    with pytest.raises(ValueError, match="group_size 128"):
        W4A16Linear.from_linear(torch.nn.Linear(128, 64), group_size=64).use_kernel_layout_()


def test_w4a16_matmul_repacked_on_cpu_matches_w4a16_matmul():
    w = gk.repack_for_kernel(gk.pack_int4(_codes(64, 256), torch.rand(64, 2).half() * 0.1))
    x, b = torch.randn(2, 5, 256).half(), torch.randn(64).half()
    y = gk.w4a16_matmul_repacked(x, w.kernel_packed, w.kernel_scales, b)
    assert y.shape == (2, 5, 64) and torch.equal(y, gk.w4a16_matmul(x, w, b))
    with pytest.raises(ValueError, match="last dimension"):
        gk.w4a16_matmul_repacked(x[..., :128], w.kernel_packed, w.kernel_scales)
    with pytest.raises(ValueError, match="kernel_packed must be int32"):
        gk.w4a16_matmul_repacked(x, w.kernel_packed.float(), w.kernel_scales)


def test_opcheck():
    w = gk.pack_int4(_codes(16, 128), torch.full((16, 1), 0.1, dtype=torch.float16))
    with gk.use_backend("reference"):
        torch.library.opcheck(torch.ops.grace_kernels.w4a16_matmul.default,
                              (torch.randn(3, 128, dtype=torch.float16), w.packed, w.scales, 128))


@pytest.mark.parametrize("call,match", [
    (lambda: gk.pack_int4(_codes(4, 100), torch.ones(4, 1, dtype=torch.float16)), "multiple of 8"),
    (lambda: gk.pack_int4(_codes(4, 128).int(), torch.ones(4, 1, dtype=torch.float16)), "int8"),
    (lambda: gk.pack_int4(_codes(4, 128) * 2, torch.ones(4, 1, dtype=torch.float16)), r"\[-8, 7\]"),
    (lambda: gk.pack_int4(_codes(4, 128), torch.ones(4, 1)), "float16 or bfloat16"),
    (lambda: gk.pack_int4(_codes(4, 128), torch.ones(4, 2, dtype=torch.float16)), "scales must have shape"),
    (lambda: gk.w4a16_matmul(torch.randn(2, 64),
                             gk.pack_int4(_codes(4, 128), torch.ones(4, 1, dtype=torch.float16))), "last dimension"),
    (lambda: W4A16Linear.from_linear(torch.nn.Linear(100, 4)), "multiple of group_size"),
    (lambda: W4A16Linear.from_quant_linear(QuantLinear(128, 4, bits=8)), "bits=8"),
    (lambda: gk.quantize_rtn(torch.full((2, 128), float("nan"))), "NaN"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 1536), (8960, 1536), (1536, 8960), (256, 1536)]


# "cuda" is the fused kernel, "cuda-dense" the large-M path (dequantize kernel + cuBLAS), each forced.
_DENSE_POLICY = {"cuda": "never", "cuda-dense": "always"}


def _gpu_backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda", "cuda-dense"]
    return ["triton"] + (["cuda", "cuda-dense"] if _ext.C is not None else [])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 257, 4096])
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_gpu_parity(m, n, k, dtype, backend, monkeypatch):
    """LLaVA-1.5-7B and Qwen2-VL-2B layers: the kernel vs x @ dequant(W) in float32."""
    if backend.startswith("cuda") and _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
    w = gk.quantize_rtn(make_weight(n, k, device="cuda"), scale_dtype=dtype)
    if backend.startswith("cuda"):
        w = gk.repack_for_kernel(w)
        monkeypatch.setenv("GRACE_KERNELS_W4A16_DENSE", _DENSE_POLICY[backend])
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    gold = x.float() @ w.dequantize().t()
    lowp = x @ w.dequantize().to(dtype).t()
    with gk.use_backend(backend.removesuffix("-dense")):
        y = gk.w4a16_matmul(x, w)
    assert y.dtype == dtype
    assert_close_to_gold(y.float(), lowp.float(), gold, atol=1e-2, name=f"w4a16[{backend}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_kernel_bias_leading_dims_and_half_blocks(dtype):
    # N = 192 leaves the last 128-column block half empty; M = 2 x 9 rows; bias added in float32.
    if _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
    w = gk.quantize_rtn(make_weight(192, 1024, device="cuda"), scale_dtype=dtype)
    x = torch.randn(2, 9, 1024, device="cuda", dtype=dtype)
    bias = torch.randn(192, device="cuda", dtype=dtype)
    gold = x.float() @ w.dequantize().t() + bias.float()
    lowp = x @ w.dequantize().to(dtype).t() + bias
    with gk.use_backend("cuda"):
        y = gk.w4a16_matmul(x, w, bias)
    assert y.shape == (2, 9, 192)
    assert_close_to_gold(y.float(), lowp.float(), gold, atol=1e-2, name="w4a16[cuda]")
    layer = W4A16Linear.from_int4_weight(w, bias)
    assert_close_to_gold(layer(x).float(), lowp.float(), gold, atol=1e-2, name="W4A16Linear[cuda]")


@pytest.mark.gpu
def test_gpu_unsupported_shapes_fall_back_or_raise():
    if _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
    w = gk.quantize_rtn(make_weight(96, 256, device="cuda"))  # N % 64 != 0
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    gold = x.float() @ w.dequantize().t()
    torch.testing.assert_close(gk.w4a16_matmul(x, w).float(), gold, rtol=1e-2, atol=1e-2)  # Triton
    with gk.use_backend("cuda"), pytest.raises(ValueError, match="N % 64"):
        gk.w4a16_matmul(x, w)
    w = gk.repack_for_kernel(gk.quantize_rtn(make_weight(64, 256, device="cuda")))
    with pytest.raises(ValueError, match="K % 128"):  # the C++ check, reached only by calling the op directly
        torch.ops.grace_kernels.w4a16_matmul_repacked(x[:, :192].contiguous(), w.kernel_packed[:12], w.kernel_scales,
                                                      128, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (192, 1024)])
def test_gpu_dequantize_kernel_is_bit_exact(n, k, dtype):
    if _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
    w = gk.repack_for_kernel(gk.quantize_rtn(make_weight(n, k, device="cuda"), scale_dtype=dtype))
    d = torch.ops.grace_kernels.w4a16_dequantize_repacked(w.kernel_packed, w.kernel_scales, 128)
    assert torch.equal(d.view(torch.int16), w.dequantize().to(dtype).view(torch.int16))


@pytest.mark.gpu
def test_gpu_crossover_measures_then_replays_in_a_cuda_graph():
    """Auto dispatch at M = 512: measured on the first eager call; a CUDA graph captured afterwards bakes the
    measured choice in; a shape first seen while capturing runs the fused kernel, unmeasured."""
    if _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
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


@pytest.mark.gpu
def test_gpu_kernel_layout_linear_matches_and_frees_the_canonical_copy():
    if _ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {_ext.error}")
    layer = W4A16Linear.from_linear(torch.nn.Linear(4096, 4096), scale_dtype=torch.float16).cuda()
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    y = layer(x)  # canonical buffers + the cached kernel layout: two copies
    torch.cuda.synchronize()
    both = torch.cuda.memory_allocated()
    layer.use_kernel_layout_()
    torch.cuda.synchronize()
    packed_bytes = 4096 * 4096 // 2
    assert torch.cuda.memory_allocated() <= both - packed_bytes  # one copy of the INT4 weight freed
    assert torch.equal(layer(x), y)  # the same kernel on the same bits
