"""Test and benchmark helpers: tolerances, the 2x-gold rule, SQNR, input makers.

Tolerances are derived from the dtype, never loosened to make a test pass:

* :func:`assert_close_to_gold` is flash-attention's rule for reductions and GEMMs: the kernel's
  error against a float64 "gold" may be at most twice the error that PyTorch itself makes in the
  same low precision, plus a small absolute slack.
* :data:`TOLERANCES` are for elementwise results computed in float32 and cast once to the
  output dtype (one rounding: half an ulp of the output dtype, relative).
"""

from __future__ import annotations

import torch

# (rtol, atol) for one float32 computation rounded once to the dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1.3e-6, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_gold(
    ours: torch.Tensor, lowp_ref: torch.Tensor, gold: torch.Tensor, *, atol: float = 1e-6, factor: float = 2.0,
    name: str = "",
) -> None:
    """max|ours - gold| <= factor * max|lowp_ref - gold| + atol.

    Args:
        ours: the kernel's result.
        lowp_ref: the reference run in the same (low) precision as the kernel.
        gold: the reference run in float64 (or float32 for float16/bfloat16 kernels).
    """
    assert ours.shape == gold.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in the result"
    err, ref_err = max_abs_err(ours, gold), max_abs_err(lowp_ref, gold)
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: max abs error {err:.3e} > {factor} * {ref_err:.3e} + {atol:.1e} = {bound:.3e}"


def sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of x against ref, in dB (inf when equal)."""
    ref = ref.double()
    noise = (x.double() - ref).pow(2).sum()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(ref.pow(2).sum() / noise)).item()


def make_weight(out_features: int, in_features: int, *, dtype=torch.float32, device="cpu", seed=0,
                outliers: bool = True) -> torch.Tensor:
    """A weight that looks like a trained LLM linear layer: Gaussian with a few large outliers."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * (in_features ** -0.5)
    if outliers and w.numel() >= 64:
        idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)
        w.view(-1)[idx] *= 8.0
    return w.to(device=device, dtype=dtype)
