"""Modules: QuantLinear (LSQ fake-quant training), W4A16Linear and W4A16KernelLinear (INT4 inference),
W8A16Linear (INT8 inference)."""

# --- modules: one import line per module file (keep sorted) ---
from grace_kernels.nn.quant_linear import QuantLinear  # noqa: F401
from grace_kernels.nn.w4a16_linear import W4A16KernelLinear, W4A16Linear, convert_to_kernel_layout  # noqa: F401
from grace_kernels.nn.w8a16_linear import W8A16Linear  # noqa: F401
# --- end modules ---
