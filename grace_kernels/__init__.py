"""grace-kernels: fused kernels for GRACE, INT4 quantization-aware distillation of VLMs.

Public API (each op documented in ``grace_kernels.ops.<op>``):

    lsq_init_log_scale, lsq_fake_quant, lsq_quantize         group-wise LSQ fake quantization
    gated_dkd_loss, fused_linear_grace_loss                  entropy-gated decoupled distillation
    KD_TYPES                                                 their kd_type values ("dkd", "kl")
    cka, rcka_loss                                           relational CKA over visual tokens
    Int4Weight, pack_int4, unpack_int4, quantize_rtn,        the INT4 weight format (grace_kernels.int4)
    repack_for_kernel, repack_to_canonical
    w4a16_matmul, w4a16_matmul_repacked                      INT4 weight-only GEMM
    Int8Weight, pack_int8, unpack_int8, w8a16_matmul,        the INT8 weight format (zero points optional) and GEMM
    unpack_int8_zero_points                                  (grace_kernels.int8)
    nn.QuantLinear, nn.W4A16Linear, nn.W4A16KernelLinear,    modules (``gk.nn``, as ``torch.nn``)
    nn.W8A16Linear
    default_chunk_size                                       rows per chunk of the KD losses (memory planning)
    describe, use_backend, select_backend, cuda_ext_runs_on  what runs here, and forcing a backend

Backend choice (CUDA extension / Triton / PyTorch reference) lives in ``grace_kernels._backend``.
"""

from grace_kernels import _ext

# Op schemas are defined in Python by the ops modules; the extension only registers CUDA
# implementations for them, so the ops must be imported before _C is loaded.
from grace_kernels._backend import BACKENDS, cuda_ext_runs_on, describe, select_backend, use_backend  # noqa: F401
from grace_kernels._kd_layout import KD_TYPES  # noqa: F401
from grace_kernels.int4 import (  # noqa: F401
    Int4Weight,
    pack_int4,
    quantize_rtn,
    repack_for_kernel,
    repack_to_canonical,
    unpack_int4,
)
from grace_kernels.int8 import Int8Weight, pack_int8, unpack_int8, unpack_int8_zero_points  # noqa: F401

# --- ops: one import line per op module (keep sorted) ---
from grace_kernels.ops.cka import RCKAOutput, cka, rcka_loss  # noqa: F401
from grace_kernels.ops.fused_linear_grace_loss import (  # noqa: F401
    FusedGraceLossOutput,
    default_chunk_size,
    fused_linear_grace_loss,
)
from grace_kernels.ops.gated_dkd import GatedDKDOutput, gated_dkd_loss  # noqa: F401
from grace_kernels.ops.lsq import lsq_fake_quant, lsq_init_log_scale, lsq_quantize  # noqa: F401
from grace_kernels.ops.w4a16 import w4a16_matmul, w4a16_matmul_repacked  # noqa: F401
from grace_kernels.ops.w8a16 import w8a16_matmul  # noqa: F401

# --- end ops ---

_ext.load()

from grace_kernels import nn  # noqa: E402,F401  (gk.nn.W4A16Linear, as torch.nn; after the ops it uses)

__version__ = "0.1.0"
