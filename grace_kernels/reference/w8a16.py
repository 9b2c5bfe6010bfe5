"""INT8 weight-only GEMM in plain PyTorch: packing in the canonical checkpoint format, dequantization,
and y = x @ dequant(W)^T with float32 accumulation. Signatures match :mod:`grace_kernels.ops.w8a16`.

Canonical format (compressed-tensors "pack-quantized" with ``num_bits: 8``, what vLLM's WNA16 path loads):
    weight_packed int32 [N, K / 4]: u = q + 128 in [0, 255], four per word, low byte first along K
                  (word j of a row holds k = 4j .. 4j + 3, k = 4j in bits 0-7)
    weight_scale  [N, K / group_size] float16 / bfloat16
    W[n, k] = weight_scale[n, k // group_size] * q[n, k],  q in [-128, 127]
Asymmetric (``symmetric: false``) adds
    weight_zero_point int32 [ceil(N / 4), K / group_size]: u = z + 128, four per word along N, low byte
                  first (word j of column g holds z[4j .. 4j + 3, g]; compressed-tensors packs zero points
                  along the output dimension)
    W[n, k] = weight_scale[n, g] * (q[n, k] - z[n, g]),  g = k // group_size,  z in [-128, 127]
"""

from __future__ import annotations

import functools

from grace_kernels.reference.w4a16 import (
    dequantize_codes,
    pack_codes,
    pack_zero_points,
    unpack_codes,
    unpack_zero_points,
    wna16_matmul_ref,
)

BITS = 8
PER_WORD = 32 // BITS

pack_int8_ref = functools.partial(pack_codes, bits=BITS)
unpack_int8_ref = functools.partial(unpack_codes, bits=BITS)
dequantize_int8_ref = functools.partial(dequantize_codes, bits=BITS)
w8a16_matmul_ref = functools.partial(wna16_matmul_ref, bits=BITS)
pack_int8_zero_points_ref = functools.partial(pack_zero_points, bits=BITS)
unpack_int8_zero_points_ref = functools.partial(unpack_zero_points, bits=BITS)
