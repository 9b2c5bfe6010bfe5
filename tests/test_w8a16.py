"""INT8 weight-only GEMM (grace_kernels.int8, ops.w8a16, nn.W8A16Linear) on CPU, symmetric and asymmetric (zero
points): the format bit-exactly (against compressed-tensors' own 8-bit packer and dequantizer), the Triton kernel
(interpreted) and the reference against x @ dequant(W) with the 2x-gold rule, the op's schema and fake, the
module's state dict, the input checks."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.nn import QuantLinear, W8A16Linear
from grace_kernels.testing import assert_close_to_gold


def _codes(n, k, seed=0):
    return torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_byte_order_by_hand():
    # (the round trip of both widths: tests/test_w4a16_format.py)
    # u = q + 128, low byte first: codes [-128, -1, 0, 127] -> bytes [0x00, 0x7F, 0x80, 0xFF]
    one = gk.pack_int8(torch.tensor([[-128, -1, 0, 127] * 8], dtype=torch.int8), torch.ones(1, 1).half(), 32)
    assert (one.packed[0, 0].item() & 0xFFFFFFFF) == 0xFF807F00
    assert torch.equal(one.dequantize()[0, :4], torch.tensor([-128.0, -1.0, 0.0, 127.0]))


def test_packing_is_compressed_tensors_own():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = _codes(64, 256, seed=3)
    w = gk.pack_int8(codes, torch.ones(64, 2, dtype=torch.bfloat16))
    assert torch.equal(helpers.pack_to_int32(codes, 8), w.packed)
    assert torch.equal(helpers.unpack_from_int32(w.packed, 8, torch.Size([64, 256])), codes)


def _zeros(n, groups, seed=0):
    return torch.randint(-128, 128, (n, groups), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_zero_points_by_hand():
    # W = scale * (q - z): z = 127 under q = -128 gives -255, z = -128 under q = 127 gives 255 (the extremes);
    # zero points pack four per word along N, u = z + 128, row 0 in the low byte
    codes = torch.tensor([[-128] * 32, [127] * 32, [0] * 32, [5] * 32], dtype=torch.int8)
    zero = torch.tensor([[127], [-128], [0], [-1]], dtype=torch.int8)
    w = gk.pack_int8(codes, torch.full((4, 1), 0.5).half(), 32, zero)
    assert w.zero_points.shape == (1, 1) and (w.zero_points[0, 0].item() & 0xFFFFFFFF) == 0x7F8000FF
    assert torch.equal(w.dequantize()[:, 0], torch.tensor([-127.5, 127.5, 0.0, 3.0]))
    assert torch.equal(gk.unpack_int8_zero_points(w), zero) and gk.unpack_int8_zero_points(gk.pack_int8(
        codes, torch.ones(4, 1).half(), 32)) is None


@pytest.mark.parametrize("n", [64, 37, 5])
def test_zero_points_are_compressed_tensors_own(n):
    """The zero-point layout is compressed-tensors' (packed along N, padded past N), and the dequantized
    weight is its decompressor's: (q - z) * scale rounded once to the scale dtype."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    codes, zero = _codes(n, 256, seed=n), _zeros(n, 2, seed=n + 1)
    for dtype in (torch.float16, torch.bfloat16):
        scales = (torch.rand(n, 2, generator=torch.Generator().manual_seed(n)) * 0.01 + 1e-4).to(dtype)
        w = gk.pack_int8(codes, scales, 128, zero)
        assert torch.equal(w.zero_points, helpers.pack_to_int32(zero, 8, packed_dim=0))
        assert torch.equal(helpers.unpack_from_int32(w.zero_points, 8, torch.Size([n, 2]), packed_dim=0), zero)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=False, strategy="group", group_size=128))
        dense = PackedQuantizationCompressor.decompress(
            {"weight_packed": w.packed, "weight_scale": scales, "weight_zero_point": w.zero_points,
             "weight_shape": torch.tensor([n, 256])}, scheme)["weight"]
        assert dense.dtype == dtype and torch.equal(dense, w.dequantize().to(dtype))


def _asymmetric_weight(n, k, gs, scale_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(n, k // gs, generator=g) * 2e-3 + 1e-4).to(scale_dtype)
    return gk.pack_int8(_codes(n, k, seed), scales, gs, _zeros(n, k // gs, seed + 1))


def test_reference_with_zero_points_matches_a_float64_oracle():
    # the oracle computes (q - z) * s and the matmul in float64 from the unpacked codes, apart from the reference
    w = _asymmetric_weight(37, 256, 64, torch.bfloat16)
    codes, scales = gk.unpack_int8(w)
    zero = gk.unpack_int8_zero_points(w)
    weight = (codes.double() - zero.double().repeat_interleave(64, 1)) * scales.double().repeat_interleave(64, 1)
    assert torch.equal(w.dequantize().double(), weight)   # exact in float32
    x = torch.randn(3, 256, dtype=torch.float64)
    with gk.use_backend("reference"):
        y = gk.w8a16_matmul(x.float(), w)
    torch.testing.assert_close(y.double(), x @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "zero-points"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k,gs", [(1, 64, 256, 128), (3, 96, 512, 128), (17, 64, 256, 64), (5, 40, 128, 32),
                                      (2, 37, 128, 128)])
def test_triton_and_reference_match_dequantized_matmul(m, n, k, gs, dtype, asymmetric):
    g = torch.Generator().manual_seed(1)
    scale_dtype = dtype if dtype != torch.float32 else torch.bfloat16
    w = _asymmetric_weight(n, k, gs, scale_dtype) if asymmetric else gk.pack_int8(
        _codes(n, k), (torch.rand(n, k // gs, generator=g) * 2e-3 + 1e-4).to(scale_dtype), group_size=gs)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    gold = x.double() @ w.dequantize().double().t() + bias.double()
    lowp = x @ w.dequantize().to(dtype).t() + bias   # the same GEMM done by torch in dtype
    with gk.use_backend("triton"):
        y_t = gk.w8a16_matmul(x, w, bias)
    with gk.use_backend("reference"):
        y_r = gk.w8a16_matmul(x, w, bias)
    assert y_t.dtype == dtype and y_t.shape == (m, n)
    atol = 1e-3 if dtype != torch.float32 else 1e-5
    assert_close_to_gold(y_t.double(), lowp.double(), gold, atol=atol, name="triton")
    assert_close_to_gold(y_r.double(), lowp.double(), gold, atol=atol, name="reference")


@pytest.mark.triton
def test_the_kernels_zero_point_load_is_width_generic():
    """The Triton kernel reads BITS-bit zero points for either width (the ops serve them at 8 bits; an
    asymmetric 4-bit checkpoint is loaded as symmetric 8-bit codes): 4-bit codes and zero points against the
    reference's dequantization."""
    from grace_kernels.reference.w4a16 import dequantize_codes, pack_codes, pack_zero_points
    from grace_kernels.triton.w4a16 import wna16_matmul

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (37, 256), dtype=torch.int8, generator=g)
    zero = torch.randint(-8, 8, (37, 2), dtype=torch.int8, generator=g)
    packed, zp = pack_codes(codes, bits=4), pack_zero_points(zero, bits=4)
    scales = (torch.rand(37, 2, generator=g) * 0.01 + 1e-3).half()
    x = torch.randn(3, 256, generator=g)
    weight = dequantize_codes(packed, scales, 128, bits=4, zero_points=zp)
    assert torch.equal(weight, (codes.float() - zero.float().repeat_interleave(128, 1))
                       * scales.float().repeat_interleave(128, 1))
    torch.testing.assert_close(wna16_matmul(x, packed, scales.float(), 128, bits=4, zero_points=zp), x @ weight.t(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_with_zero_points(backend):
    w = _asymmetric_weight(20, 128, 32, torch.float16)
    with gk.use_backend(backend):
        torch.library.opcheck(torch.ops.grace_kernels.w8a16_matmul.default,
                              (torch.randn(3, 128, dtype=torch.float16), w.packed, w.scales, 32, w.zero_points))


def test_forcing_cuda_raises_naming_the_missing_kernel():
    w = gk.pack_int8(_codes(16, 128), torch.full((16, 1), 0.01, dtype=torch.float16))
    with gk.use_backend("cuda"), pytest.raises(RuntimeError, match="w8a16_matmul"):
        gk.w8a16_matmul(torch.randn(2, 128, dtype=torch.float16), w)


def test_module_from_quant_linear_holds_the_trained_weight_and_round_trips_its_state_dict():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48)
    ql = QuantLinear.from_linear(lin, bits=8, group_size=128, scale_dtype=torch.bfloat16)
    with torch.no_grad():
        ql.log_scale.add_(torch.randn_like(ql.log_scale) * 0.05)
    layer = W8A16Linear.from_quant_linear(ql)
    assert torch.equal(layer.int8_weight.dequantize(), ql.fake_quant_weight())
    state = layer.state_dict()
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape", "bias"}
    assert state["weight_packed"].shape == (48, 64) and state["weight_shape"].tolist() == [48, 256]
    fresh = W8A16Linear(256, 48, group_size=128, scale_dtype=torch.bfloat16, bias_dtype=torch.float32)
    fresh.load_state_dict(state)
    x = torch.randn(4, 256)
    with gk.use_backend("reference"):
        assert torch.equal(fresh(x), layer(x))
        torch.testing.assert_close(layer(x), ql(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bits=4"):
        W8A16Linear.from_quant_linear(QuantLinear.from_linear(lin, bits=4, group_size=128))


def test_asymmetric_module_round_trips_its_state_dict():
    w = _asymmetric_weight(40, 256, 128, torch.bfloat16, seed=4)
    layer = W8A16Linear.from_int8_weight(w, torch.randn(40))
    assert layer.asymmetric and torch.equal(layer.int8_weight.dequantize(), w.dequantize())
    state = layer.state_dict()
    assert set(state) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"}
    assert state["weight_zero_point"].dtype == torch.int32 and state["weight_zero_point"].shape == (10, 2)
    fresh = W8A16Linear(256, 40, group_size=128, scale_dtype=torch.bfloat16, bias_dtype=torch.float32,
                        asymmetric=True)
    assert not fresh.int8_weight.dequantize().any()   # before loading: q = z = -128, W = 0
    fresh.load_state_dict(state)
    x = torch.randn(4, 256)
    with gk.use_backend("reference"):
        assert torch.equal(fresh(x), layer(x))
        torch.testing.assert_close(layer(x), x @ w.dequantize().t() + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="weight_zero_point"):   # a symmetric layer has no place for them
        W8A16Linear(256, 40, group_size=128, scale_dtype=torch.bfloat16).load_state_dict(state)


@pytest.mark.parametrize("call,match", [
    (lambda: gk.pack_int8(torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 1).half(), 128,
                          torch.zeros(4, 1, dtype=torch.int32)), "zero_points must be int8"),
    (lambda: gk.pack_int8(torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 1).half(), 128,
                          torch.zeros(4, 2, dtype=torch.int8)), "zero_points must have shape \\(4, 1\\)"),
    (lambda: gk.Int8Weight(torch.zeros(5, 32, dtype=torch.int32), torch.ones(5, 1).half(), (5, 128), 128,
                           torch.zeros(1, 1, dtype=torch.int32)), "zero_points must have shape \\(2, 1\\)"),
    (lambda: gk.pack_int8(torch.zeros(4, 130, dtype=torch.int8), torch.ones(4, 1).half(), 128), "multiple of 4"),
    (lambda: gk.pack_int8(torch.zeros(4, 128, dtype=torch.int16), torch.ones(4, 1).half()), "int8"),
    (lambda: gk.pack_int8(torch.zeros(4, 128, dtype=torch.int8), torch.zeros(4, 1).half()), "finite and > 0"),
    (lambda: gk.pack_int8(torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 1)), "float16 or bfloat16"),
    (lambda: gk.w8a16_matmul(torch.randn(2, 64), gk.pack_int8(torch.zeros(4, 128, dtype=torch.int8),
                                                             torch.ones(4, 1).half())), "K = 128"),
    (lambda: W8A16Linear(100, 8, group_size=32), "multiple of 4 and of group_size"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
