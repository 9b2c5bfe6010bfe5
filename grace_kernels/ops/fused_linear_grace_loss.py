"""GRACE's language loss fused with both LM heads, ce_weight * CE + kd_weight * GDKD: :func:`fused_linear_grace_loss`.

Shapes, dtypes, math, memory and errors are in that function's docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grace_kernels.ops import _kd_core
from grace_kernels.ops._input_checks import check_finite_number, check_floating, check_same_device
from grace_kernels.ops._kd_core import default_chunk_size  # noqa: F401  (public: grace_kernels.default_chunk_size)
from grace_kernels.ops.gated_dkd import check_kd_args, check_target_values


class FusedGraceLossOutput(NamedTuple):
    loss: torch.Tensor             # ce_weight * ce + kd_weight * gdkd, differentiable
    ce: torch.Tensor               # everything below is detached float32
    gdkd: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor
    teacher_entropy: torch.Tensor
    gate_mean: torch.Tensor
    gate_sum: torch.Tensor
    num_valid: torch.Tensor


def _f32_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        z = x @ w.t()
    elif x.is_cuda:
        z = torch.mm(x, w.t(), out_dtype=torch.float32)
    else:
        z = x.float() @ w.float().t()
    return z if b is None else z + b.float()


@torch.library.custom_op("grace_kernels::fused_linear_grace_loss", mutates_args=())
def _fused_op(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None, teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None, target: torch.Tensor, ce_weight: float, kd_weight: float, temperature: float,
    tckd_weight: float, nckd_weight: float, gate: bool, gate_temperature: float, kd_type: str, ignore_index: int,
    chunk_size: int, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (stats, d hidden, d weight, d bias); gradients are empty tensors when not computed."""
    n, vs = student_hidden.shape[0], student_weight.shape[0]
    vt = (None if kd_weight == 0.0 else teacher_logits.shape[1] if teacher_logits is not None
          else teacher_weight.shape[0])
    check_target_values(target, vs, vt, ignore_index)
    dev = student_hidden.device
    # One float32 copy of a half-precision head on CPUs, never one per chunk.
    ws = student_weight if (dev.type == "cuda" or student_weight.dtype == torch.float32) else student_weight.float()
    student_chunk = lambda lo, hi: _f32_logits(student_hidden[lo:hi], ws, student_bias)

    teacher_chunk, vt = None, None
    if kd_weight != 0.0 and teacher_logits is not None:
        vt = teacher_logits.shape[1]
        teacher_chunk = lambda lo, hi: teacher_logits[lo:hi].float()
    elif kd_weight != 0.0 and teacher_weight is not None:
        vt = teacher_weight.shape[0]
        wt = teacher_weight if (dev.type == "cuda" or teacher_weight.dtype == torch.float32) else teacher_weight.float()
        teacher_chunk = lambda lo, hi: _f32_logits(teacher_hidden[lo:hi], wt, teacher_bias)

    # Distinct empty tensors: a custom op's outputs may not alias one another.
    d_hidden, d_weight, d_bias = (student_hidden.new_empty(0) for _ in range(3))
    consume = None
    if compute_grad:
        d_hidden = torch.empty_like(student_hidden)
        d_weight = torch.zeros(student_weight.shape, device=dev, dtype=torch.float32)
        if student_bias is not None:
            d_bias = torch.zeros(vs, device=dev, dtype=torch.float32)
        w_lowp = student_weight

        def consume(lo, hi, grad):
            x = student_hidden[lo:hi]
            # dX in the hidden states' dtype (as every fused-linear loss does); dW accumulates in float32.
            d_hidden[lo:hi] = (grad.to(w_lowp.dtype) @ w_lowp).to(d_hidden.dtype)
            d_weight.addmm_(grad.t(), x.float())
            if student_bias is not None:
                d_bias.add_(grad.sum(0))

    stats = _kd_core.kd_core(
        n, vs, vt, target, student_chunk, teacher_chunk, consume, ce_weight=ce_weight, kd_weight=kd_weight,
        temperature=temperature, tckd_weight=tckd_weight, nckd_weight=nckd_weight, gate=gate,
        gate_temperature=gate_temperature, kd_type=kd_type, ignore_index=ignore_index,
        chunk_size=chunk_size or None)
    if compute_grad:
        d_weight = d_weight.to(student_weight.dtype)
        if student_bias is not None:
            d_bias = d_bias.to(student_bias.dtype)
    return stats, d_hidden, d_weight, d_bias


@_fused_op.register_fake
def _(student_hidden, student_weight, student_bias, *args):
    compute_grad = args[-1]
    stats = student_hidden.new_empty(len(_kd_core.STATS), dtype=torch.float32)
    if not compute_grad:
        return stats, *(student_hidden.new_empty(0) for _ in range(3))
    return (stats, torch.empty_like(student_hidden), torch.empty_like(student_weight),
            torch.empty_like(student_bias) if student_bias is not None else student_hidden.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_stats, *_):
    d_hidden, d_weight, d_bias = ctx.saved_tensors
    if d_hidden.numel() == 0:
        raise RuntimeError("fused_linear_grace_loss was called without grad mode or without inputs requiring grad")
    # Scaled in place: an out-of-place product would be a second [V, H] temporary, the largest
    # allocation of the whole loss. Autograd then adopts d_weight as the parameter's .grad. A second
    # backward through the same graph (retain_graph=True) is refused by autograd's version check on
    # the saved gradients, so they are never scaled twice.
    go = grad_stats[0]
    grads = [d_hidden.mul_(go.to(d_hidden.dtype)), d_weight.mul_(go.to(d_weight.dtype)),
             d_bias.mul_(go.to(d_bias.dtype)) if ctx.has_bias else None]
    # Gradients for student_hidden, student_weight and student_bias (the first three inputs); None
    # for every other input.
    return (*grads, *([None] * (ctx.num_inputs - len(grads))))


_fused_op.register_autograd(_backward, setup_context=_setup)


def fused_linear_grace_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None, target: torch.Tensor | None = None, *,
    teacher_logits: torch.Tensor | None = None, ce_weight: float = 1.0, kd_weight: float = 1.0,
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None, temperature: float = 2.0,
    tckd_weight: float = 1.0, nckd_weight: float = 4.0, gate: bool = True, gate_temperature: float = 1.0,
    kd_type: str = "dkd", ignore_index: int = -100, chunk_size: int | None = None,
) -> FusedGraceLossOutput:
    """ce_weight * CE + kd_weight * GDKD from hidden states and LM heads, without materializing [N, V] logits.

    Args:
        student_hidden: [N, Hs]; student_weight: [Vs, Hs]; student_bias: [Vs] or None. The gradient
            reaches these three (the weight gradient accumulated in float32, cast to its dtype once).
        teacher_hidden: [N, Ht] and teacher_weight: [Vt, Ht] (teacher_bias [Vt] or None), or instead
            teacher_logits: [N, Vt] precomputed (offline teacher logits). Never differentiated.
        target: [N] integer, in [0, min(Vs, Vt)) (in [0, Vs) when kd_weight = 0) or ignore_index.
        ce_weight, kd_weight: the two terms' weights; ``kd_weight = 0`` skips the teacher (QAT only).
        chunk_size: rows per chunk (None: about 64 MiB of float32 logits per model per chunk on a
            CPU, 256 MiB on a GPU; see :func:`default_chunk_size`).
        Every other keyword as in :func:`grace_kernels.gated_dkd_loss`.
        Inputs are float32 / float16 / bfloat16; logits are produced in float32 (float32 accumulation,
        never rounded to bf16 before a softmax).

    Returns:
        :class:`FusedGraceLossOutput`: ``loss`` (differentiable) and, detached float32, CE, GDKD,
        TCKD, NCKD, the teacher entropy, the gate's mean and sum, and the count of valid tokens.

    Math: CE is the student's next-token cross-entropy (temperature 1, full vocabulary Vs, mean over
    valid tokens); GDKD is :func:`grace_kernels.gated_dkd_loss` (same keywords, same definition);
    ``kd_type="kl"`` is the paper's "naive KD" ablation.

    Memory: tokens are processed in chunks of ``chunk_size`` rows. Per chunk: one GEMM per model into float32
    logits, the row statistics, the closed-form gradient w.r.t. the student logits, then
    dX = grad @ W and dW += grad^T @ X. The gradient is therefore computed in the forward, and the
    backward only multiplies it by grad_output. Teacher logits are computed under no_grad. With the
    gate on, the teacher head runs twice per chunk (the gate pass needs sum_i g_i before any gradient
    can be formed; see grace_kernels/ops/_kd_core.py). On a CPU, a float16/bfloat16 head is copied to
    float32 once per call (CPU matmuls cannot produce float32 from half-precision operands); on CUDA
    torch.mm(..., out_dtype=torch.float32) avoids the copy.

    Non-finite inputs: as in :func:`grace_kernels.gated_dkd_loss`, on the logits the heads produce
    (or the teacher_logits given): -inf is probability 0 (a bias of -inf on padded vocabulary rows of
    both heads gives exactly the loss of the unpadded vocabulary, and zero gradient on those rows);
    NaN or +inf anywhere in the inputs the loss reads propagates to a loss that is not finite
    (unchecked: a check would cost a pass over the weights and a host sync).

    Raises TypeError for non-floating inputs and a non-integer (or bool) target; ValueError for: ranks
    or sizes that do not match, tensors on different devices, neither or both of teacher
    hidden+weight and teacher_logits, ce_weight/kd_weight not finite, and everything gated_dkd_loss
    rejects (a target must lie in the common vocabulary min(Vs, Vt) when the teacher is used, in
    [0, Vs) when kd_weight = 0).
    """
    if target is None:
        raise ValueError("target is required")
    check_floating("student_hidden", student_hidden, 2)
    check_floating("student_weight", student_weight, 2)
    n, hs = student_hidden.shape
    vs = student_weight.shape[0]
    if student_weight.shape[1] != hs:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} does not match hidden size {hs}")
    if student_bias is not None and tuple(student_bias.shape) != (vs,):
        raise ValueError(f"student_bias must have shape ({vs},), got {tuple(student_bias.shape)}")
    use_teacher = kd_weight != 0.0
    have_logits, have_head = teacher_logits is not None, teacher_hidden is not None or teacher_weight is not None
    vt = None
    if use_teacher:
        if have_logits == have_head:
            raise ValueError("give either teacher_hidden and teacher_weight, or teacher_logits (exactly one)")
        if have_logits:
            check_floating("teacher_logits", teacher_logits, 2)
            if teacher_logits.shape[0] != n:
                raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} tokens, student_hidden {n}")
            vt = teacher_logits.shape[1]
        else:
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError("teacher_hidden and teacher_weight must be given together")
            check_floating("teacher_hidden", teacher_hidden, 2)
            check_floating("teacher_weight", teacher_weight, 2)
            if teacher_hidden.shape[0] != n:
                raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} tokens, student_hidden {n}")
            if teacher_weight.shape[1] != teacher_hidden.shape[1]:
                raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} does not match teacher hidden size "
                                 f"{teacher_hidden.shape[1]}")
            vt = teacher_weight.shape[0]
            if teacher_bias is not None and tuple(teacher_bias.shape) != (vt,):
                raise ValueError(f"teacher_bias must have shape ({vt},), got {tuple(teacher_bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_finite_number("ce_weight", ce_weight)
    check_finite_number("kd_weight", kd_weight)
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                   teacher_logits=teacher_logits) if use_teacher else {}
    check_same_device("student_hidden", student_hidden, student_weight=student_weight, student_bias=student_bias,
                      target=target, **teacher)
    check_kd_args(n, target, vs, vt, temperature=temperature, gate_temperature=gate_temperature,
                  tckd_weight=tckd_weight, nckd_weight=nckd_weight, kd_type=kd_type, ignore_index=ignore_index)

    needs = [student_hidden, student_weight] + ([student_bias] if student_bias is not None else [])
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in needs)
    detach = lambda t: None if t is None else t.detach().contiguous()
    stats, *_ = _fused_op(
        student_hidden.contiguous(), student_weight.contiguous(),
        None if student_bias is None else student_bias.contiguous(),
        detach(teacher_hidden) if use_teacher else None, detach(teacher_weight) if use_teacher else None,
        detach(teacher_bias) if use_teacher else None, detach(teacher_logits) if use_teacher else None,
        target.contiguous(), float(ce_weight), float(kd_weight), float(temperature), float(tckd_weight),
        float(nckd_weight), bool(gate), float(gate_temperature), kd_type, int(ignore_index), int(chunk_size or 0),
        compute_grad)
    d = dict(zip(_kd_core.STATS, stats.detach().unbind(), strict=True))
    return FusedGraceLossOutput(stats[0], d["ce"], d["gdkd"], d["tckd"], d["nckd"], d["teacher_entropy"],
                                d["gate_mean"], d["gate_sum"], d["num_valid"])
