"""W4A16 GEMM dispatch on CPU: the ops' schemas, fakes and CPU implementations, the Triton split-K kernel (under
the interpreter) vs x @ dequant(W), both entry points through one dispatch, and the large-M choice between the
fused kernel and dequantize + dense GEMM (DenseCrossover, driven here with injected paths and timer)."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.dense_crossover import DENSE_ENV, DENSE_MIN_M, DenseCrossover
from grace_kernels.ops import w4a16 as ops
from grace_kernels.ops.w4a16 import cuda_kernel_unsupported
from grace_kernels.testing import assert_close_to_gold


def _codes(n, k, seed=0):
    return torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_cuda_kernel_shape_rules():
    assert cuda_kernel_unsupported(4096, 11008, 128, torch.bfloat16) is None
    assert "K % 128" in cuda_kernel_unsupported(4096, 4032, 64, torch.float16)
    assert "N % 64" in cuda_kernel_unsupported(96, 4096, 128, torch.float16)
    assert "group_size 128" in cuda_kernel_unsupported(64, 4096, 64, torch.float16)
    assert "float16 or bfloat16" in cuda_kernel_unsupported(64, 4096, 128, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repacked_op_cpu_matches_reference(dtype):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(128, 256), torch.rand(128, 2).to(dtype) * 0.1 + 1e-3))
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


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("op, pack, half", [("w4a16_matmul", gk.pack_int4, 8), ("w8a16_matmul", gk.pack_int8, 128)])
def test_opcheck_canonical_ops(backend, op, pack, half):
    """Both code widths' canonical-layout ops (one implementation, ops.w4a16.wna16_impl)."""
    codes = torch.randint(-half, half, (16, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    w = pack(codes, torch.full((16, 1), 0.01, dtype=torch.float16))
    with gk.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.grace_kernels, op).default,
                              (torch.randn(3, 128, dtype=torch.float16), w.packed, w.scales, 128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_op_cpu_is_the_rounded_reference(dtype):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(192, 384), (torch.rand(192, 3) * 0.1 + 1e-3).to(dtype)))
    d = torch.ops.grace_kernels.w4a16_dequantize_repacked(w.kernel_packed, w.kernel_scales, 128)
    assert d.dtype == dtype and d.shape == (192, 384)
    assert torch.equal(d, w.dequantize().to(dtype))
    torch.library.opcheck(torch.ops.grace_kernels.w4a16_dequantize_repacked.default,
                          (w.kernel_packed, w.kernel_scales, 128))


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


@pytest.mark.triton
def test_leading_dims_and_split_k_sum():
    w = gk.pack_int4(_codes(64, 1024), torch.full((64, 8), 0.01, dtype=torch.float16))
    x = torch.randn(2, 3, 1024, dtype=torch.float16)
    with gk.use_backend("triton"):
        y = gk.w4a16_matmul(x, w)   # M = 6, N = 64: one tile, K split across programs
    ref_y = (x.float() @ w.dequantize().t()).half()
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y, ref_y, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_w4a16_matmul_repacked_on_cpu_matches_w4a16_matmul(backend):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(64, 256), torch.rand(64, 2).half() * 0.1 + 1e-3))
    x, b = torch.randn(2, 5, 256).half(), torch.randn(64).half()
    with gk.use_backend(backend):
        y = gk.w4a16_matmul_repacked(x, w.kernel_packed, w.kernel_scales, b)
        assert y.shape == (2, 5, 64) and torch.equal(y, gk.w4a16_matmul(x, w, b))


def test_forcing_cuda_where_it_cannot_run_raises_runtime_error():
    w = gk.repack_for_kernel(gk.pack_int4(_codes(64, 256), torch.full((64, 2), 0.1, dtype=torch.float16)))
    x = torch.randn(3, 256, dtype=torch.float16)
    with gk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            gk.w4a16_matmul(x, w)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            gk.w4a16_matmul_repacked(x, w.kernel_packed, w.kernel_scales)


@pytest.mark.parametrize("call,match", [
    (lambda w: gk.w4a16_matmul(torch.randn(2, 64), w), "last dimension"),
    (lambda w: gk.w4a16_matmul(torch.randn(2, 256).long(), w), "floating"),
    (lambda w: gk.w4a16_matmul(torch.randn(2, 256), w, torch.randn(63)), r"bias must have shape \(64,\)"),
    (lambda w: gk.w4a16_matmul(torch.randn(2, 256), w.packed), "Int4Weight"),
    (lambda w: gk.w4a16_matmul_repacked(torch.randn(2, 128), w.kernel_packed, w.kernel_scales), "last dimension"),
    (lambda w: gk.w4a16_matmul_repacked(torch.randn(2, 256), w.kernel_packed.float(), w.kernel_scales),
     "kernel_packed must be int32"),
    (lambda w: gk.w4a16_matmul_repacked(torch.randn(2, 256), w.kernel_packed, w.scales), "kernel_scales must have"),
    (lambda w: gk.w4a16_matmul_repacked(torch.randn(2, 256), w.kernel_packed, w.kernel_scales, group_size=96),
     "group_size must be one of"),
])
def test_bad_input_raises(call, match):
    w = gk.repack_for_kernel(gk.pack_int4(_codes(64, 256), torch.full((64, 2), 0.1, dtype=torch.float16)))
    with pytest.raises(ValueError, match=match):
        call(w)


# --- large M on the CUDA backend: fused kernel or dequantize + cuBLAS, by measurement (DenseCrossover).
# The two paths are the ops above, whose CPU implementations let the crossover run here on CPU tensors.

class _FakeTimer:
    """Stands in for CUDA-event timing: runs the candidate once, reports the given milliseconds for the path
    it took (the last entry of ``calls``) and records what it timed."""

    def __init__(self, calls, kernel_ms, dense_ms):
        self.calls, self.ms, self.timed = calls, {"kernel": kernel_ms, "dense": dense_ms}, []

    def __call__(self, fn, reps):
        out = fn()
        self.timed.append(self.calls[-1])
        return self.ms[self.calls[-1]], out


class _Case:
    """A DenseCrossover over the real CPU paths, traced, with a fake timer and a switchable capture state."""

    def __init__(self, kernel_ms, dense_ms, m=256, bias=True, dense=None):
        self.calls, self.capturing = [], False
        self.timer = _FakeTimer(self.calls, kernel_ms, dense_ms)
        self.crossover = DenseCrossover(self._traced("kernel", ops._cuda_kernel_matmul),
                                        self._traced("dense", dense or ops._cuda_dense_matmul),
                                        timer=self.timer, cannot_time=lambda: self.capturing)
        self.w = gk.repack_for_kernel(gk.pack_int4(_codes(128, 256), (torch.rand(128, 2) * 0.05 + 1e-3).half()))
        self.x = torch.randn(m, 256).half()
        self.b = torch.randn(128) if bias else None

    def _traced(self, path, real):
        def fn(*args):
            self.calls.append(path)
            return real(*args)
        return fn

    def __call__(self, x=None, bias="default"):
        x = self.x if x is None else x
        bias = self.b if isinstance(bias, str) else bias
        return self.crossover(x, self.w.kernel_packed, self.w.kernel_scales, self.w.group_size, bias)


@pytest.mark.parametrize("kernel_ms,dense_ms,winner", [(1.0, 0.5, "dense"), (1.0, 0.97, "kernel"),
                                                      (0.4, 0.9, "kernel")])
def test_crossover_measures_once_and_keeps_the_faster(kernel_ms, dense_ms, winner):
    case = _Case(kernel_ms, dense_ms)
    gold = case.x.float() @ case.w.dequantize().t() + case.b
    for _ in range(3):
        y = case()
        # Either path is x @ W^T: the CPU implementations round W to float16 (dense) or keep it exact.
        torch.testing.assert_close(y.float(), gold, rtol=2e-2, atol=2e-2)
    assert case.timer.timed == ["kernel", "dense"]  # measured on the first call only
    assert case.calls == ["kernel", "dense", winner, winner]
    (row,) = case.crossover.table()
    assert row["choice"] == winner and row["m_bucket"] == 256 and row["n"] == 128 and row["k"] == 256
    assert (row["kernel_ms"], row["dense_ms"]) == (kernel_ms, dense_ms)


def test_crossover_keys_on_m_bucket_and_bias():
    case = _Case(1.0, 0.5, m=200)
    case()
    case(case.x[:129])  # same bucket (256): no new measurement
    case(case.x[:128])  # bucket 128
    case(bias=None)  # without bias
    assert [r["m_bucket"] for r in case.crossover.table()] == [256, 128, 256]
    assert len(case.timer.timed) == 6


def test_small_m_and_policies_skip_the_measurement(monkeypatch):
    case = _Case(1.0, 0.1)
    case(case.x[: DENSE_MIN_M - 1])
    monkeypatch.setenv(DENSE_ENV, "never")
    case()
    monkeypatch.setenv(DENSE_ENV, "always")
    case(case.x[:3])
    assert case.calls == ["kernel", "kernel", "dense"] and case.timer.timed == [] and case.crossover.table() == []
    monkeypatch.setenv(DENSE_ENV, "fastest")
    with pytest.raises(ValueError, match="GRACE_KERNELS_W4A16_DENSE"):
        case()


def test_crossover_keeps_the_kernel_when_the_dense_weight_does_not_fit():
    def oom(*args):
        raise torch.OutOfMemoryError("no room for the dense weight")

    case = _Case(1.0, 0.1, dense=oom)
    y = case()
    torch.testing.assert_close(y.float(), case.x.float() @ case.w.dequantize().t() + case.b, rtol=2e-2, atol=2e-2)
    (row,) = case.crossover.table()
    assert row["choice"] == "kernel" and row["dense_ms"] == float("inf")
    case()
    assert case.calls == ["kernel", "dense", "kernel"]


def test_crossover_does_not_time_while_capturing():
    case = _Case(1.0, 0.5)
    case.capturing = True
    case()
    assert case.calls == ["kernel"] and case.timer.timed == [] and case.crossover.table() == []
    case.capturing = False
    case()  # measured now: dense wins
    case.capturing = True
    case()  # a known key runs its winner even while capturing
    assert case.calls == ["kernel", "kernel", "dense", "dense"]
    case.crossover.clear()
    assert case.crossover.table() == []
