"""The one definition of the KD loss's kd types and of its per-row statistics, for every implementation.

The gated DKD loss (``grace_kernels.ops.gated_dkd``, ``fused_linear_grace_loss``) computes its rows in
two passes (see ``grace_kernels.ops._kd_core``). Pass 1 writes, for each token, the float32 row
``[len(Row)]`` laid out by :class:`Row`; pass 2 reads it back to form the closed-form gradient. The
Triton kernels (``grace_kernels.triton.gated_dkd``), their PyTorch twins
(``grace_kernels.reference.gated_dkd``) and the chunked core all index the row by these names; the
kernels read them as ``_kd_layout.Row.<NAME>``, which Triton folds to compile-time offsets.

This module imports neither torch nor Triton.
"""

from __future__ import annotations

from enum import IntEnum

KD_TYPES = ("dkd", "kl")
"""``"dkd"``: decoupled KD, T^2 (tckd_weight TCKD + nckd_weight NCKD); ``"kl"``: T^2 KL(p_T || p_S),
the paper's "naive KD" ablation."""


def check_kd_type(kd_type: object) -> None:
    """Raise ValueError unless ``kd_type`` is one of :data:`KD_TYPES`."""
    if kd_type not in KD_TYPES:
        raise ValueError(f"kd_type must be one of {', '.join(map(repr, KD_TYPES))}, got {kd_type!r}")


class Row(IntEnum):
    """Columns of a row statistic. T is the distillation temperature; s = z_S / T, t = z_T / T over the
    common vocabulary Vc; "_nt" means over the non-target columns v != y. All in nats, float32."""

    TCKD = 0       # KL([p_T(y), 1 - p_T(y)] || [p_S(y), 1 - p_S(y)])
    NCKD = 1       # KL(p^_T || p^_S), the non-target distributions renormalized
    KL = 2         # KL(p_T || p_S)
    ENTROPY = 3    # entropy of softmax(z_T / gate_temperature), for the gate
    CE = 4         # cross-entropy of softmax(z_S) at temperature 1, full student vocabulary
    LSE_S_NT = 5   # logsumexp_{v != y} s_v
    LSE_T_NT = 6   # logsumexp_{v != y} t_v (-inf: the teacher has no non-target mass)
    LSE_S = 7      # logsumexp_v s_v
    LSE_T = 8      # logsumexp_v t_v
    LOG_PS_Y = 9   # log p_S(y) = s_y - LSE_S
    LOG_PT_Y = 10  # log p_T(y) = t_y - LSE_T
    LSE_CE = 11    # logsumexp_v z_S,v at temperature 1 (the CE's normalizer)


ROW_FIELDS = tuple(f.name.lower() for f in Row)
N_FIELDS = len(Row)


def kd_per_token(tckd, nckd, kl, *, kd_type: str, temperature: float, tckd_weight: float, nckd_weight: float):
    """The per-token distillation term of ``kd_type`` from its row statistics (tensors of one shape):
    T^2 (tckd_weight TCKD + nckd_weight NCKD) for "dkd", T^2 KL for "kl". The one place the forward
    chooses between the two; the closed-form gradients choose in their kernels (``IS_DKD``)."""
    if kd_type == "dkd":
        return temperature ** 2 * (tckd_weight * tckd + nckd_weight * nckd)
    check_kd_type(kd_type)
    return temperature ** 2 * kl
