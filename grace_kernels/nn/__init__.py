"""Modules: QuantLinear (LSQ fake-quant training) and W4A16Linear (INT4 inference)."""

# --- modules: one import line per module file (keep sorted) ---
from grace_kernels.nn.quant_linear import QuantLinear  # noqa: F401
from grace_kernels.nn.w4a16_linear import W4A16Linear  # noqa: F401
# --- end modules ---
