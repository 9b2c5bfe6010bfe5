"""Group-wise learned-step-size quantization (LSQ) of a weight matrix.

Shapes and dtypes:
    weight     [out, in], float32 / float16 / bfloat16, ``in % group_size == 0``
    log_scale  [out, in // group_size], float32: one learnable log step size per group of
               ``group_size`` consecutive weights along the input dimension
    result     like weight

Math (Qn = 2^(bits-1), Qp = 2^(bits-1) - 1; INT4 codes are [-8, 7]):
    s   = exp(log_scale)                (rounded to ``scale_dtype`` if given, straight through)
    v   = w / s                         in float32
    q   = clamp(round_half_even(v), -Qn, Qp)
    out = q * s                         cast to weight's dtype

Backward (straight-through estimator, Esser et al. 2020):
    dW         = dout                        where -Qn <= v <= Qp, else 0
    d log_s    = g * s * sum_group dout * (q - v if -Qn <= v <= Qp else q)
    g          = grad_scale, or 1 / sqrt(group_size * Qp) when None (LSQ's gradient scale)

The errors every function raises are listed in :func:`lsq_fake_quant`'s docstring.
"""

from __future__ import annotations

import torch

from grace_kernels._backend import select_backend
from grace_kernels.int4 import GROUP_SIZES, SCALE_DTYPES
from grace_kernels.ops._input_checks import values_visible
from grace_kernels.reference import lsq as ref


def _check_weight(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if weight.shape[1] % group_size:
        raise ValueError(
            f"weight's input dimension {weight.shape[1]} is not a multiple of group_size {group_size}")


def _check_values(weight: torch.Tensor, log_scale: torch.Tensor | None) -> None:
    """NaN/Inf in the weight would silently poison its group's scale, and a log-scale outside
    LOG_SCALE_RANGE zeroes or NaNs its group: one reduction per tensor, one host sync for both."""
    if not values_visible(weight, log_scale):
        return
    flags = [torch.isfinite(weight).all()]
    if log_scale is not None:
        lo, hi = ref.LOG_SCALE_RANGE
        flags.append(((log_scale >= lo) & (log_scale <= hi)).all())  # NaN fails both comparisons
    ok = torch.stack(flags).tolist()
    if not ok[0]:
        raise ValueError("weight contains NaN or Inf")
    if log_scale is not None and not ok[1]:
        lo, hi = ref.LOG_SCALE_RANGE
        bad = log_scale[~((log_scale >= lo) & (log_scale <= hi))]
        raise ValueError(f"log_scale must be finite and in [{lo:g}, {hi:g}] (exp(log_scale) a normal float32 > 0); "
                         f"got {bad[:5].tolist()}")


def _check_log_scale(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int) -> None:
    expected = (weight.shape[0], weight.shape[1] // group_size)
    if not isinstance(log_scale, torch.Tensor) or log_scale.dtype != torch.float32:
        raise TypeError(f"log_scale must be a float32 tensor, got {getattr(log_scale, 'dtype', type(log_scale))}")
    if tuple(log_scale.shape) != expected:
        raise ValueError(f"log_scale must have shape {expected} for weight {tuple(weight.shape)} and "
                         f"group_size {group_size}, got {tuple(log_scale.shape)}")
    if log_scale.device != weight.device:
        raise ValueError(f"log_scale is on {log_scale.device} but weight is on {weight.device}")


def _check_scale_dtype(scale_dtype: torch.dtype | None) -> None:
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be None, torch.float16 or torch.bfloat16, got {scale_dtype}")


# --------------------------------------------------------------------------------------------
# torch.library ops: the schema lives here; implementations dispatch through _backend.


@torch.library.custom_op("grace_kernels::lsq_fake_quant", mutates_args=())
def _lsq_fake_quant_op(weight: torch.Tensor, log_scale: torch.Tensor, bits: int, group_size: int,
                       grad_scale: float, scale_dtype: torch.dtype | None) -> torch.Tensor:
    # Here, not in the wrapper: an op's implementation runs on real tensors inside compiled graphs too.
    _check_values(weight, log_scale)
    if select_backend("lsq_fake_quant", weight.device) == "triton":
        from grace_kernels.triton import lsq as tri

        return tri.lsq_fake_quant_fwd(weight, ref.effective_scale(log_scale, scale_dtype), bits, group_size)
    return ref.lsq_fake_quant_ref(weight, log_scale, bits=bits, group_size=group_size, scale_dtype=scale_dtype)


@_lsq_fake_quant_op.register_fake
def _(weight, log_scale, bits, group_size, grad_scale, scale_dtype):
    return torch.empty_like(weight)


@torch.library.custom_op("grace_kernels::lsq_fake_quant_backward", mutates_args=())
def _lsq_backward_op(grad_out: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, bits: int,
                     group_size: int, grad_scale: float,
                     scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if select_backend("lsq_fake_quant", weight.device) == "triton":
        from grace_kernels.triton import lsq as tri

        dw, gsum = tri.lsq_fake_quant_bwd(grad_out, weight, ref.effective_scale(log_scale, scale_dtype), bits,
                                          group_size)
        return dw, grad_scale * torch.exp(log_scale) * gsum
    return ref.lsq_fake_quant_backward_ref(grad_out, weight, log_scale, bits=bits, group_size=group_size,
                                           grad_scale=grad_scale, scale_dtype=scale_dtype)


@_lsq_backward_op.register_fake
def _(grad_out, weight, log_scale, bits, group_size, grad_scale, scale_dtype):
    return torch.empty_like(weight), torch.empty_like(log_scale)


def _setup_context(ctx, inputs, output):
    weight, log_scale, bits, group_size, grad_scale, scale_dtype = inputs
    ctx.save_for_backward(weight, log_scale)
    ctx.args = (bits, group_size, grad_scale, scale_dtype)


def _backward(ctx, grad_out):
    weight, log_scale = ctx.saved_tensors
    grad_w, grad_log = _lsq_backward_op(grad_out.contiguous(), weight, log_scale, *ctx.args)
    return grad_w, grad_log, None, None, None, None


_lsq_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API


def lsq_fake_quant(
    weight: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 4, group_size: int = 128,
    grad_scale: float | None = None, scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fake-quantize ``weight`` group-wise with learnable log step sizes (see the module docstring).

    Args:
        weight: [out, in] float32/float16/bfloat16.
        log_scale: [out, in // group_size] float32.
        bits: 2..8 (codes in [-2^(bits-1), 2^(bits-1) - 1]).
        group_size: 32, 64, 128 or 256, dividing ``in``.
        grad_scale: multiplier of the log-scale gradient; None for LSQ's 1/sqrt(group_size * Qp),
            1.0 to turn it off.
        scale_dtype: torch.float16 / torch.bfloat16 to train with the scales an INT4 checkpoint
            will hold (rounded in the forward, straight-through in the backward); None for float32.

    Returns:
        [out, in] in weight's dtype: q * s, exactly what :func:`lsq_quantize` returns as codes * scales.

    Raises (every LSQ function):
        TypeError for a non-floating weight or a log_scale that is not float32, and ValueError naming the
        problem for: a weight that is not 2-D, ``in`` not a multiple of ``group_size``, bits outside 2..8, a
        group size outside {32, 64, 128, 256}, a log_scale of the wrong shape or on another device, NaN/Inf in
        the weight, and a log_scale that is NaN, infinite or outside [-87, 88] (where exp(log_scale) is no
        longer a normal float32 > 0: the group would quantize to 0 or NaN). The value checks share one reduction
        per tensor and one host sync. lsq_fake_quant runs them inside its op, so they hold under torch.compile
        too; lsq_quantize and lsq_init_log_scale (export and init, not compiled) skip them while it traces.
    """
    _check_weight(weight, bits, group_size)
    _check_log_scale(weight, log_scale, group_size)
    _check_scale_dtype(scale_dtype)
    gs = ref.default_grad_scale(group_size, bits) if grad_scale is None else float(grad_scale)
    return _lsq_fake_quant_op(weight.contiguous(), log_scale.contiguous(), bits, group_size, gs, scale_dtype)


@torch.no_grad()
def lsq_quantize(
    weight: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 4, group_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and per-group scales, what INT4 export packs.

    Returns:
        codes int8 [out, in] in [-Qn, Qp] and scales [out, in // group_size] (``scale_dtype`` or
        float32), such that ``(codes.float() * scales.float().repeat_interleave(group_size, 1))
        .to(weight.dtype)`` equals :func:`lsq_fake_quant` bit for bit.

    Raises:
        TypeError, ValueError: as :func:`lsq_fake_quant`.
    """
    _check_weight(weight, bits, group_size)
    _check_log_scale(weight, log_scale, group_size)
    _check_scale_dtype(scale_dtype)
    _check_values(weight, log_scale)
    return ref.lsq_quantize_ref(weight, log_scale, bits=bits, group_size=group_size, scale_dtype=scale_dtype)


@torch.no_grad()
def lsq_init_log_scale(
    weight: torch.Tensor, *, bits: int = 4, group_size: int = 128, percentile: float = 0.99,
    method: str = "percentile",
) -> torch.Tensor:
    """Initial log step sizes, float32 [out, in // group_size].

    ``method="percentile"`` (the paper's rule, default): log(P(|W_group|) / Qp) with P the
    ``percentile`` quantile of each group's magnitudes (linear interpolation, as torch.quantile).
    ``method="mse"``: per group, the clipping ratio of max|W_group| among 40 values in (0, 1] that
    minimises the squared quantization error (the rule of the authors' released code).
    Scales are floored at ``MIN_SCALE`` = 1e-8: an all-zero group (or one whose magnitudes are all
    below 7e-8) gets log(1e-8) ~ -18.4, finite and inside the range lsq_fake_quant accepts; its
    codes are all 0 and its weights stay exactly 0, and the LSQ gradient moves the scale once the
    weights do.

    Raises:
        TypeError, ValueError: as :func:`lsq_fake_quant`, and ValueError for an unknown ``method`` or a
        ``percentile`` outside (0, 1].
    """
    _check_weight(weight, bits, group_size)
    _check_values(weight, None)
    if method not in ("percentile", "mse"):
        raise ValueError(f"method must be 'percentile' or 'mse', got {method!r}")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
    return ref.lsq_init_log_scale_ref(weight, bits=bits, group_size=group_size, percentile=percentile, method=method)
