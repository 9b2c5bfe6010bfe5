"""Entropy-gated decoupled knowledge distillation (GRACE's GDKD) on given logits.

Shapes and dtypes:
    student_logits [N, Vs], teacher_logits [N, Vt]: float32 / float16 / bfloat16 (upcast to float32,
                   never rounded down before a softmax); Vs and Vt may differ by padding rows
    target         [N] integer, in [0, Vs) or ignore_index
    result         GatedDKDOutput of float32 scalars; the gradient reaches student_logits only

Math, per valid token i, over the common vocabulary Vc = min(Vs, Vt) (padding never enters a softmax):
    p_T = softmax(z_T / T), p_S = softmax(z_S / T)
    TCKD_i = KL([p_T(y), 1 - p_T(y)] || [p_S(y), 1 - p_S(y)])
    NCKD_i = KL(p^_T || p^_S), p^ the distribution over v != y renormalized
    DKD_i  = T^2 (tckd_weight TCKD_i + nckd_weight NCKD_i)        (kd_type="kl": T^2 KL(p_T || p_S))
    H_i    = entropy of softmax(z_T / gate_temperature);  g_i = exp(-H_i / log Vc)  (1 if gate=False)
    GDKD   = sum_i g_i DKD_i / sum_i g_i         (0, with zero gradient, when no token is valid)
All of it in log space: log(1 - p(y)) is the non-target logsumexp minus the full one, so
p_S(y) -> 0, p_T(y) -> 1 and logits of magnitude 100+ stay finite and accurate. The gate carries no
gradient. Defaults follow the paper (T = 2, weights 1 and 4, gate at temperature 1).

Raises ValueError for: ranks or token counts that do not match, non-floating logits, a common
vocabulary below 2, non-integer targets or targets outside [0, Vs) other than ignore_index, N = 0,
kd_type other than "dkd"/"kl", temperatures <= 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grace_kernels.ops import _kd_core


class GatedDKDOutput(NamedTuple):
    loss: torch.Tensor             # scalar, differentiable w.r.t. the student logits
    tckd: torch.Tensor             # mean over valid tokens (detached, like everything below)
    nckd: torch.Tensor
    teacher_entropy: torch.Tensor  # mean H_i in nats
    gate_mean: torch.Tensor
    gate_sum: torch.Tensor
    num_valid: torch.Tensor


def check_kd_args(n: int, target: torch.Tensor, vs: int, vt: int | None, *, temperature: float,
                  gate_temperature: float, kd_type: str, ignore_index: int) -> None:
    if n == 0:
        raise ValueError("no tokens: N = 0")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must be a 1-D integer tensor, got {getattr(target, 'dtype', type(target))} "
                         f"with shape {tuple(getattr(target, 'shape', ()))}")
    if target.shape[0] != n:
        raise ValueError(f"target has {target.shape[0]} tokens but the inputs have {n}")
    if vt is not None and min(vs, vt) < 2:
        raise ValueError(f"the common vocabulary min(Vs={vs}, Vt={vt}) must be at least 2")
    if kd_type not in ("dkd", "kl"):
        raise ValueError(f"kd_type must be 'dkd' or 'kl', got {kd_type!r}")
    if temperature <= 0 or gate_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {gate_temperature}")
    if not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= vs))
        if bool(bad.any()):
            raise ValueError(f"target values must be in [0, {vs}) or ignore_index={ignore_index}; "
                             f"got {target[bad][:5].tolist()}")


def check_floating(name: str, t: torch.Tensor, rank: int) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got shape {tuple(t.shape)}")


@torch.library.custom_op("grace_kernels::gated_dkd_loss", mutates_args=())
def _gated_dkd_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                  temperature: float, tckd_weight: float, nckd_weight: float, gate: bool, gate_temperature: float,
                  kd_type: str, ignore_index: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (stats [len(STATS)] float32, d loss / d student_logits or an empty tensor)."""
    n, vs = student_logits.shape
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


def _backward(ctx, grad_stats, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("gated_dkd_loss was called without grad mode or without a student that requires grad")
    return (grad_stats[0] * grad).to(grad.dtype), *([None] * 10)


_gated_dkd_op.register_autograd(_backward, setup_context=_setup)


def gated_dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float = 2.0,
    tckd_weight: float = 1.0, nckd_weight: float = 4.0, gate: bool = True, gate_temperature: float = 1.0,
    ignore_index: int = -100, kd_type: str = "dkd",
) -> GatedDKDOutput:
    """The gated DKD loss and the statistics a trainer logs (see the module docstring)."""
    check_floating("student_logits", student_logits, 2)
    check_floating("teacher_logits", teacher_logits, 2)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits has {student_logits.shape[0]} tokens, teacher_logits "
                         f"{teacher_logits.shape[0]}")
    check_kd_args(student_logits.shape[0], target, student_logits.shape[1], teacher_logits.shape[1],
                  temperature=temperature, gate_temperature=gate_temperature, kd_type=kd_type,
                  ignore_index=ignore_index)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    stats, _ = _gated_dkd_op(student_logits.contiguous(), teacher_logits.detach().contiguous(), target.contiguous(),
                             float(temperature), float(tckd_weight), float(nckd_weight), bool(gate),
                             float(gate_temperature), kd_type, int(ignore_index), compute_grad)
    # stats[0] is the loss (= GDKD here: ce_weight 0, kd_weight 1) and the entry the backward scales by.
    d = dict(zip(_kd_core.STATS, stats.detach().unbind(), strict=True))
    return GatedDKDOutput(stats[0], d["tckd"], d["nckd"], d["teacher_entropy"], d["gate_mean"], d["gate_sum"],
                          d["num_valid"])
