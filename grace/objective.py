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


def grace_objective(student, teacher, family: Family, batch: dict, *, beta: float, omega: float, kd: bool,
                    rcka: bool, kd_scale: float = 1.0, temperature: float = 2.0, tckd_weight: float = 1.0,
                    nckd_weight: float = 4.0, gate: bool = True, gate_temperature: float = 1.0,
                    kd_type: str = "dkd") -> LossParts:
    """The loss and its parts (detached) for one micro-batch. ``kd_scale`` ramps the distillation
    terms during a warmup (the released code's 400 steps); 1.0 otherwise."""
    labels = batch["labels"]
    hs, hs_pen = _hidden(family, student, batch, rcka)
    use_teacher = (kd or rcka) and teacher is not None
    if use_teacher:
        with torch.no_grad():
            ht, ht_pen = _hidden(family, teacher, batch, rcka)
        if ht.shape[:2] != hs.shape[:2]:
            raise ValueError(f"teacher sequence shape {tuple(ht.shape[:2])} differs from the student's "
                             f"{tuple(hs.shape[:2])}: they must see the same tokens (one processor)")
    target = labels[:, 1:].reshape(-1)
    head_s = family.lm_head(student)
    kd_weight = beta * kd_scale if (kd and use_teacher) else 0.0
    lm = gk.fused_linear_grace_loss(
        hs[:, :-1].reshape(-1, hs.shape[-1]), head_s.weight, target=target, student_bias=head_s.bias,
        teacher_hidden=ht[:, :-1].reshape(-1, ht.shape[-1]) if kd_weight else None,
        teacher_weight=family.lm_head(teacher).weight if kd_weight else None,
        teacher_bias=family.lm_head(teacher).bias if kd_weight else None, ce_weight=1.0, kd_weight=kd_weight,
        temperature=temperature, tckd_weight=tckd_weight, nckd_weight=nckd_weight, gate=gate,
        gate_temperature=gate_temperature, kd_type=kd_type)
    total = lm.loss
    rcka_value = torch.zeros((), device=hs.device)
    if rcka and use_teacher:
        token_id = family.image_token_id(student.config)
        vs, cu, counts_s = visual_features(hs_pen, batch["input_ids"], token_id)
        vt, _, counts_t = visual_features(ht_pen, batch["input_ids"], token_id)
        if not torch.equal(counts_s, counts_t):
            raise ValueError(f"visual token counts differ between teacher {counts_t.tolist()} and student "
                             f"{counts_s.tolist()}")
        if cu.numel() > 1:
            rcka_value = gk.rcka_loss(vs, vt.to(vs.dtype), cu_seqlens=cu)
            total = total + omega * kd_scale * rcka_value
    return LossParts(total, lm.ce, lm.gdkd, rcka_value.detach(), lm.gate_mean, int(lm.num_valid))
