"""Relational centered kernel alignment (RCKA) between student and teacher token features: :func:`cka` and
:func:`rcka_loss` (shapes, dtypes, math and errors in their docstrings).

Routes: trace(K~_T K~_S) is also ||Xc_T^T Xc_S||_F^2 (a dT x dS product). Counting multiply-adds
for the three products, the n x n Gram route costs n^2 (dS + dT) and the feature route
n (dS dT + dS^2 + dT^2), so Gram wins for n < (dS dT + dS^2 + dT^2) / (dS + dT): about 6,100 tokens
for (4096, 5120) and 3,200 for (1536, 3584). Visual tokens per image (576 for LLaVA-1.5, up to a few
thousand for Qwen2-VL) are always on the Gram side, which is what the Triton kernel implements
(a FLOP count, not a GPU measurement).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grace_kernels._backend import select_backend
from grace_kernels.ops._input_checks import values_visible
from grace_kernels.reference import cka as ref


class RCKAOutput(NamedTuple):
    loss: torch.Tensor            # scalar float32: mean over samples of 1 - CKA
    cka: torch.Tensor             # [B] float32, detached
    num_degenerate: torch.Tensor  # int64 scalar: samples with n < 2 or a zero centered Gram matrix


def _seg_mean(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    # segment_reduce is deterministic on GPUs, unlike index_add_ (atomics).
    s = torch.segment_reduce(x, "sum", lengths=lens, axis=0)
    return s / lens.clamp_min(1).unsqueeze(-1).to(s.dtype)


def _normalize_center(x: torch.Tensor, lens: torch.Tensor):
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    xn = xf / norm.clamp_min(ref.NORM_EPS)
    xc = xn - _seg_mean(xn, lens).repeat_interleave(lens, dim=0)
    return xc, xn, norm


def _degenerate(xs_c, xt_c, lens):
    n = lens.to(torch.float32)
    tr_s = torch.segment_reduce(xs_c.pow(2).sum(-1), "sum", lengths=lens, axis=0)
    tr_t = torch.segment_reduce(xt_c.pow(2).sum(-1), "sum", lengths=lens, axis=0)
    return (lens < 2) | (tr_s <= n * ref.DEGENERATE_TOL) | (tr_t <= n * ref.DEGENERATE_TOL)


def _gram_impl(device: torch.device):
    """(sums, grad_centered) of the selected backend; everything else is shared PyTorch."""
    if select_backend("cka", device) == "triton":
        from grace_kernels.triton import cka as tri

        return tri.cka_sums, tri.cka_grad_centered
    return ref.cka_sums_ref, ref.cka_grad_centered_ref


# --------------------------------------------------------------------------------------------
# torch.library ops on packed inputs; cu_seqlens is int64 [B + 1].


def _lengths(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    """(per-sample lengths, the longest) after checking that cu_seqlens covers [0, total] in order.

    The public wrappers check this too; here it guards the torch.ops entry points, because the
    Triton kernels address rows cu[b] .. cu[b + 1] without a bound on total. One host sync, which
    the kernels' tiling (the longest sample) needs anyway.
    """
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or last != total or shortest < 0:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at total_tokens={total}; got "
                         f"first {first}, last {last}, shortest sample {shortest}")
    return lens, longest


@torch.library.custom_op("grace_kernels::cka", mutates_args=())
def _cka_op(student: torch.Tensor, teacher: torch.Tensor,
            cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (cka [B], stats [B, 4] = <T,S>, <S,S>, <T,T>, degenerate)."""
    sums_fn, _ = _gram_impl(student.device)
    lens, n_max = _lengths(cu_seqlens, student.shape[0])
    xs_c, _, _ = _normalize_center(student, lens)
    xt_c, _, _ = _normalize_center(teacher, lens)
    sums = sums_fn(xs_c, xt_c, cu_seqlens, n_max)
    deg = _degenerate(xs_c, xt_c, lens)
    ts, ss, tt = sums.unbind(1)
    denom = torch.where(deg, torch.ones_like(ss), (ss * tt).clamp_min(1e-30).sqrt())
    vals = torch.where(deg, torch.zeros_like(ts), ts / denom)
    return vals, torch.cat([sums, deg.float().unsqueeze(1)], 1)


@_cka_op.register_fake
def _(student, teacher, cu_seqlens):
    b = cu_seqlens.shape[0] - 1
    return student.new_empty(b, dtype=torch.float32), student.new_empty(b, 4, dtype=torch.float32)


@torch.library.custom_op("grace_kernels::cka_backward", mutates_args=())
def _cka_backward_op(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, cu_seqlens: torch.Tensor,
                     stats: torch.Tensor) -> torch.Tensor:
    _, grad_fn = _gram_impl(student.device)
    lens, n_max = _lengths(cu_seqlens, student.shape[0])
    xs_c, xs_n, norm = _normalize_center(student, lens)
    xt_c, _, _ = _normalize_center(teacher, lens)
    ts, ss, tt, deg = stats.unbind(1)
    ok = deg == 0
    inv = torch.where(ok, (ss * tt).clamp_min(1e-30).rsqrt(), torch.zeros_like(ss))
    # d CKA / d K~_S = (K~_T - (a / b) K~_S) / sqrt(b c)
    coef = torch.stack([grad * inv, -grad * inv * ts / torch.where(ok, ss, torch.ones_like(ss))], 1)
    g_c = grad_fn(xs_c, xt_c, cu_seqlens, n_max, coef.float())
    # Through H: subtract each sample's mean gradient. Through the normalization: remove the radial
    # component and divide by the norm (or by eps where the norm was floored).
    g_n = g_c - _seg_mean(g_c, lens).repeat_interleave(lens, dim=0)
    radial = (xs_n * g_n).sum(-1, keepdim=True)
    g_x = torch.where(norm > ref.NORM_EPS, (g_n - xs_n * radial) / norm.clamp_min(ref.NORM_EPS),
                      g_n / ref.NORM_EPS)
    return g_x.to(student.dtype)


@_cka_backward_op.register_fake
def _(grad, student, teacher, cu_seqlens, stats):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, cu = inputs
    ctx.save_for_backward(student, teacher, cu, output[1])


def _backward(ctx, grad_cka, grad_stats):
    student, teacher, cu, stats = ctx.saved_tensors
    if grad_cka is None:
        return None, None, None
    return _cka_backward_op(grad_cka.contiguous(), student, teacher, cu, stats), None, None


_cka_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _run(student_feats, teacher_feats, cu_seqlens):
    xs, xt, cu = ref.as_packed(student_feats, teacher_feats, cu_seqlens,
                               check_values=values_visible(student_feats, teacher_feats, cu_seqlens))
    for name, t in (("student_feats", xs), ("teacher_feats", xt)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return _cka_op(xs.contiguous(), xt.detach().contiguous(), cu)


def cka(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
        cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Linear CKA per sample: float32 [B], differentiable w.r.t. ``student_feats``.

    Args:
        student_feats: [B, n, dS] padded-equal, or [total, dS] packed with ``cu_seqlens``; float32 / float16 /
            bfloat16 / float64. The only input the gradient reaches.
        teacher_feats: [B, n, dT] / [total, dT], same dtypes; dS and dT independent.
        cu_seqlens: int32/int64 [B + 1], cumulative token counts starting at 0 (varlen convention), on the
            CPU or the features' device; None for padded-equal [B, n, d] inputs.

    Math, per sample with n tokens (V_S [n, dS], V_T [n, dT]):
        X     = V / max(||v||_2, 1e-6)            row-wise
        K     = X X^T,   K~ = H K H = (H X)(H X)^T  with H = I - 11^T / n
        HSIC(A, B) = trace(A~ B~) / (n - 1)^2
        CKA   = HSIC(K_T, K_S) / sqrt(HSIC(K_T, K_T) HSIC(K_S, K_S))
        rcka_loss = mean_b (1 - CKA_b)
    A sample with n < 2, or whose centered features are (numerically) zero for either model (all
    tokens identical after normalization), has CKA 0 (loss 1) and zero gradient, and is counted in
    ``RCKAOutput.num_degenerate``. Gradients flow to the student features only.

    A sample with zero tokens (an image that contributed none) is degenerate as above; a batch with no
    sample, or with no token at all, is an error. NaN or Inf in a sample's features propagates: that
    sample's CKA and the loss are NaN (unchecked; the trainer stops on a non-finite loss).

    Raises TypeError for non-floating features and a cu_seqlens that is not int32/int64; ValueError for:
    wrong ranks, student/teacher token counts or devices that differ, a zero feature dimension, B = 0,
    no token in the batch, and a cu_seqlens that is not 1-D, not on the CPU or the features' device,
    not starting at 0, decreasing, or not ending at total_tokens. The value checks of cu_seqlens cost one
    host sync (none for a CPU cu_seqlens); under torch.compile the op checks the same rules at run time,
    with one combined message.
    """
    return _run(student_feats, teacher_feats, cu_seqlens)[0]


def rcka_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
              return_stats: bool = False) -> torch.Tensor | RCKAOutput:
    """RCKA: the mean over samples of 1 - CKA (see :func:`cka` for the math and the errors).

    Args:
        student_feats, teacher_feats, cu_seqlens: as in :func:`cka`.
        return_stats: also return the per-sample CKA and the count of degenerate samples.

    Returns:
        A float32 scalar, differentiable w.r.t. ``student_feats``; with ``return_stats`` an
        :class:`RCKAOutput` (loss, cka [B] detached, num_degenerate int64).

    Raises:
        TypeError, ValueError: as :func:`cka`.
    """
    vals, stats = _run(student_feats, teacher_feats, cu_seqlens)
    loss = (1.0 - vals).mean()
    if not return_stats:
        return loss
    return RCKAOutput(loss, vals.detach(), (stats[:, 3] > 0).sum())
