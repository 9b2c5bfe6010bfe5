"""Triton kernels for the gated DKD loss: one pass over the vocabulary for every per-row statistic,
one pass for the gradient. Twins of ``kd_rows_ref`` / ``kd_rows_grad_ref`` (same signatures).

Pass 1, one program per row, streams the student and teacher logits once in BLOCK_V slices and keeps
online (running max, rescaled sum) pairs for:
    the student and the teacher at temperature T over the non-target vocabulary (target excluded),
    the NCKD cross term sum_{v != y} e^{t_v - m} (t_v - s_v),
    the teacher at the gate temperature (entropy: sum e^{g_v - m} g_v alongside the sum),
    the student at temperature 1 over its full vocabulary (cross-entropy).
Target logits are read directly. Everything else (TCKD, NCKD, KL, the full log-sum-exps) follows in
closed form from these, in log space: log(1 - p(y)) = lse_nt - logaddexp(lse_nt, z_y), accurate when
p(y) -> 1, where 1 - p(y) would round to 0.

Running maxima start at -inf; a slice whose entries are all masked would make exp(-inf - -inf) NaN,
so the rescale uses a safe max of 0 when the running max is still -inf.

A teacher logit of -inf is probability 0 (see grace_kernels/ops/gated_dkd.py): every product of a
teacher probability with a log-ratio is taken as 0 where the probability is 0, and a teacher with
no non-target mass has NCKD 0. The guards test for exactly -inf or exactly 0, so NaN still
propagates: maxima may drop a NaN on GPUs, but the running sums of exp() carry it.

The row layout (which statistic sits in which column of ``out`` / ``rows``) is
``grace_kernels._kd_layout.Row``, read in the kernels as ``_kd_layout.Row.<NAME>``: Triton resolves
module attributes at compile time, so each offset is a constant of the compiled kernel.

Every load is masked or indexed by the program id within its buffer; the target column is loaded
under a mask as well (a target past the common vocabulary reads NaN, never another tensor's
memory), although the op wrapper rejects such targets before any launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grace_kernels import _kd_layout
from grace_kernels._kd_layout import N_FIELDS
from grace_kernels.kernel_spec import KernelSpec

BLOCK_V = 1024
NEG_INF = tl.constexpr(float("-inf"))
NAN = tl.constexpr(float("nan"))


@triton.jit
def _online(m, s, x):
    """Fold the slice x (masked entries -inf) into the running (max, sum of exp)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    return m_new, s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0), safe


@triton.jit
def _kd_rows_kernel(zs_ptr, zt_ptr, tgt_ptr, out_ptr, vs, vt, vc, inv_t, inv_tg, ignore_index,
                    HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(tgt_ptr + row)
    y = tl.where(y == ignore_index, 0, y)
    zs_row = zs_ptr + row * vs
    zt_row = zt_ptr + row * vt
    cols0 = tl.arange(0, BLOCK_V)

    m_c = NEG_INF
    s_c = 0.0
    m_s = NEG_INF
    s_s = 0.0
    m_t = NEG_INF
    s_t = 0.0
    cross = 0.0
    m_g = NEG_INF
    s_g = 0.0
    e_g = 0.0
    for start in range(0, vs, BLOCK_V):
        cols = start + cols0
        in_s = cols < vs
        zs = tl.load(zs_row + cols, mask=in_s, other=0.0)
        m_c, s_c, _ = _online(m_c, s_c, tl.where(in_s, zs, NEG_INF))
        if HAS_TEACHER:
            if start < vc:
                nt = (cols < vc) & (cols != y)
                zt = tl.load(zt_row + cols, mask=cols < vc, other=0.0)
                s_scaled = zs * inv_t
                t_scaled = zt * inv_t
                m_s, s_s, _ = _online(m_s, s_s, tl.where(nt, s_scaled, NEG_INF))
                m_t_old = m_t
                m_t, s_t, safe_t = _online(m_t, s_t, tl.where(nt, t_scaled, NEG_INF))
                w = tl.where(nt, tl.exp(t_scaled - safe_t), 0.0)
                # 0 where the teacher has probability 0: t = -inf would make 0 * -inf.
                cross = cross * tl.exp(m_t_old - safe_t) + tl.sum(tl.where(w == 0.0, 0.0, w * (t_scaled - s_scaled)),
                                                                  axis=0)
                g = zt * inv_tg
                m_g_old = m_g
                m_g, s_g, safe_g = _online(m_g, s_g, tl.where(cols < vc, g, NEG_INF))
                plogp = tl.where((cols < vc) & (g != NEG_INF), tl.exp(g - safe_g) * g, 0.0)
                e_g = e_g * tl.exp(m_g_old - safe_g) + tl.sum(plogp, axis=0)

    out = out_ptr + row * _kd_layout.N_FIELDS
    zs_y = tl.load(zs_row + y, mask=(y >= 0) & (y < vs), other=NAN)
    lse_ce = m_c + tl.log(s_c)
    tl.store(out + _kd_layout.Row.CE, lse_ce - zs_y)
    tl.store(out + _kd_layout.Row.LSE_CE, lse_ce)
    if HAS_TEACHER:
        zt_y = tl.load(zt_row + y, mask=(y >= 0) & (y < vc), other=NAN)
        sy = zs_y * inv_t
        ty = zt_y * inv_t
        lse_s_nt = m_s + tl.log(s_s)
        lse_t_nt = m_t + tl.log(s_t)
        lse_s = tl.maximum(lse_s_nt, sy) + tl.log(1.0 + tl.exp(-tl.abs(lse_s_nt - sy)))
        lse_t = tl.maximum(lse_t_nt, ty) + tl.log(1.0 + tl.exp(-tl.abs(lse_t_nt - ty)))
        log_ps_y = sy - lse_s
        log_pt_y = ty - lse_t
        pt_y = tl.exp(log_pt_y)
        # No teacher mass off the target (s_t == 0): p^_T is undefined, NCKD is 0 by definition.
        no_nt = lse_t_nt == NEG_INF
        tc_y = tl.where(log_pt_y == NEG_INF, 0.0, pt_y * (log_pt_y - log_ps_y))
        tc_nt = tl.where(no_nt, 0.0, (1.0 - pt_y) * ((lse_t_nt - lse_t) - (lse_s_nt - lse_s)))
        tckd = tc_y + tc_nt
        # sum_{v != y} p^_T (t - s) = cross / s_t; NCKD adds the two non-target normalizers.
        xn = cross / s_t
        nckd = tl.where(no_nt, 0.0, xn - lse_t_nt + lse_s_nt)
        kl_y = tl.where(log_pt_y == NEG_INF, 0.0, pt_y * (ty - sy))
        kl = kl_y + tl.where(no_nt, 0.0, (1.0 - pt_y) * xn) - lse_t + lse_s
        entropy = m_g + tl.log(s_g) - e_g / s_g
        tl.store(out + _kd_layout.Row.TCKD, tckd)
        tl.store(out + _kd_layout.Row.NCKD, nckd)
        tl.store(out + _kd_layout.Row.KL, kl)
        tl.store(out + _kd_layout.Row.ENTROPY, entropy)
        tl.store(out + _kd_layout.Row.LSE_S_NT, lse_s_nt)
        tl.store(out + _kd_layout.Row.LSE_T_NT, lse_t_nt)
        tl.store(out + _kd_layout.Row.LSE_S, lse_s)
        tl.store(out + _kd_layout.Row.LSE_T, lse_t)
        tl.store(out + _kd_layout.Row.LOG_PS_Y, log_ps_y)
        tl.store(out + _kd_layout.Row.LOG_PT_Y, log_pt_y)


@triton.jit
def _kd_grad_kernel(zs_ptr, zt_ptr, tgt_ptr, rows_ptr, coef_kd_ptr, coef_ce_ptr, grad_ptr, vs, vt, vc, t, inv_t,
                    w_tc, w_nc, ignore_index, HAS_TEACHER: tl.constexpr, IS_DKD: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(tgt_ptr + row)
    y = tl.where(y == ignore_index, 0, y)
    rows = rows_ptr + row * _kd_layout.N_FIELDS
    lse_ce = tl.load(rows + _kd_layout.Row.LSE_CE)
    c_ce = tl.load(coef_ce_ptr + row)
    c_kd = tl.load(coef_kd_ptr + row) * t
    lse_s_nt = tl.load(rows + _kd_layout.Row.LSE_S_NT)
    lse_t_nt = tl.load(rows + _kd_layout.Row.LSE_T_NT)
    lse_s = tl.load(rows + _kd_layout.Row.LSE_S)
    lse_t = tl.load(rows + _kd_layout.Row.LSE_T)
    ps_y = tl.exp(tl.load(rows + _kd_layout.Row.LOG_PS_Y))
    pt_y = tl.exp(tl.load(rows + _kd_layout.Row.LOG_PT_Y))
    # A teacher with no non-target mass has NCKD 0, hence no NCKD gradient on this row.
    no_nt = lse_t_nt == NEG_INF
    w_nc_row = tl.where(no_nt, 0.0, w_nc)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, vs, BLOCK_V):
        cols = start + cols0
        in_s = cols < vs
        zs = tl.load(zs_ptr + row * vs + cols, mask=in_s, other=0.0)
        is_y = cols == y
        g = c_ce * (tl.exp(zs - lse_ce) - tl.where(is_y, 1.0, 0.0))
        if HAS_TEACHER:
            in_c = cols < vc
            zt = tl.load(zt_ptr + row * vt + cols, mask=in_c, other=0.0)
            s = zs * inv_t
            tt = zt * inv_t
            if IS_DKD:
                # The target column is excluded before exp: p^(y) is undefined and e^{z_y - lse_nt}
                # overflows when the teacher is certain.
                ps_hat = tl.exp(tl.where(is_y, NEG_INF, s) - lse_s_nt)
                pt_hat = tl.where(no_nt, 0.0, tl.exp(tl.where(is_y, NEG_INF, tt) - lse_t_nt))
                kd = w_tc * ps_hat * (pt_y - ps_y) + w_nc_row * (ps_hat - pt_hat)
                kd = tl.where(is_y, w_tc * (ps_y - pt_y), kd)
            else:
                kd = tl.exp(s - lse_s) - tl.exp(tt - lse_t)
            g += tl.where(in_c, c_kd * kd, 0.0)
        tl.store(grad_ptr + row * vs + cols, g, mask=in_s)


def _check_chunk(zs, zt, target, vc, *per_row):
    # The kernels index rows by program id and assume contiguous rows: shapes that disagree would
    # read past a buffer. The op wrappers guarantee them; this guards the torch.ops entry points.
    c, vs = zs.shape
    vt = zt.shape[1] if zt is not None else vs
    if target.shape != (c,) or (zt is not None and zt.shape[0] != c) or not 0 < vc <= min(vs, vt):
        raise ValueError(f"inconsistent chunk: student {tuple(zs.shape)}, teacher "
                         f"{None if zt is None else tuple(zt.shape)}, target {tuple(target.shape)}, vc {vc}")
    for t in per_row:
        if t.shape[0] != c:
            raise ValueError(f"a per-row input has {t.shape[0]} rows for a chunk of {c}")


def kd_rows(zs, zt, target, *, vc, temperature, gate_temperature, ignore_index):
    _check_chunk(zs, zt, target, vc)
    zs, target = zs.contiguous(), target.contiguous()
    zt = zt.contiguous() if zt is not None else None
    c, vs = zs.shape
    out = torch.zeros(c, N_FIELDS, device=zs.device, dtype=torch.float32)
    has_t = zt is not None
    _kd_rows_kernel[(c,)](zs, zt if has_t else zs, target, out, vs, zt.shape[1] if has_t else vs, vc,
                          1.0 / temperature, 1.0 / gate_temperature, ignore_index, HAS_TEACHER=has_t,
                          BLOCK_V=BLOCK_V)
    return out


def kd_rows_grad(zs, zt, target, rows, coef_kd, coef_ce, *, vc, temperature, tckd_weight, nckd_weight, kd_type,
                 ignore_index):
    _check_chunk(zs, zt, target, vc, rows, coef_kd, coef_ce)
    if rows.dim() != 2 or rows.shape[1] != N_FIELDS:
        raise ValueError(f"rows must be [c, {N_FIELDS}] (grace_kernels._kd_layout.Row), got {tuple(rows.shape)}")
    zs, target, rows = zs.contiguous(), target.contiguous(), rows.contiguous()
    zt = zt.contiguous() if zt is not None else None
    c, vs = zs.shape
    grad = torch.empty_like(zs)
    has_t = zt is not None
    _kd_grad_kernel[(c,)](zs, zt if has_t else zs, target, rows, coef_kd.contiguous(), coef_ce.contiguous(), grad, vs,
                          zt.shape[1] if has_t else vs, vc, float(temperature), 1.0 / temperature, float(tckd_weight),
                          float(nckd_weight), ignore_index, HAS_TEACHER=has_t, IS_DKD=kd_type == "dkd",
                          BLOCK_V=BLOCK_V)
    return grad


_SIG_ROWS = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "tgt_ptr": "*i64", "out_ptr": "*fp32", "vs": "i32", "vt": "i32",
             "vc": "i32", "inv_t": "fp32", "inv_tg": "fp32", "ignore_index": "i64"}
_SIG_GRAD = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "tgt_ptr": "*i64", "rows_ptr": "*fp32", "coef_kd_ptr": "*fp32",
             "coef_ce_ptr": "*fp32", "grad_ptr": "*fp32", "vs": "i32", "vt": "i32", "vc": "i32", "t": "fp32",
             "inv_t": "fp32", "w_tc": "fp32", "w_nc": "fp32", "ignore_index": "i64"}
AOT_SPECS = [
    KernelSpec(_kd_rows_kernel, _SIG_ROWS, {"HAS_TEACHER": True, "BLOCK_V": BLOCK_V}, label="teacher"),
    KernelSpec(_kd_rows_kernel, _SIG_ROWS, {"HAS_TEACHER": False, "BLOCK_V": BLOCK_V}, label="ce-only"),
    KernelSpec(_kd_grad_kernel, _SIG_GRAD, {"HAS_TEACHER": True, "IS_DKD": True, "BLOCK_V": BLOCK_V}, label="dkd"),
    KernelSpec(_kd_grad_kernel, _SIG_GRAD, {"HAS_TEACHER": True, "IS_DKD": False, "BLOCK_V": BLOCK_V}, label="kl"),
]
