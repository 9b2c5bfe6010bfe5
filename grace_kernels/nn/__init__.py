"""Modules: QuantLinear (LSQ fake-quant training) and W4A16Linear (INT4 inference)."""

# --- modules: one import line per module file (keep sorted) ---

# --- end modules ---
