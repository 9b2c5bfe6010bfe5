"""Pure-PyTorch group-wise LSQ: the oracle for the Triton kernels and the CPU path.

Signatures match :mod:`grace_kernels.ops.lsq`. The forward/backward pair here is written out by
hand (no autograd) so that the kernels can be compared term by term; ``tests/test_lsq.py`` checks
this hand-written backward against autograd of an independent float64 formulation.
"""

from __future__ import annotations

import torch

# Per-group scales are floored here so that an all-zero group still has a finite log-scale.
MIN_SCALE = 1e-8
# Log-scales the ops accept: exp() of them is a normal, finite float32 (FLT_MIN ~ e^-87.3, FLT_MAX
# ~ e^88.7). Outside it the scale is 0 or inf and a whole group quantizes to 0 or NaN.
LOG_SCALE_RANGE = (-87.0, 88.0)


def qrange(bits: int) -> tuple[int, int]:
    """(Qn, Qp) with codes in [-Qn, Qp]: INT4 is (8, 7)."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def effective_scale(log_scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """exp(log_scale) in float32, rounded to ``scale_dtype`` (fp16/bf16) when given.

    The rounded value is what an INT4 checkpoint stores; clamping to the dtype's smallest normal
    keeps a tiny scale from underflowing to zero (which would turn w / s into inf).
    """
    s = torch.exp(log_scale.float())
    if scale_dtype is not None:
        s = s.clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
    return s


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] // group_size, group_size)


def _quantize(weight, s, bits, group_size):
    qn, qp = qrange(bits)
    v = _grouped(weight.float(), group_size) / s.unsqueeze(-1)
    q = torch.round(v.clamp(-qn, qp))  # round half to even; clamping first keeps |v| small
    return v, q


def lsq_fake_quant_ref(
    weight: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 4, group_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Forward of :func:`grace_kernels.lsq_fake_quant` (no autograd)."""
    s = effective_scale(log_scale, scale_dtype)
    _, q = _quantize(weight, s, bits, group_size)
    return (q * s.unsqueeze(-1)).reshape(weight.shape).to(weight.dtype)


def lsq_fake_quant_backward_ref(
    grad_out: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 4,
    group_size: int = 128, grad_scale: float | None = None, scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through backward: (d weight in weight's dtype, d log_scale float32)."""
    qn, qp = qrange(bits)
    s = effective_scale(log_scale, scale_dtype)
    v, q = _quantize(weight, s, bits, group_size)
    inside = (v >= -qn) & (v <= qp)
    g = _grouped(grad_out.float(), group_size)
    grad_w = torch.where(inside, g, torch.zeros_like(g)).reshape(weight.shape).to(weight.dtype)
    gsum = (torch.where(inside, q - v, q) * g).sum(-1)
    gs = default_grad_scale(group_size, bits) if grad_scale is None else grad_scale
    # d s / d log_scale = s, taken on the unrounded scale: rounding to scale_dtype is straight-through.
    grad_log = gs * torch.exp(log_scale.float()) * gsum
    return grad_w, grad_log


def default_grad_scale(group_size: int, bits: int) -> float:
    """LSQ's gradient scale 1 / sqrt(N * Qp), N the number of weights sharing one scale."""
    return 1.0 / (group_size * qrange(bits)[1]) ** 0.5


def lsq_quantize_ref(
    weight: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 4, group_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], scales [out, in // group_size] in scale_dtype or float32)."""
    s = effective_scale(log_scale, scale_dtype)
    _, q = _quantize(weight, s, bits, group_size)
    return q.reshape(weight.shape).to(torch.int8), s.to(scale_dtype or torch.float32)


def _abs_percentile(a: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per-row percentile with linear interpolation (torch.quantile's rule) via a sort.

    torch.quantile refuses inputs above 2**24 elements, which a 11008 x 4096 layer exceeds.
    """
    srt = a.sort(dim=-1).values
    pos = percentile * (a.shape[-1] - 1)
    lo = int(pos)
    hi = min(lo + 1, a.shape[-1] - 1)
    frac = pos - lo
    return srt[..., lo] + (srt[..., hi] - srt[..., lo]) * frac


def lsq_init_log_scale_ref(
    weight: torch.Tensor, *, bits: int = 4, group_size: int = 128, percentile: float = 0.99,
    method: str = "percentile", mse_grid: int = 40, rows_per_chunk: int = 1024,
) -> torch.Tensor:
    """Initial log-scales, float32 [out, in // group_size].

    percentile: log(P_percentile(|W_group|) / Qp), the paper's rule.
    mse: per group, the clipping ratio r of max|W_group| on a grid of ``mse_grid`` values in
    (0, 1] minimising sum (fake_quant(W_group, r * max / Qp) - W_group)^2 (the authors' released code).
    """
    qn, qp = qrange(bits)
    out = []
    # Chunked over rows so an 11008 x 4096 layer does not need several float32 copies at once.
    for chunk in weight.split(rows_per_chunk, dim=0):
        a = _grouped(chunk.float(), group_size).abs()
        if method == "percentile":
            s = _abs_percentile(a, percentile) / qp
        else:
            w = _grouped(chunk.float(), group_size)
            amax = a.amax(-1)
            best_err = torch.full_like(amax, float("inf"))
            s = amax / qp
            for r in torch.linspace(1.0 / mse_grid, 1.0, mse_grid).tolist():
                cand = (r * amax / qp).clamp_min(MIN_SCALE)
                q = torch.round((w / cand.unsqueeze(-1)).clamp(-qn, qp))
                err = (q * cand.unsqueeze(-1) - w).pow(2).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                s = torch.where(better, cand, s)
        out.append(torch.log(s.clamp_min(MIN_SCALE)))
    return torch.cat(out, dim=0)
