"""A small driver for compute-sanitizer: the CUDA W4A16 GEMM and dequantize kernels at small shapes.

Run under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` by gpu_acceptance.py (with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own allocation and an access past its end is
outside any allocation). The shapes cover each path through the kernels: one and several 64-row tiles,
a half-empty last 128-column block (N = 192), split-K (small M, long K), bias and no bias, float16 and
bfloat16, and the dequantize kernel of the large-M path. Each result is also checked against
x @ dequant(W) (GEMM: relative error; dequantize: bit for bit), so a silent wrong answer fails too.

``--device cpu`` runs the same checks through the operators' CPU implementations (the stand-in run in
CI: every line of the driver but the sanitizer's view of it).

Exit status: 0 all checks passed, 1 a check failed, 2 the CUDA extension is not available.
"""

from __future__ import annotations

import argparse
import sys

import torch

import grace_kernels as gk
from grace_kernels import _ext

# (M, N, K): decode rows, a half block, split-K over a long K, several row tiles, more than 128 rows
GEMM_SHAPES = [(1, 128, 256), (3, 192, 512), (16, 64, 4096), (33, 256, 1024), (130, 192, 256)]
DEQUANT_SHAPES = [(64, 256), (192, 512)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the kernels under test, default) or cpu (the CPU operators: a stand-in)")
    device = p.parse_args(argv).device
    if device == "cuda" and (not torch.cuda.is_available() or _ext.C is None):
        print(f"needs a GPU and grace_kernels._C (extension: {_ext.error})")
        return 2
    torch.manual_seed(0)
    gemm = torch.ops.grace_kernels.w4a16_matmul_repacked
    dequant = torch.ops.grace_kernels.w4a16_dequantize_repacked
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k in GEMM_SHAPES:
            for with_bias in (False, True):
                w = gk.repack_for_kernel(gk.quantize_rtn(torch.randn(n, k, device=device), scale_dtype=dtype))
                x = torch.randn(m, k, device=device, dtype=dtype)
                bias = torch.randn(n, device=device) if with_bias else None
                y = gemm(x, w.kernel_packed, w.kernel_scales, 128, bias)
                gold = x.float() @ w.dequantize().t() + (0 if bias is None else bias)
                err = ((y.float() - gold).norm() / gold.norm()).item()
                ok = err < 1e-2
                failures += not ok
                print(f"gemm {str(dtype)[6:]:8} m={m:<4} n={n:<4} k={k:<5} bias={with_bias!s:5} rel_err={err:.2e} "
                      f"{'ok' if ok else 'FAIL'}")
        for n, k in DEQUANT_SHAPES:
            w = gk.repack_for_kernel(gk.quantize_rtn(torch.randn(n, k, device=device), scale_dtype=dtype))
            d = dequant(w.kernel_packed, w.kernel_scales, 128)
            ok = torch.equal(d.view(torch.int16), w.dequantize().to(dtype).view(torch.int16))
            failures += not ok
            print(f"dequantize {str(dtype)[6:]:8} n={n:<4} k={k:<5} {'bit-exact' if ok else 'FAIL'}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
