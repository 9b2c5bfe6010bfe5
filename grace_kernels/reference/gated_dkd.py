"""Entropy-gated decoupled KD in plain PyTorch.

Two things live here, both with the signatures of their ops counterparts:

* :func:`gated_dkd_loss_ref`: the eager, autograd-differentiated definition (materializes several
  [N, V] tensors): the oracle for the tests, run in float64 for the gold values.
* :func:`kd_rows_ref` / :func:`kd_rows_grad_ref`: the row-wise statistics and the closed-form
  gradient that the chunked CPU path uses, twins of the Triton kernels in
  ``grace_kernels.triton.gated_dkd`` (same inputs, same outputs).

Non-finite logits follow the op (see grace_kernels/ops/gated_dkd.py): a teacher logit of -inf is
probability 0, and every product p * (log-ratio) is taken as 0 where p is 0 (0 log 0 = 0), through
:func:`_xmul`, so -inf never meets 0 in a product. NaN and +inf propagate.
"""

from __future__ import annotations

import torch

from grace_kernels._kd_layout import N_FIELDS, Row, kd_per_token

NEG_INF = float("-inf")


def _nontarget_lse(z: torch.Tensor, is_y: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z.masked_fill(is_y, NEG_INF), dim=-1)


def _xmul(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x, with 0 wherever p == 0 even when x is infinite (0 log 0 = 0).

    p is a teacher-side probability (never NaN for accepted input), so the gradient reaching x
    through the unselected branch is 0 * p = 0, not NaN. A NaN p is kept: it propagates.
    """
    return torch.where(p == 0, torch.zeros_like(x), p * x)


def teacher_entropy(zt_common: torch.Tensor, gate_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [c], support [c]) of softmax(zt_common / gate_temperature), row by row.

    ``support`` counts the logits that are not -inf: the vocabulary the teacher actually spans,
    which normalizes the gate (:func:`gate_weight`).
    """
    g = zt_common / gate_temperature
    log_p = g - torch.logsumexp(g, -1, keepdim=True)
    entropy = -_xmul(log_p.exp(), log_p).sum(-1)
    return entropy, (zt_common != NEG_INF).sum(-1)


def gate_weight(entropy: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """g = exp(-H / log V), V the teacher's support (at least 2: a one-hot teacher has H = 0, g = 1)."""
    log_v = torch.log(support.clamp_min(2).to(torch.float64)).to(entropy.dtype)
    return torch.exp(-entropy / log_v)


def gated_dkd_loss_ref(student_logits, teacher_logits, target, *, temperature=2.0, tckd_weight=1.0, nckd_weight=4.0,
                       gate=True, gate_temperature=1.0, ignore_index=-100, kd_type="dkd"):
    """Eager definition; returns (loss, tckd_mean, nckd_mean, entropy_mean, gate_mean, gate_sum, num_valid).

    Everything in log space: log(1 - p(y)) is taken as logsumexp over the non-target logits minus
    the full logsumexp, never as log(1 - p(y)), so that p(y) -> 0 or 1 stays accurate.
    """
    vc = min(student_logits.shape[-1], teacher_logits.shape[-1])
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    zs = student_logits[:, :vc].to(acc) / temperature
    zt = teacher_logits[:, :vc].detach().to(acc) / temperature
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    is_y = torch.arange(vc, device=zs.device).unsqueeze(0) == y

    lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
    lse_s_nt, lse_t_nt = _nontarget_lse(zs, is_y), _nontarget_lse(zt, is_y)
    log_ps_y, log_pt_y = zs.gather(1, y).squeeze(1) - lse_s, zt.gather(1, y).squeeze(1) - lse_t
    log1m_ps_y, log1m_pt_y = lse_s_nt - lse_s, lse_t_nt - lse_t
    pt_y = log_pt_y.exp()
    # A teacher with no non-target mass: p^_T is undefined and NCKD is 0 by definition.
    no_nt = (lse_t_nt == NEG_INF).unsqueeze(1)
    tckd = _xmul(pt_y, log_pt_y - log_ps_y) + _xmul(1 - pt_y, log1m_pt_y - log1m_ps_y)
    # Non-target distributions renormalized: log p^(v) = z_v - lse_nt.
    pt_hat = torch.where(is_y | no_nt, 0.0, (zt - lse_t_nt.unsqueeze(1)).exp())
    nckd = _xmul(pt_hat, (zt - lse_t_nt.unsqueeze(1)) - (zs - lse_s_nt.unsqueeze(1))).sum(-1)
    log_pt = zt - lse_t.unsqueeze(1)
    kl = _xmul(log_pt.exp(), log_pt - (zs - lse_s.unsqueeze(1))).sum(-1)
    per_token = kd_per_token(tckd, nckd, kl, kd_type=kd_type, temperature=temperature, tckd_weight=tckd_weight,
                             nckd_weight=nckd_weight)

    entropy, support = teacher_entropy(teacher_logits[:, :vc].detach().to(acc), gate_temperature)
    g = gate_weight(entropy, support) if gate else torch.ones_like(entropy)
    g = torch.where(valid, g, torch.zeros_like(g))
    gate_sum = g.sum()
    n_valid = valid.sum()
    loss = torch.where(gate_sum > 0, (g * torch.where(valid, per_token, torch.zeros_like(per_token))).sum()
                       / gate_sum.clamp_min(torch.finfo(acc).tiny), per_token.sum() * 0)
    denom = n_valid.clamp_min(1).to(acc)
    mean = lambda x: (torch.where(valid, x, torch.zeros_like(x)).sum() / denom).detach()
    return (loss, mean(tckd), mean(nckd), mean(entropy), (gate_sum / denom).detach(), gate_sum.detach(), n_valid)


def kd_rows_ref(zs: torch.Tensor, zt: torch.Tensor | None, target: torch.Tensor, *, vc: int, temperature: float,
                gate_temperature: float, ignore_index: int) -> torch.Tensor:
    """Per-row statistics [c, N_FIELDS] (columns: :class:`Row`) float32 of one chunk of float32 logits.

    zs [c, Vs] student logits; zt [c, Vt] teacher logits or None (CE only: the KD columns are 0).
    Rows whose target is ignore_index get finite values that the caller masks out.
    """
    c = zs.shape[0]
    out = torch.zeros(c, N_FIELDS, device=zs.device, dtype=torch.float32)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    lse_ce = torch.logsumexp(zs, -1)
    out[:, Row.LSE_CE] = lse_ce
    out[:, Row.CE] = lse_ce - zs.gather(1, y).squeeze(1)
    if zt is None:
        return out
    t = temperature
    s, tt = zs[:, :vc] / t, zt[:, :vc] / t
    is_y = torch.arange(vc, device=zs.device).unsqueeze(0) == y
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(tt, -1)
    lse_s_nt, lse_t_nt = _nontarget_lse(s, is_y), _nontarget_lse(tt, is_y)
    log_ps_y, log_pt_y = s.gather(1, y).squeeze(1) - lse_s, tt.gather(1, y).squeeze(1) - lse_t
    pt_y = log_pt_y.exp()
    out[:, Row.TCKD] = _xmul(pt_y, log_pt_y - log_ps_y) + _xmul(1 - pt_y, (lse_t_nt - lse_t) - (lse_s_nt - lse_s))
    log_pt_hat = tt - lse_t_nt.unsqueeze(1)
    d_nt = log_pt_hat - (s - lse_s_nt.unsqueeze(1))
    no_nt = (lse_t_nt == NEG_INF).unsqueeze(1)  # all teacher mass on y: NCKD is 0
    out[:, Row.NCKD] = _xmul(torch.where(is_y | no_nt, 0.0, log_pt_hat.exp()), d_nt).sum(-1)
    log_pt = tt - lse_t.unsqueeze(1)
    out[:, Row.KL] = _xmul(log_pt.exp(), log_pt - (s - lse_s.unsqueeze(1))).sum(-1)
    out[:, Row.ENTROPY] = teacher_entropy(zt[:, :vc], gate_temperature)[0]
    for col, val in ((Row.LSE_S_NT, lse_s_nt), (Row.LSE_T_NT, lse_t_nt), (Row.LSE_S, lse_s), (Row.LSE_T, lse_t),
                     (Row.LOG_PS_Y, log_ps_y), (Row.LOG_PT_Y, log_pt_y)):
        out[:, col] = val
    return out


def kd_rows_grad_ref(zs: torch.Tensor, zt: torch.Tensor | None, target: torch.Tensor, rows: torch.Tensor,
                     coef_kd: torch.Tensor, coef_ce: torch.Tensor, *, vc: int, temperature: float, tckd_weight: float,
                     nckd_weight: float, kd_type: str, ignore_index: int) -> torch.Tensor:
    """d loss / d student logits [c, Vs] float32 for one chunk, in closed form.

    With p^ the non-target distributions renormalized (p^(v) = p(v) / (1 - p(y))):
        DKD,  v != y:  coef_kd * T * (w_tc * p^_S(v) (p_T(y) - p_S(y)) + w_nc (p^_S(v) - p^_T(v)))
        DKD,  v == y:  coef_kd * T * w_tc * (p_S(y) - p_T(y))
        KL:            coef_kd * T * (p_S(v) - p_T(v))
        CE:          + coef_ce * (softmax(z_S)(v) - [v == y])      over the student's full vocabulary
    coef_kd carries kd_weight * g_i / sum g, coef_ce carries ce_weight / N_valid (0 on ignored rows).
    """
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    grad = (zs - rows[:, Row.LSE_CE].unsqueeze(1)).exp()
    grad.scatter_add_(1, y, -torch.ones_like(y, dtype=grad.dtype))
    grad.mul_(coef_ce.unsqueeze(1))
    if zt is None:
        return grad
    t = temperature
    s, tt = zs[:, :vc] / t, zt[:, :vc] / t
    is_y = torch.arange(vc, device=zs.device).unsqueeze(0) == y
    if kd_type == "dkd":
        ps_y, pt_y = rows[:, Row.LOG_PS_Y].exp(), rows[:, Row.LOG_PT_Y].exp()
        ps_hat = (s - rows[:, Row.LSE_S_NT].unsqueeze(1)).exp()
        # A teacher with no non-target mass has NCKD = 0: no NCKD gradient on that row.
        no_nt = (rows[:, Row.LSE_T_NT] == NEG_INF).unsqueeze(1)
        pt_hat = torch.where(no_nt, 0.0, (tt - rows[:, Row.LSE_T_NT].unsqueeze(1)).exp())
        w_nc = torch.where(no_nt, 0.0, nckd_weight)
        kd = tckd_weight * ps_hat * (pt_y - ps_y).unsqueeze(1) + w_nc * (ps_hat - pt_hat)
        kd = torch.where(is_y, (tckd_weight * (ps_y - pt_y)).unsqueeze(1), kd)
    else:
        kd = (s - rows[:, Row.LSE_S].unsqueeze(1)).exp() - (tt - rows[:, Row.LSE_T].unsqueeze(1)).exp()
    grad[:, :vc] += (t * coef_kd).unsqueeze(1) * kd
    return grad
