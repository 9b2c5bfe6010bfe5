"""Device helpers shared by the kernels.

``to_bf16_rne``: float32 -> bfloat16 rounded to nearest even with integer ops. GPUs round that way
in hardware (cvt.rn.bf16.f32), but the Triton interpreter truncates, which would make CPU parity
tests of bf16 outputs off by one ulp; doing the rounding explicitly gives the same bits on both.
Inputs must be finite (NaN payloads are not preserved).
"""

import triton
import triton.language as tl


@triton.jit
def to_bf16_rne(x):
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """Cast float32 ``x`` to ``dtype`` rounding to nearest even on every backend."""
    if dtype == tl.bfloat16:
        return to_bf16_rne(x)
    else:
        return x.to(dtype)
