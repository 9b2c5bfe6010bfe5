"""GRACE's objective for one batch: L = CE + beta * GDKD + omega * RCKA.

Neither model's full logits are formed: the backbones return hidden states, and
grace_kernels.fused_linear_grace_loss applies both LM heads chunk by chunk inside the loss.
RCKA compares the penultimate-layer (hidden_states[-2]) features at the visual-token positions.
"""

from __future__ import annotations

import dataclasses

import torch

import grace_kernels as gk
from grace.families import Family

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    gdkd: torch.Tensor
    rcka: torch.Tensor
    gate_mean: torch.Tensor
    tokens: int


def _hidden(family: Family, model, batch, need_penultimate: bool):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    out = family.backbone(model)(**inputs, output_hidden_states=need_penultimate, use_cache=False)
    return out.last_hidden_state, (out.hidden_states[-2] if need_penultimate else None)


def visual_features(feats: torch.Tensor, input_ids: torch.Tensor, image_token_id: int):
    """Packed visual-token features [total, d] and cu_seqlens [B' + 1] over samples that have images."""
    mask = input_ids == image_token_id
    counts = mask.sum(1)
    keep = counts > 0
    cu = torch.zeros(int(keep.sum()) + 1, dtype=torch.int64, device=feats.device)
    cu[1:] = counts[keep].cumsum(0)
    return feats[mask], cu, counts


@dataclasses.dataclass
class TeacherOutputs:
    hidden: torch.Tensor | None           # last hidden states [B, L, d_T]
    penultimate: torch.Tensor | None      # hidden_states[-2], for RCKA
    lm_head: torch.nn.Linear | None


def teacher_outputs(teacher, family: Family, batch: dict, *, kd: bool, rcka: bool) -> TeacherOutputs:
    """The frozen teacher's hidden states for one micro-batch (nothing when no term needs them)."""
    if teacher is None or not (kd or rcka):
        return TeacherOutputs(None, None, None)
    with torch.no_grad():
        hidden, pen = _hidden(family, teacher, batch, rcka)
    return TeacherOutputs(hidden, pen, family.lm_head(teacher))


def student_objective(student, family: Family, batch: dict, teacher: TeacherOutputs, *, beta: float, omega: float,
                      kd: bool, rcka: bool, kd_scale: float = 1.0, temperature: float = 2.0,
                      tckd_weight: float = 1.0, nckd_weight: float = 4.0, gate: bool = True,
                      gate_temperature: float = 1.0, kd_type: str = "dkd") -> LossParts:
    """The student's forward and the loss. Under FSDP the trainer registers this as a forward method of
    the sharded student (it reads the LM head's weight directly, outside any submodule's forward)."""
    labels = batch["labels"]
    hs, hs_pen = _hidden(family, student, batch, rcka)
    ht = teacher.hidden
    if ht is not None and ht.shape[:2] != hs.shape[:2]:
        raise ValueError(f"teacher sequence shape {tuple(ht.shape[:2])} differs from the student's "
                         f"{tuple(hs.shape[:2])}: they must see the same tokens (one processor)")
    target = labels[:, 1:].reshape(-1)
    head_s = family.lm_head(student)
    kd_weight = beta * kd_scale if (kd and ht is not None) else 0.0
    head_t = teacher.lm_head
    lm = gk.fused_linear_grace_loss(
        hs[:, :-1].reshape(-1, hs.shape[-1]), head_s.weight, target=target, student_bias=head_s.bias,
        teacher_hidden=ht[:, :-1].reshape(-1, ht.shape[-1]) if kd_weight else None,
        teacher_weight=head_t.weight if kd_weight else None, teacher_bias=head_t.bias if kd_weight else None,
        ce_weight=1.0, kd_weight=kd_weight, temperature=temperature, tckd_weight=tckd_weight,
        nckd_weight=nckd_weight, gate=gate, gate_temperature=gate_temperature, kd_type=kd_type)
    total = lm.loss
    rcka_value = torch.zeros((), device=hs.device)
    if rcka and teacher.penultimate is not None:
        token_id = family.image_token_id(student.config)
        vs, cu, counts_s = visual_features(hs_pen, batch["input_ids"], token_id)
        vt, _, counts_t = visual_features(teacher.penultimate, batch["input_ids"], token_id)
        if not torch.equal(counts_s, counts_t):
            raise ValueError(f"visual token counts differ between teacher {counts_t.tolist()} and student "
                             f"{counts_s.tolist()}")
        if cu.numel() > 1:
            rcka_value = gk.rcka_loss(vs, vt.to(vs.dtype), cu_seqlens=cu)
            total = total + omega * kd_scale * rcka_value
    return LossParts(total, lm.ce, lm.gdkd, rcka_value.detach(), lm.gate_mean, int(lm.num_valid))


def grace_objective(student, teacher, family: Family, batch: dict, *, kd: bool, rcka: bool, **kwargs) -> LossParts:
    """The loss and its parts (detached) for one micro-batch: the teacher's pass, then the student's.
    ``kd_scale`` ramps the distillation terms during a warmup (the released code's 400 steps)."""
    t = teacher_outputs(teacher, family, batch, kd=kd, rcka=rcka)
    return student_objective(student, family, batch, t, kd=kd, rcka=rcka, **kwargs)
