"""The chunked core shared by gated_dkd_loss and fused_linear_grace_loss.

Tokens are processed in chunks; a chunk's float32 logits (student [c, Vs], teacher [c, Vt]) come
from a callback (a slice of given logits, or a GEMM of hidden states with the LM head). For each
chunk, pass 1 computes the per-row statistics (``grace_kernels._kd_layout.Row``), pass 2 the closed-form gradient
of the whole loss w.r.t. the student logits, which the caller turns into dX / dW at once: the
gradient is complete in the forward and the full [N, V] logits never exist.

GDKD normalizes by sum_i g_i over all tokens, which is not known while the first chunk's
gradient is formed. A gate pass over the teacher logits first (one extra teacher GEMM per chunk
when the gate is on) gives every g_i and their sum on the device; the alternative, separate
accumulators for the CE and KD parts of dW, would cost a second [V, H] float32 buffer.
Nothing here synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grace_kernels._backend import select_backend
from grace_kernels._kd_layout import Row, kd_per_token
from grace_kernels.reference import gated_dkd as ref

# Per-call statistics vector: the first entry carries the gradient.
STATS = ("loss", "ce", "gdkd", "tckd", "nckd", "teacher_entropy", "gate_mean", "gate_sum", "num_valid")


def _row_impl(device: torch.device):
    if select_backend("gated_dkd", device) == "triton":
        from grace_kernels.triton import gated_dkd as tri

        return tri.kd_rows, tri.kd_rows_grad
    return ref.kd_rows_ref, ref.kd_rows_grad_ref


def default_chunk_size(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk the KD losses use when ``chunk_size`` is None, for ``n`` rows of a ``v``-wide vocabulary
    on ``device``: about 256 MiB of float32 logits per model per chunk on a GPU, 64 MiB elsewhere, at least 1
    and at most ``n``. Public as ``grace_kernels.default_chunk_size`` (memory planning sizes the buffers with it)."""
    # Large GEMMs on a GPU, bounded memory on a CPU.
    budget = (256 if device.type == "cuda" else 64) * 2 ** 20
    return max(1, min(n, budget // (4 * v)))


def kd_core(
    n: int, vs: int, vt: int | None, target: torch.Tensor,
    student_chunk: Callable[[int, int], torch.Tensor],
    teacher_chunk: Callable[[int, int], torch.Tensor] | None,
    consume_grad: Callable[[int, int, torch.Tensor], None] | None,
    *, ce_weight: float, kd_weight: float, temperature: float, tckd_weight: float, nckd_weight: float, gate: bool,
    gate_temperature: float, kd_type: str, ignore_index: int, chunk_size: int | None,
) -> torch.Tensor:
    """Run the loss over all chunks; returns the float32 statistics vector (:data:`STATS`)."""
    dev = target.device
    use_kd = teacher_chunk is not None and kd_weight != 0.0
    vc = min(vs, vt) if use_kd else vs
    chunk = chunk_size or default_chunk_size(n, max(vs, vt or 0), dev)
    bounds = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    rows_fn, grad_fn = _row_impl(dev)

    valid = target != ignore_index
    n_valid = valid.sum().float()
    inv_valid = torch.where(n_valid > 0, 1.0 / n_valid.clamp_min(1), torch.zeros_like(n_valid))
    if use_kd and gate:
        parts = [ref.teacher_entropy(teacher_chunk(lo, hi)[:, :vc], gate_temperature) for lo, hi in bounds]
        g = ref.gate_weight(torch.cat([e for e, _ in parts]), torch.cat([v for _, v in parts])) * valid
    else:
        g = valid.float()
    gate_sum = g.sum()
    inv_g = torch.where(gate_sum > 0, 1.0 / gate_sum.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.zeros_like(gate_sum))

    sums = torch.zeros(5, device=dev)  # ce, g * per-token KD, tckd, nckd, entropy
    for lo, hi in bounds:
        zs = student_chunk(lo, hi)
        zt = teacher_chunk(lo, hi) if use_kd else None
        tgt, ok = target[lo:hi], valid[lo:hi].float()
        rows = rows_fn(zs, zt, tgt, vc=vc, temperature=temperature, gate_temperature=gate_temperature,
                       ignore_index=ignore_index)
        per_token = kd_per_token(rows[:, Row.TCKD], rows[:, Row.NCKD], rows[:, Row.KL], kd_type=kd_type,
                                 temperature=temperature, tckd_weight=tckd_weight, nckd_weight=nckd_weight)
        sums += torch.stack([(rows[:, Row.CE] * ok).sum(), (per_token * g[lo:hi]).sum(),
                             (rows[:, Row.TCKD] * ok).sum(), (rows[:, Row.NCKD] * ok).sum(),
                             (rows[:, Row.ENTROPY] * ok).sum()])
        if consume_grad is not None:
            coef_ce = ce_weight * inv_valid * ok
            coef_kd = kd_weight * inv_g * g[lo:hi]
            grad = grad_fn(zs, zt, tgt, rows, coef_kd, coef_ce, vc=vc, temperature=temperature,
                           tckd_weight=tckd_weight, nckd_weight=nckd_weight, kd_type=kd_type,
                           ignore_index=ignore_index)
            consume_grad(lo, hi, grad)

    ce = sums[0] * inv_valid
    gdkd = sums[1] * inv_g
    loss = ce_weight * ce + kd_weight * gdkd
    reported_gates = gate_sum if use_kd else torch.zeros_like(gate_sum)  # no KD term, nothing is gated
    return torch.stack([loss, ce, gdkd, sums[2] * inv_valid, sums[3] * inv_valid, sums[4] * inv_valid,
                        reported_gates * inv_valid, reported_gates, n_valid])
