"""The CUDA path of the W4A16 dispatch under torch.compile, traced on CPU tensors.

The serving decode step (benchmarks/bench_decode.py) compiles every linear with ``fullgraph=True``; on the
GPU the INT4 linears take the CUDA kernel's branch (``DENSE_CROSSOVER`` -> ``_cuda_kernel_matmul``), which
CI never selects. Called directly on CPU tensors, that branch runs the op's CPU implementation, and dynamo
traces the same Python lines (the alignment check included) through the op's fake implementation.
"""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.ops import w4a16 as ops


@pytest.mark.parametrize("m", [1, 8])
def test_cuda_kernel_branch_compiles_fullgraph_and_matches_eager(m):
    w = gk.repack_for_kernel(gk.quantize_rtn(torch.randn(128, 256), 128, torch.bfloat16))
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    bias = torch.randn(128)

    def branch(x):
        return ops.DENSE_CROSSOVER(x, w.kernel_packed, w.kernel_scales, w.group_size, bias)

    torch._dynamo.reset()
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    torch._dynamo.reset()
    assert got.shape == (m, 128) and got.dtype == torch.bfloat16
    assert torch.equal(got, branch(x))
