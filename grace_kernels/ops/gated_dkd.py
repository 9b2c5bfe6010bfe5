"""Entropy-gated decoupled knowledge distillation (GRACE's GDKD) on given logits: :func:`gated_dkd_loss`.

The math, shapes, dtypes and errors are in that function's docstring (``help(grace_kernels.gated_dkd_loss)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grace_kernels._kd_layout import check_kd_type
from grace_kernels.ops import _kd_core
from grace_kernels.ops._input_checks import (
    check_finite_number,
    check_floating,
    check_integer,
    check_positive_finite,
    check_same_device,
    values_visible,
)


class GatedDKDOutput(NamedTuple):
    loss: torch.Tensor             # scalar, differentiable w.r.t. the student logits
    tckd: torch.Tensor             # mean over valid tokens (detached, like everything below)
    nckd: torch.Tensor
    teacher_entropy: torch.Tensor  # mean H_i in nats
    gate_mean: torch.Tensor
    gate_sum: torch.Tensor
    num_valid: torch.Tensor


def check_kd_args(n: int, target: torch.Tensor, vs: int, vt: int | None, *, temperature: float,
                  gate_temperature: float, tckd_weight: float, nckd_weight: float, kd_type: str,
                  ignore_index: int) -> None:
    """The checks gated_dkd_loss and fused_linear_grace_loss share (see gated_dkd_loss's docstring)."""
    if n == 0:
        raise ValueError("no tokens: N = 0")
    check_integer("target", target)
    if target.dim() != 1:
        raise ValueError(f"target must be 1-D [N], got shape {tuple(target.shape)}")
    if target.shape[0] != n:
        raise ValueError(f"target has {target.shape[0]} tokens but the inputs have {n}")
    if vt is not None and min(vs, vt) < 2:
        raise ValueError(f"the common vocabulary min(Vs={vs}, Vt={vt}) must be at least 2")
    check_kd_type(kd_type)
    check_positive_finite("temperature", temperature)
    check_positive_finite("gate_temperature", gate_temperature)
    check_finite_number("tckd_weight", tckd_weight)
    check_finite_number("nckd_weight", nckd_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_target_values(target: torch.Tensor, vs: int, vt: int | None, ignore_index: int) -> None:
    """ValueError unless every target is in [0, Vc) or ignore_index. Called inside the ops' implementations,
    which run on real tensors in eager mode and inside compiled graphs alike (torch.compile traces only their
    fake implementations), so the rule holds the same under torch.compile."""
    # Targets index both vocabularies' logits: beyond the common one there is no teacher logit.
    vc = vs if vt is None else min(vs, vt)
    if values_visible(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= vc))
        if bool(bad.any()):  # the one host sync of the loss' input checks
            where = "the common vocabulary min(Vs, Vt)" if vt is not None and vt < vs else "the vocabulary"
            raise ValueError(f"target values must be in [0, {vc}) ({where}) or ignore_index={ignore_index}; "
                             f"got {target[bad][:5].tolist()}")


@torch.library.custom_op("grace_kernels::gated_dkd_loss", mutates_args=())
def _gated_dkd_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                  temperature: float, tckd_weight: float, nckd_weight: float, gate: bool, gate_temperature: float,
                  kd_type: str, ignore_index: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (stats [len(STATS)] float32, d loss / d student_logits or an empty tensor)."""
    n, vs = student_logits.shape
    check_target_values(target, vs, teacher_logits.shape[1], ignore_index)
    grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty(0)

    def put(lo, hi, g):
        grad[lo:hi] = g

    stats = _kd_core.kd_core(
        n, vs, teacher_logits.shape[1], target, lambda lo, hi: student_logits[lo:hi].float(),
        lambda lo, hi: teacher_logits[lo:hi].float(), put if compute_grad else None, ce_weight=0.0, kd_weight=1.0,
        temperature=temperature, tckd_weight=tckd_weight, nckd_weight=nckd_weight, gate=gate,
        gate_temperature=gate_temperature, kd_type=kd_type, ignore_index=ignore_index, chunk_size=None)
    return stats, grad


@_gated_dkd_op.register_fake
def _(student_logits, teacher_logits, target, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty(0)
    return student_logits.new_empty(len(_kd_core.STATS), dtype=torch.float32), grad


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_stats, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("gated_dkd_loss was called without grad mode or without a student that requires grad")
    # Only student_logits (the first input) is differentiable; every other input gets None.
    return (grad_stats[0] * grad).to(grad.dtype), *([None] * (ctx.num_inputs - 1))


_gated_dkd_op.register_autograd(_backward, setup_context=_setup)


def gated_dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float = 2.0,
    tckd_weight: float = 1.0, nckd_weight: float = 4.0, gate: bool = True, gate_temperature: float = 1.0,
    ignore_index: int = -100, kd_type: str = "dkd",
) -> GatedDKDOutput:
    """The gated DKD loss and the statistics a trainer logs.

    Args:
        student_logits: [N, Vs] float32 / float16 / bfloat16 (upcast to float32, never rounded down
            before a softmax); the only input the gradient reaches.
        teacher_logits: [N, Vt], same dtypes; Vt may differ from Vs by padding rows.
        target: [N] integer (not bool): the next token, in [0, Vc) or ``ignore_index``. All three
            tensors on one device.
        temperature: the distillation temperature T (> 0). tckd_weight, nckd_weight: DKD's weights.
        gate: weight each token by the teacher's confidence g_i (False: g_i = 1).
        gate_temperature: the temperature of the teacher softmax whose entropy sets the gate.
        ignore_index: target value of tokens that take no part. kd_type: "dkd" or "kl" (naive KD).

    Returns:
        :class:`GatedDKDOutput` of float32 scalars: ``loss`` (differentiable) and, detached, the means
        over valid tokens of TCKD, NCKD and the teacher entropy, the gate's mean and sum, and the count
        of valid tokens.

    Math, per valid token i, over the common vocabulary Vc = min(Vs, Vt) (padding never enters a softmax):
        p_T = softmax(z_T / T), p_S = softmax(z_S / T)
        TCKD_i = KL([p_T(y), 1 - p_T(y)] || [p_S(y), 1 - p_S(y)])
        NCKD_i = KL(p^_T || p^_S), p^ the distribution over v != y renormalized
        DKD_i  = T^2 (tckd_weight TCKD_i + nckd_weight NCKD_i)        (kd_type="kl": T^2 KL(p_T || p_S))
        H_i    = entropy of softmax(z_T / gate_temperature);  g_i = exp(-H_i / log V_i)  (1 if gate=False),
                 V_i = the number of teacher logits in [0, Vc) that are not -inf (Vc when all are finite;
                 log 2 when V_i < 2, so a one-hot teacher has gate 1)
        GDKD   = sum_i g_i DKD_i / sum_i g_i         (0, with zero gradient, when no token is valid)
    All of it in log space: log(1 - p(y)) is the non-target logsumexp minus the full one, so
    p_S(y) -> 0, p_T(y) -> 1 and logits of magnitude 100+ stay finite and accurate. The gate carries no
    gradient. Defaults follow the paper (T = 2, weights 1 and 4, gate at temperature 1).
    Targets must lie in the common vocabulary: past it there is no teacher logit to distill from.

    Non-finite logits:
        -inf in teacher_logits is probability 0 (the usual way to mask padded vocabulary columns):
            p log p -> 0 in the entropy, KL terms skip the column, and the gate counts only the other
            columns, so padding both models with -inf gives exactly the loss of the unpadded
            vocabulary. A teacher with all its mass on the target has NCKD = 0 (p^_T is undefined).
        -inf in student_logits is probability 0 for the student: where the teacher also has
            probability 0 it changes nothing; where the teacher has mass the KL is infinite and the
            loss is +inf (at the target column, not finite).
        NaN or +inf in either (any row, ignored rows included), or a teacher row whose first Vc logits
            are all -inf, propagates: the loss is not finite (NaN or +inf). It is not checked here (a
            check would cost one more pass over [N, V] and a host sync); the trainer stops on a
            non-finite loss.
        Teacher columns >= Vc are never read.

    Raises TypeError for non-floating logits or a target that is not an integer tensor (bool included);
    ValueError for: ranks or token counts that do not match, tensors on different devices, a common
    vocabulary below 2, targets outside [0, Vc) other than ignore_index, N = 0, kd_type other than
    "dkd"/"kl", temperatures that are not finite and > 0, weights that are not finite.
    """
    check_floating("student_logits", student_logits, 2)
    check_floating("teacher_logits", teacher_logits, 2)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits has {student_logits.shape[0]} tokens, teacher_logits "
                         f"{teacher_logits.shape[0]}")
    check_same_device("student_logits", student_logits, teacher_logits=teacher_logits, target=target)
    check_kd_args(student_logits.shape[0], target, student_logits.shape[1], teacher_logits.shape[1],
                  temperature=temperature, gate_temperature=gate_temperature, tckd_weight=tckd_weight,
                  nckd_weight=nckd_weight, kd_type=kd_type, ignore_index=ignore_index)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    stats, _ = _gated_dkd_op(student_logits.contiguous(), teacher_logits.detach().contiguous(), target.contiguous(),
                             float(temperature), float(tckd_weight), float(nckd_weight), bool(gate),
                             float(gate_temperature), kd_type, int(ignore_index), compute_grad)
    # stats[0] is the loss (= GDKD here: ce_weight 0, kd_weight 1) and the entry the backward scales by.
    d = dict(zip(_kd_core.STATS, stats.detach().unbind(), strict=True))
    return GatedDKDOutput(stats[0], d["tckd"], d["nckd"], d["teacher_entropy"], d["gate_mean"], d["gate_sum"],
                          d["num_valid"])
