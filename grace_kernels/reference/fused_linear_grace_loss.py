"""The unfused eager composition: both LM-head GEMMs, the full float32 logits, gated DKD and
cross-entropy through autograd. The oracle for fused_linear_grace_loss and the baseline of its
memory benchmark (it holds several [N, V] float32 tensors). Non-finite values behave as in
gated_dkd_loss_ref: -inf logits are probability 0, NaN and +inf propagate. No input checks: the
op wrapper is where inputs are checked."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grace_kernels.reference.gated_dkd import gated_dkd_loss_ref


def fused_linear_grace_loss_ref(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                                target=None, *, teacher_logits=None, ce_weight=1.0, kd_weight=1.0, student_bias=None,
                                teacher_bias=None, temperature=2.0, tckd_weight=1.0, nckd_weight=4.0, gate=True,
                                gate_temperature=1.0, kd_type="dkd", ignore_index=-100, chunk_size=None):
    """Returns (loss, ce, gdkd, tckd, nckd, teacher_entropy, gate_mean, gate_sum, num_valid)."""
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    bias = None if student_bias is None else student_bias.to(acc)
    zs = F.linear(student_hidden.to(acc), student_weight.to(acc), bias)
    n_valid = (target != ignore_index).sum()
    ce = F.cross_entropy(zs, target, ignore_index=ignore_index, reduction="sum") / n_valid.clamp_min(1)
    if kd_weight == 0.0:
        zero = zs.new_zeros(())
        return (ce_weight * ce, ce.detach(), zero, zero, zero, zero, zero, zero, n_valid)
    with torch.no_grad():
        if teacher_logits is None:
            teacher_logits = F.linear(teacher_hidden.to(acc), teacher_weight.to(acc),
                                      None if teacher_bias is None else teacher_bias.to(acc))
    kd = gated_dkd_loss_ref(zs, teacher_logits.to(acc), target, temperature=temperature, tckd_weight=tckd_weight,
                            nckd_weight=nckd_weight, gate=gate, gate_temperature=gate_temperature,
                            ignore_index=ignore_index, kd_type=kd_type)
    gdkd = kd[0]
    return (ce_weight * ce + kd_weight * gdkd, ce.detach(), gdkd.detach(), *kd[1:])
