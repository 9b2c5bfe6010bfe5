"""The INT4 weight format (grace_kernels.int4): packing and the kernel repack bit-exactly, RTN quantization,
and the format's input checks."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.int4 import GROUP_SIZES, SCALE_DTYPES, Int4Weight


def _codes(n, k, seed=0):
    return torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _ones(n, groups, dtype=torch.float16):
    return torch.ones(n, groups, dtype=dtype)


# Both code widths of the canonical format (INT8's own byte order: tests/test_w8a16.py).
WIDTHS = {4: (gk.pack_int4, gk.unpack_int4), 8: (gk.pack_int8, gk.unpack_int8)}


@pytest.mark.parametrize("bits", sorted(WIDTHS))
def test_pack_unpack_round_trip_is_bit_exact(bits):
    pack, unpack = WIDTHS[bits]
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (37, 384), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(37, 3).half() + 0.01
    w = pack(codes, scales)
    assert w.packed.dtype == torch.int32 and w.packed.shape == (37, 384 * bits // 32) and w.shape == (37, 384)
    c2, s2 = unpack(w)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)
    assert torch.equal(pack(c2, s2).packed, w.packed)


def test_canonical_nibble_order_by_hand():
    # u = q + 8, low nibble first along K: codes [-8, -7, 0, 1, 2, 3, 6, 7] -> u = [0, 1, 8, 9, 10, 11, 14, 15]
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7] * 4], dtype=torch.int8)
    w = gk.pack_int4(codes, _ones(1, 1), group_size=32)
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
    w = gk.repack_for_kernel(gk.pack_int4(codes, _ones(64, 1)))
    assert (w.kernel_packed[0, 0].item() & 0xFFFFFFFF) == 0x76543210
    assert (w.kernel_packed[0, 5 * 4 + 3].item() & 0xFFFFFFFF) == 0x89ABCDEF
    perm = w.kernel_scales.new_tensor(range(64)).view(1, 64)
    assert torch.equal(gk.repack_to_canonical(w.kernel_packed, perm).scales[:, 0].view(8, 8),
                       perm.view(8, 8).t())  # position 8 g + j of the kernel scales holds column 8 j + g


@pytest.mark.parametrize("call,match", [
    (lambda: gk.repack_for_kernel(gk.pack_int4(_codes(40, 128), _ones(40, 1))), "N % 64"),
    (lambda: gk.repack_for_kernel("w"), "Int4Weight"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128, dtype=torch.int32), torch.ones(1, 64)), "kernel_scales"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128), _ones(1, 64)), "int32"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 128, dtype=torch.int32), _ones(1, 64), group_size=256),
     "group_size"),
    (lambda: gk.repack_to_canonical(torch.zeros(8, 96, dtype=torch.int32), _ones(1, 48)), "N % 64"),
])
def test_repack_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_quantize_rtn_is_absmax_over_7():
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(2))
    q = gk.quantize_rtn(w)
    codes, scales = gk.unpack_int4(q)
    g = w.view(24, 2, 128)
    assert torch.equal(scales, (g.abs().amax(-1) / 7).half())
    assert torch.equal(codes.float(), torch.round(g / scales.float().unsqueeze(-1)).clamp(-8, 7).view(24, 256))


def test_quantize_rtn_zero_group_gets_the_smallest_normal_scale():
    w = torch.zeros(2, 128)
    w[1] = 1.0
    codes, scales = gk.unpack_int4(gk.quantize_rtn(w, scale_dtype=torch.bfloat16))
    assert scales[0, 0] == torch.finfo(torch.bfloat16).tiny
    assert torch.equal(codes[0], torch.zeros(128, dtype=torch.int8))
    assert torch.equal(gk.quantize_rtn(w).dequantize()[0], torch.zeros(128))


def test_one_definition_of_group_sizes_and_scale_dtypes():
    from grace_kernels.ops import lsq

    assert lsq.GROUP_SIZES is GROUP_SIZES and lsq.SCALE_DTYPES is SCALE_DTYPES


BAD_SCALES = [
    pytest.param(0.0, id="zero"),
    pytest.param(-0.5, id="negative"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="-inf"),
]


@pytest.mark.parametrize("value", BAD_SCALES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_int4_rejects_scales_that_are_not_finite_and_positive(value, dtype):
    scales = _ones(4, 2, dtype)
    scales[2, 1] = value
    with pytest.raises(ValueError, match=r"scales must be finite and > 0"):
        gk.pack_int4(_codes(4, 256), scales)


def test_quantize_rtn_rejects_weights_whose_scale_overflows():
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        gk.quantize_rtn(torch.full((2, 128), 1e6))
    assert gk.quantize_rtn(torch.full((2, 128), 1e6), scale_dtype=torch.bfloat16).scales.isfinite().all()


@pytest.mark.parametrize("call", [
    pytest.param(lambda: gk.pack_int4(torch.zeros(0, 128, dtype=torch.int8), _ones(0, 1)), id="pack-zero-rows"),
    pytest.param(lambda: gk.pack_int4(torch.zeros(4, 0, dtype=torch.int8), _ones(4, 0)), id="pack-zero-cols"),
    pytest.param(lambda: gk.quantize_rtn(torch.zeros(0, 128)), id="rtn-zero-rows"),
    pytest.param(lambda: Int4Weight(torch.zeros(0, 16, dtype=torch.int32), _ones(0, 1), (0, 128)),
                 id="weight-zero-rows"),
])
def test_empty_weights_are_rejected(call):
    with pytest.raises(ValueError, match="at least one row and one column"):
        call()


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), _ones(4, 1), (4, 130)),
                 "multiple of 8", id="K-not-a-multiple-of-8"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), _ones(4, 1), (5, 128)),
                 r"packed must have shape \(5, 16\)", id="N-disagrees"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), _ones(4, 2), (4, 128)),
                 r"scales must have shape \(4, 1\)", id="groups-disagree"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), _ones(4, 1), (4, 128), 96),
                 "group_size must be one of", id="group-size"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), _ones(4, 1), (4.0, 128)),
                 "shape must be two ints", id="float-shape"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16), _ones(4, 1), (4, 128)), "packed must be int32",
                 id="packed-dtype"),
    pytest.param(lambda: Int4Weight(torch.zeros(4, 16, dtype=torch.int32), torch.ones(4, 1), (4, 128)),
                 "scales must be float16 or bfloat16", id="scales-dtype"),
    pytest.param(lambda: Int4Weight(torch.zeros(64, 16, dtype=torch.int32), _ones(64, 1), (64, 128), 128,
                                    torch.zeros(8, 128, dtype=torch.int32), None),
                 "given together", id="half-a-kernel-layout"),
    pytest.param(lambda: Int4Weight(torch.zeros(64, 16, dtype=torch.int32), _ones(64, 1), (64, 128), 128,
                                    torch.zeros(8, 256, dtype=torch.int32), _ones(1, 128)),
                 r"does not hold an \[64, 128\] weight", id="kernel-layout-disagrees"),
])
def test_int4_weight_whose_shape_disagrees_with_its_tensors_fails_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("call,match", [
    (lambda: gk.pack_int4(_codes(4, 100), _ones(4, 1)), "multiple of 8"),
    (lambda: gk.pack_int4(_codes(4, 128).int(), _ones(4, 1)), "int8"),
    (lambda: gk.pack_int4(_codes(4, 128) * 2, _ones(4, 1)), r"\[-8, 7\]"),
    (lambda: gk.pack_int4(_codes(4, 128), torch.ones(4, 1)), "float16 or bfloat16"),
    (lambda: gk.pack_int4(_codes(4, 128), _ones(4, 2)), "scales must have shape"),
    (lambda: gk.pack_int4(_codes(4, 128), _ones(4, 1), group_size=48), "group_size must be one of"),
    (lambda: gk.quantize_rtn(torch.full((2, 128), float("nan"))), "NaN"),
    (lambda: gk.quantize_rtn(torch.ones(2, 100)), "multiple of 8"),
    (lambda: gk.quantize_rtn(torch.ones(2, 128), scale_dtype=torch.float32), "scale_dtype"),
    (lambda: gk.unpack_int4(torch.zeros(2, 16, dtype=torch.int32)), "Int4Weight"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
