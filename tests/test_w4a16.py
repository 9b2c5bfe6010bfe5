"""W4A16: packing bit-exactly, the Triton split-K kernel vs x @ dequant(W), and W4A16Linear."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.nn import QuantLinear, W4A16Linear
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 257, 4096])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (8960, 1536), (1536, 8960)])
def test_gpu_parity(m, n, k, dtype):
    w = gk.quantize_rtn(make_weight(n, k, device="cuda"), scale_dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    gold = x.float() @ w.dequantize().t()
    lowp = x @ w.dequantize().to(dtype).t()
    assert_close_to_gold(gk.w4a16_matmul(x, w).float(), lowp.float(), gold, atol=1e-2, name="w4a16")
