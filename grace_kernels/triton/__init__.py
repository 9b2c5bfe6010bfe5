"""Triton kernels and their launchers, one module per op.

Each module may define ``AOT_SPECS``: a list of :class:`grace_kernels.kernel_spec.KernelSpec` naming a
kernel and a concrete signature, which ``python -m grace_kernels.aot`` compiles for sm_80 and sm_90.
"""
