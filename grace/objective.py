"""GRACE's objective for one batch: L = CE + beta * s_GDKD(step) * GDKD + omega * s_RCKA(step) * RCKA.

GDKD is the paper's (Eqs. 1-3: gate-weighted tckd_weight TCKD + nckd_weight NCKD, no T^2) or, with ``kd_t2``,
the release's (the same times T^2); see grace.config.PRESETS for why the convention and tau go together.

Neither model's full logits are formed: the backbones return hidden states, and
grace_kernels.fused_linear_grace_loss applies both LM heads chunk by chunk inside the loss.
RCKA compares the penultimate-layer (hidden_states[-2]) features at the visual-token positions.

Choices, against the paper (Eq. 7-9) and the authors' release (ForeverBlue816/GRACE,
qwen-vl-finetune/qwenvl/train/grace_modules.py and train_qwen_grace.py):

* RCKA is computed per image: one Gram matrix over each image's visual tokens, then the mean over
  images of 1 - CKA. The paper defines the relational term on one image's token features; the release
  splits the visual tokens by ``image_grid_thw`` the same way. A sample holding two images therefore
  contributes two terms, never one Gram matrix that mixes both images' tokens.
* Images that carry no relational signal are left out of the mean, as the release does: an image with
  fewer than :data:`RCKA_MIN_TOKENS` visual tokens, and a degenerate one (all its tokens identical after
  normalisation, so a centered Gram matrix of zero and CKA undefined). Counting such an image as loss 1
  with zero gradient would only shrink the other images' gradients. The degenerate test is
  grace_kernels' (``RCKAOutput.num_degenerate``: a centered-feature trace below its tolerance), the
  release's is HSIC(K, K) < 1e-8; both catch collapsed images, they may disagree on nearly collapsed ones.
* The warm-up ramps (:func:`warmup_scale`) are the release's: ``min(1, step / warmup_steps)`` of the
  optimizer steps completed, separately for GDKD and RCKA. The paper states no ramp (preset "paper":
  none); the release ramps RCKA only, over 400 steps (preset "released").
"""

from __future__ import annotations

import dataclasses

import torch

import grace_kernels as gk
from grace.config import TrainConfig
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
    rcka_images: int = 0    # images RCKA measured (0: ``rcka`` is a placeholder zero, not a measurement)


def _hidden(family: Family, model, batch, need_penultimate: bool):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    out = family.backbone(model)(**inputs, output_hidden_states=need_penultimate, use_cache=False)
    return out.last_hidden_state, (out.hidden_states[-2] if need_penultimate else None)


# The release skips images with fewer visual tokens than this (grace_modules.rcka_loss, min_tokens=4).
RCKA_MIN_TOKENS = 4


def warmup_scale(step: int, warmup_steps: int) -> float:
    """Weight of a ramped loss term at optimizer step ``step`` (0 for the first step: the number of steps
    completed before it): ``min(1, step / warmup_steps)``, or 1 when ``warmup_steps`` is 0. So with 400
    steps the term is off at step 0, 1/400 at step 1, 399/400 at step 399 and whole from step 400.

    Raises:
        ValueError: a negative ``step`` or ``warmup_steps``.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got step={step}, warmup_steps={warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def image_segments(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: torch.Tensor):
    """Where each image's visual tokens lie among the packed visual tokens.

    ``input_ids`` [B, L]; ``tokens_per_image`` int [num_images], in the order the images' tokens appear
    (sample by sample, left to right: the order of ``pixel_values`` / ``image_grid_thw``).
    Returns (mask [B, L] bool of the visual positions, keep [num_images] bool of the images with at least
    :data:`RCKA_MIN_TOKENS` tokens, cu_seqlens int64 [kept + 1] over the kept images' tokens, gather
    int64 [sum of kept counts]: the packed rows that belong to kept images, in order).

    Raises:
        ValueError: the counts do not add up to the number of image tokens in ``input_ids``.
    """
    mask = input_ids == image_token_id
    counts = tokens_per_image.to(device=input_ids.device, dtype=torch.int64)
    if int(counts.sum()) != int(mask.sum()):
        raise ValueError(f"the images hold {int(counts.sum())} visual tokens ({counts.tolist()}) but input_ids "
                         f"has {int(mask.sum())} image tokens: the batch's images and placeholders disagree")
    keep = counts >= RCKA_MIN_TOKENS
    cu = torch.zeros(int(keep.sum()) + 1, dtype=torch.int64, device=input_ids.device)
    cu[1:] = counts[keep].cumsum(0)
    gather = torch.repeat_interleave(keep, counts).nonzero().squeeze(1)
    return mask, keep, cu, gather


def rcka_per_image(student_feats: torch.Tensor, teacher_feats: torch.Tensor, cu_seqlens: torch.Tensor):
    """Mean over the non-degenerate images of 1 - CKA (float32 scalar, differentiable w.r.t. the student)
    and the number of images left out as degenerate. Packed features [total, d_S] / [total, d_T], one
    segment of ``cu_seqlens`` per image. With no usable image the loss is a zero with no gradient."""
    out = gk.rcka_loss(student_feats, teacher_feats.to(student_feats.dtype), cu_seqlens=cu_seqlens,
                       return_stats=True)
    images, dropped = cu_seqlens.numel() - 1, int(out.num_degenerate)
    if images == dropped:
        return torch.zeros((), device=student_feats.device), dropped
    # A degenerate image enters out.loss as exactly 1 - 0 with zero gradient: take it back out of the mean.
    return (out.loss * images - dropped) / (images - dropped), dropped


# The TrainConfig fields the objective reads; LossConfig takes their types and defaults from TrainConfig.
LOSS_FIELDS = ("kd", "rcka", "omega", "temperature", "tckd_weight", "nckd_weight", "gate", "gate_temperature",
               "kd_type", "kd_t2", "gdkd_warmup_steps", "rcka_warmup_steps")


class _LossConfigBase:
    @classmethod
    def from_train_config(cls, cfg) -> LossConfig:
        """The loss settings of a :class:`grace.config.TrainConfig` (its fields of the same names)."""
        return cls(**{name: getattr(cfg, name) for name in LOSS_FIELDS})

    def scales(self, step: int) -> tuple[float, float]:
        """(GDKD, RCKA) warm-up weights at optimizer step ``step`` (:func:`warmup_scale`)."""
        return warmup_scale(step, self.gdkd_warmup_steps), warmup_scale(step, self.rcka_warmup_steps)


LossConfig = dataclasses.make_dataclass(
    "LossConfig",
    [(f.name, f.type, dataclasses.field(default=f.default))
     for f in ({f.name: f for f in dataclasses.fields(TrainConfig)}[name] for name in LOSS_FIELDS)],
    bases=(_LossConfigBase,), frozen=True)
LossConfig.__module__ = __name__   # make_dataclass's module= is Python 3.12+
LossConfig.__doc__ = """The settings of the objective, a frozen dataclass of the TrainConfig fields named in
LOSS_FIELDS, with their types and defaults (the paper's); TrainConfig documents each one: which terms are on
(``kd``, ``rcka``), RCKA's weight ``omega``, GDKD's ``temperature``, ``tckd_weight``, ``nckd_weight``, ``gate``,
``gate_temperature``, ``kd_type`` ("dkd" or "kl"), ``kd_t2`` (the KD term's convention: times T^2 or not), and
the warm-up lengths of the two distillation terms in optimizer steps."""


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


class TeacherCache:
    """The frozen teacher's outputs per micro-batch, computed once and handed again to every later run that
    draws the same micro-batch from the same teacher.

    Runs with the same data file, seed and batch size draw the same micro-batches in the same order
    (grace.data.SampleOrder), so every distillation run of one seed (QAT + KD, GRACE, its ablations, an INT8 or
    an unquantized GRACE) needs the teacher's forward only once: the later runs read it back, bit for bit what
    they would have computed (the same inputs through the same frozen model; the penultimate layer is kept
    whether or not the first run asked for it, which leaves the last hidden state unchanged).

    A micro-batch is keyed by ``teacher_key`` (which teacher, in which dtypes: :func:`teacher_key`) and the bytes
    of its model inputs (MODEL_INPUTS). Entries are kept until ``max_bytes`` of hidden states are stored; later
    micro-batches are computed and not stored. The cache lives in memory, in the process that trains; a caller
    keeps it no longer than the teacher's weights stay what they were (the key also holds the weight files'
    sizes and modification times).

    Raises:
        ValueError: max_bytes < 0.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._store: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def outputs(self, teacher, family: Family, batch: dict, *, kd: bool, rcka: bool,
                teacher_key: str) -> TeacherOutputs:
        """What :func:`teacher_outputs` returns for this micro-batch, from the cache when it holds it."""
        if teacher is None or not (kd or rcka):
            return TeacherOutputs(None, None, None)
        import hashlib

        h = hashlib.blake2b(teacher_key.encode(), digest_size=32)
        for k in MODEL_INPUTS:
            if k in batch:
                v = batch[k].detach().contiguous().cpu()
                h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
                h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        key = h.digest()
        found = self._store.get(key)
        if found is None:
            self.misses += 1
            with torch.no_grad():
                found = _hidden(family, teacher, batch, True)
            size = sum(t.numel() * t.element_size() for t in found)
            if self.bytes + size <= self.max_bytes:
                self._store[key] = found
                self.bytes += size
        else:
            self.hits += 1
        hidden, pen = found
        return TeacherOutputs(hidden, pen if rcka else None, family.lm_head(teacher))


def teacher_key(path: str, *dtypes: torch.dtype) -> str:
    """The :class:`TeacherCache` key of the teacher checkpoint at ``path`` run in ``dtypes``: its absolute
    path, the dtypes, and the size and modification time of each weight file, so a teacher trained again into
    the same directory is a new key."""
    import glob
    import os

    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
                   + glob.glob(os.path.join(glob.escape(path), "*.bin")))
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return f"{os.path.abspath(path)}|{','.join(map(str, dtypes))}|{stats}"


def student_objective(student, family: Family, batch: dict, teacher: TeacherOutputs, loss: LossConfig, *,
                      beta: float, gdkd_scale: float = 1.0, rcka_scale: float = 1.0) -> LossParts:
    """The student's forward and the loss for one micro-batch (module docstring for the terms), with the
    settings of ``loss`` and this step's ``beta``.

    ``gdkd_scale`` and ``rcka_scale`` are the warm-up weights of the two distillation terms
    (:meth:`LossConfig.scales`). ``loss.kd_t2`` picks the KD term's convention (TrainConfig.kd_t2): False, the
    paper's Eqs. 1-3 without a T^2 factor; True, times T^2 as in the release. The returned ``gdkd`` (what the
    controller compares with tau) is on the same scale as the term in ``total``. Under FSDP the trainer registers
    this as a forward method of the sharded student (it reads the LM head's weight directly, outside any
    submodule's forward).

    Raises:
        ValueError: teacher and student hidden states of different sequence shapes; images whose token
            counts do not match the image tokens of ``input_ids``.
    """
    labels = batch["labels"]
    kd, rcka = loss.kd, loss.rcka
    hs, hs_pen = _hidden(family, student, batch, rcka)
    ht = teacher.hidden
    if ht is not None and ht.shape[:2] != hs.shape[:2]:
        raise ValueError(f"teacher sequence shape {tuple(ht.shape[:2])} differs from the student's "
                         f"{tuple(hs.shape[:2])}: they must see the same tokens (one processor)")
    target = labels[:, 1:].reshape(-1)
    head_s = family.lm_head(student)
    kd_weight = beta * gdkd_scale if (kd and ht is not None) else 0.0
    # The fused loss's KD term carries T^2 (grace_kernels.gated_dkd_loss); the paper's convention divides it out.
    # The loss is linear in kd_weight and its gradient too, so scaling the weight is exact, not an approximation.
    kd_scale = 1.0 if loss.kd_t2 else 1.0 / loss.temperature ** 2
    head_t = teacher.lm_head
    lm = gk.fused_linear_grace_loss(
        hs[:, :-1].reshape(-1, hs.shape[-1]), head_s.weight, target=target, student_bias=head_s.bias,
        teacher_hidden=ht[:, :-1].reshape(-1, ht.shape[-1]) if kd_weight else None,
        teacher_weight=head_t.weight if kd_weight else None, teacher_bias=head_t.bias if kd_weight else None,
        ce_weight=1.0, kd_weight=kd_weight * kd_scale, temperature=loss.temperature, tckd_weight=loss.tckd_weight,
        nckd_weight=loss.nckd_weight, gate=loss.gate, gate_temperature=loss.gate_temperature, kd_type=loss.kd_type)
    total = lm.loss
    # A micro-batch without a usable image (text-only records, as in LLaVA's mix665k) adds no RCKA term: weight
    # and gradient zero, and rcka_images 0 tells the trainer that the zero below was not measured.
    rcka_value, rcka_images = torch.zeros((), device=hs.device), 0
    if rcka and teacher.penultimate is not None:
        token_id = family.image_token_id(student.config)
        per_image = family.image_token_counts(student.config, batch)
        mask, _, cu, rows = image_segments(batch["input_ids"], token_id, per_image)
        if cu.numel() > 1:
            rcka_value, dropped = rcka_per_image(hs_pen[mask][rows], teacher.penultimate[mask][rows], cu)
            rcka_images = cu.numel() - 1 - dropped
            if rcka_images:
                total = total + loss.omega * rcka_scale * rcka_value
    return LossParts(total, lm.ce, lm.gdkd * kd_scale, rcka_value.detach(), lm.gate_mean, int(lm.num_valid),
                     rcka_images)
