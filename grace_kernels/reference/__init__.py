"""Pure-PyTorch references, one module per op, with the same signatures as grace_kernels.ops.

They are the oracle for the parity tests, the CPU path, and the eager baseline of the benchmarks.
"""
