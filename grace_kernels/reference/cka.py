"""Pure-PyTorch linear CKA between teacher and student token features, one sample at a time.

Signatures match :mod:`grace_kernels.ops.cka`. Differentiable through autograd (the oracle for the
kernels' closed-form backward); degenerate samples are handled with safe denominators so that
their gradient is exactly zero rather than NaN.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-6
# A sample is degenerate when its centered, normalized features carry (almost) no energy:
# trace(H K H) = ||Xc||_F^2 <= n * DEGENERATE_TOL, i.e. all tokens identical up to ~1e-4 in
# cosine space. Float32 rounding of identical rows leaves ~1e-7 per entry, far below this.
DEGENERATE_TOL = 1e-8


def as_packed(student: torch.Tensor, teacher: torch.Tensor, cu_seqlens: torch.Tensor | None, *,
              check_values: bool = True):
    """Validate and return ([total, dS], [total, dT], cu_seqlens int64 [B + 1] on the features' device).

    Raises TypeError for non-tensor or non-floating features and a cu_seqlens that is not int32/int64;
    ValueError for: ranks, token counts or devices that disagree, a zero feature dimension, no sample
    (B = 0), no token in the whole batch, and a cu_seqlens that is not 1-D, on a device other than
    the CPU or the features' one, not starting at 0, decreasing or not ending at total_tokens. The
    last three read values (one host sync, none when cu_seqlens is on the CPU) and are skipped when
    ``check_values`` is False (while torch.compile traces, on fake tensors).
    """
    for name, t in (("student_feats", student), ("teacher_feats", teacher)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_feats is on {teacher.device} but student_feats is on {student.device}")
    if cu_seqlens is None:
        if student.dim() != 3 or teacher.dim() != 3:
            raise ValueError("without cu_seqlens the features must be padded [B, n, d]; got shapes "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(f"student and teacher token counts differ: {tuple(student.shape[:2])} vs "
                             f"{tuple(teacher.shape[:2])} ([B, n])")
        b, n = student.shape[:2]
        if b == 0:
            raise ValueError("student_feats has no sample (B = 0)")
        if n == 0:
            raise ValueError("student_feats has no token (n = 0): every sample is empty")
        _check_feature_dims(student, teacher)
        cu = torch.arange(0, (b + 1) * n, n, device=student.device, dtype=torch.int64)
        return student.reshape(b * n, -1), teacher.reshape(b * n, -1), cu
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError("with cu_seqlens the features must be packed [total_tokens, d]; got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher token counts differ: {student.shape[0]} vs {teacher.shape[0]}")
    _check_feature_dims(student, teacher)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor [B + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries: no sample (it needs B + 1 >= 2)")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != student.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; it must be on the CPU or on the features' "
                         f"device {student.device}")
    if check_values:
        bounds = cu_seqlens.tolist()
        total = student.shape[0]
        if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {_short(bounds)}")
        if bounds[-1] != total:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the features have {total} tokens")
        if total == 0:
            raise ValueError("student_feats has no token (total_tokens = 0): every sample is empty")
    return student, teacher, cu_seqlens.to(device=student.device, dtype=torch.int64)


def _check_feature_dims(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, t in (("student_feats", student), ("teacher_feats", teacher)):
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has feature dimension 0")


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"{values[:12]}... ({len(values)} entries)"


def segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each sample from cumulative counts [B + 1]."""
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def normalize_center(x: torch.Tensor) -> torch.Tensor:
    """Row-wise l2 normalization (norm floored at NORM_EPS), then centering over tokens: H X."""
    xf = x.float() if x.dtype != torch.float64 else x
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return xn - xn.mean(dim=0, keepdim=True)


def cka_sample_ref(xs: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CKA, degenerate) of one sample, via the centered Gram matrices."""
    n = xs.shape[0]
    one = xs.new_ones((), dtype=torch.float64 if xs.dtype == torch.float64 else torch.float32)
    if n < 2:
        return one * 0 + (xs.sum() * 0), torch.tensor(True)
    cs, ct = normalize_center(xs), normalize_center(xt)
    ks, kt = cs @ cs.t(), ct @ ct.t()
    ts, ss, tt = (kt * ks).sum(), (ks * ks).sum(), (kt * kt).sum()
    degenerate = (cs.pow(2).sum() <= n * DEGENERATE_TOL) | (ct.pow(2).sum() <= n * DEGENERATE_TOL)
    denom = torch.where(degenerate, one, (ss * tt).clamp_min(1e-300).sqrt())
    return torch.where(degenerate, one * 0, ts / denom), degenerate


def cka_ref(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """CKA per sample, float32 [B] (float64 for float64 inputs); degenerate samples give 0."""
    return cka_stats_ref(student_feats, teacher_feats, cu_seqlens=cu_seqlens)[0]


def cka_stats_ref(student_feats, teacher_feats, *, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CKA [B], degenerate bool [B])."""
    xs, xt, cu = as_packed(student_feats, teacher_feats, cu_seqlens)
    vals, degs = [], []
    for lo, hi in segments(cu):
        v, d = cka_sample_ref(xs[lo:hi], xt[lo:hi].detach())
        vals.append(v)
        degs.append(d)
    return torch.stack(vals), torch.stack(degs).to(xs.device)


def rcka_loss_ref(student_feats, teacher_feats, *, cu_seqlens=None) -> torch.Tensor:
    """mean over samples of 1 - CKA (degenerate samples contribute 1)."""
    return (1.0 - cka_ref(student_feats, teacher_feats, cu_seqlens=cu_seqlens)).mean()


def hsic_feature_space_ref(xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """trace(K~_T K~_S) = ||Xc_T^T Xc_S||_F^2: the d x d route, cheaper than the n x n one when
    n > (dS*dT + dS^2 + dT^2) / (dS + dT) (FLOP count; see grace_kernels.ops.cka)."""
    cs, ct = normalize_center(xs), normalize_center(xt)
    return (ct.t() @ cs).pow(2).sum()


# The two Gram-level pieces of the op, with the same signatures as grace_kernels.triton.cka:
# inputs are packed, already normalized and centered per sample.


def cka_sums_ref(xs_c: torch.Tensor, xt_c: torch.Tensor, cu: torch.Tensor, n_max: int) -> torch.Tensor:
    """[B, 3]: <K~T, K~S>, <K~S, K~S>, <K~T, K~T> per sample (dense n x n per sample)."""
    rows = []
    for lo, hi in segments(cu):
        ks, kt = xs_c[lo:hi] @ xs_c[lo:hi].t(), xt_c[lo:hi] @ xt_c[lo:hi].t()
        rows.append(torch.stack([(kt * ks).sum(), (ks * ks).sum(), (kt * kt).sum()]))
    return torch.stack(rows)


def cka_grad_centered_ref(xs_c: torch.Tensor, xt_c: torch.Tensor, cu: torch.Tensor, n_max: int,
                          coef: torch.Tensor) -> torch.Tensor:
    """2 G Xc_S per sample with G = coef[b, 0] K~T + coef[b, 1] K~S."""
    out = torch.zeros_like(xs_c)
    for b, (lo, hi) in enumerate(segments(cu)):
        ks, kt = xs_c[lo:hi] @ xs_c[lo:hi].t(), xt_c[lo:hi] @ xt_c[lo:hi].t()
        out[lo:hi] = 2.0 * (coef[b, 0] * kt + coef[b, 1] * ks) @ xs_c[lo:hi]
    return out
