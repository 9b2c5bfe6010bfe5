"""GRACE's objective against the authors' release: RCKA per image, degenerate images left out of the mean,
the warm-up ramps, and the released preset."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from grace import TrainConfig
from grace.demo.tiny import build_processor, build_tiny_vlm
from grace.families import family_of
from grace.objective import (
    LOSS_FIELDS,
    MODEL_INPUTS,
    RCKA_MIN_TOKENS,
    LossConfig,
    image_segments,
    rcka_per_image,
    student_objective,
    teacher_outputs,
    warmup_scale,
)

pytestmark = pytest.mark.usefixtures("reference_backend")   # the kernels are parity-tested in their own files


def cka64(s: torch.Tensor, t: torch.Tensor) -> float:
    """Linear CKA of row-normalised features, in float64, written from the definition."""
    def centered_gram(x):
        x = x.double() / x.double().norm(dim=-1, keepdim=True)
        k = x @ x.T
        n = k.shape[0]
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        return h @ k @ h
    ks, kt = centered_gram(s), centered_gram(t)
    return float((ks * kt).sum() / ((ks * ks).sum() * (kt * kt).sum()).sqrt())


# ---------------------------------------------------------------- warm-up ramps

def test_warmup_scale_matches_the_release_schedule():
    assert warmup_scale(0, 400) == 0.0
    assert warmup_scale(1, 400) == 1 / 400
    assert warmup_scale(399, 400) == 399 / 400
    assert warmup_scale(400, 400) == 1.0
    assert warmup_scale(10_000, 400) == 1.0
    assert warmup_scale(0, 0) == 1.0           # DKD_WARMUP_STEPS=0: GDKD whole from the first step
    with pytest.raises(ValueError, match="step"):
        warmup_scale(-1, 400)


def test_released_preset_ramps_rcka_only():
    cfg = TrainConfig.from_preset("released")
    assert (cfg.gdkd_warmup_steps, cfg.rcka_warmup_steps) == (0, 400)
    assert (cfg.tau, cfg.eta, cfg.beta_init, cfg.beta_min, cfg.beta_max, cfg.omega) == (3.0, 0.003, 0.5, 0.1, 1.0, 3.0)
    assert [warmup_scale(s, cfg.gdkd_warmup_steps) for s in (0, 1, 399, 400)] == [1.0, 1.0, 1.0, 1.0]
    assert [warmup_scale(s, cfg.rcka_warmup_steps) for s in (0, 1, 399, 400)] == [0.0, 1 / 400, 399 / 400, 1.0]
    paper = TrainConfig.from_preset("paper")
    assert (paper.gdkd_warmup_steps, paper.rcka_warmup_steps) == (0, 0)
    with pytest.raises(ValueError, match="rcka_warmup_steps must be an integer >= 0"):
        TrainConfig.from_preset("paper", rcka_warmup_steps=-1).validate(check_paths=False)


def test_loss_config_carries_each_loss_field_of_the_train_config():
    assert LossConfig() == LossConfig(**{name: getattr(TrainConfig, name) for name in LOSS_FIELDS})
    cfg = TrainConfig.from_preset("released")
    loss = LossConfig.from_train_config(cfg)
    assert {name: getattr(loss, name) for name in LOSS_FIELDS} == {name: getattr(cfg, name) for name in LOSS_FIELDS}
    assert (loss.kd_t2, loss.omega, loss.rcka_warmup_steps) == (True, 3.0, 400)   # not the paper's defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.omega = 1.0


# ---------------------------------------------------------------- per-image segments and degenerate images

def test_image_segments_split_a_multi_image_sample():
    tok = 9
    ids = torch.tensor([[1, tok, tok, tok, tok, 2, tok, tok, tok, tok, tok, tok, 0],
                        [1, 2, 3, 4, 5, 6, 7, 8, 1, tok, tok, tok, tok]])
    mask, keep, cu, rows = image_segments(ids, tok, torch.tensor([4, 6, 4]))
    assert int(mask.sum()) == 14
    assert keep.tolist() == [True, True, True] and cu.tolist() == [0, 4, 10, 14]
    assert rows.tolist() == list(range(14))
    # An image below the release's minimum token count is left out; the rows of the others stay in order.
    ids2 = torch.tensor([[tok, tok, tok, tok, 5, tok, tok, 5, tok, tok, tok, tok]])
    _, keep, cu, rows = image_segments(ids2, tok, torch.tensor([4, 2, 4]))
    assert RCKA_MIN_TOKENS == 4 and keep.tolist() == [True, False, True]
    assert cu.tolist() == [0, 4, 8] and rows.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="images and placeholders disagree"):
        image_segments(ids, tok, torch.tensor([4, 4]))


def test_degenerate_image_is_left_out_of_the_mean():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(14, 24, generator=g, dtype=torch.float64)
    s = torch.randn(14, 16, generator=g, dtype=torch.float64)
    s[4:10] = s[4]                                   # the second image's student tokens are all identical
    cu = torch.tensor([0, 4, 10, 14])
    s1 = s.clone().requires_grad_(True)
    loss, dropped = rcka_per_image(s1, t, cu)
    assert dropped == 1
    expected = ((1 - cka64(s[0:4], t[0:4])) + (1 - cka64(s[10:14], t[10:14]))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # Same gradient as training on the two usable images alone (not shrunk by the degenerate one).
    keep = torch.cat([torch.arange(0, 4), torch.arange(10, 14)])
    s2 = s[keep].clone().requires_grad_(True)
    rcka_per_image(s2, t[keep], torch.tensor([0, 4, 8]))[0].backward()
    torch.testing.assert_close(s1.grad[keep], s2.grad, rtol=1e-5, atol=1e-7)
    assert float(s1.grad[4:10].abs().sum()) == 0.0
    # Nothing usable: a zero that leaves the student untouched.
    only = s[4:10].clone().requires_grad_(True)
    zero, dropped = rcka_per_image(only, t[4:10], torch.tensor([0, 6]))
    assert dropped == 1 and float(zero) == 0.0 and not zero.requires_grad


# ---------------------------------------------------------------- a multi-image sample through the objective

@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("objective")
    paths = {size: build_tiny_vlm(str(root / size), family="qwen2_vl", size=size, seed=i)
             for i, size in enumerate(("teacher", "student"))}
    teacher = AutoModelForImageTextToText.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
    student = AutoModelForImageTextToText.from_pretrained(paths["student"], dtype=torch.float32)
    return teacher.requires_grad_(False), student, build_processor(family="qwen2_vl")


def two_image_batch(processor):
    images = [Image.fromarray((np.random.default_rng(i).random((56, 56, 3)) * 255).astype(np.uint8))
              for i in range(2)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "what is the color"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages)
    batch = dict(processor(text=[text], images=images, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    return batch


def test_rcka_is_the_mean_over_the_images_of_a_sample(qwen_pair):
    teacher, student, processor = qwen_pair
    family = family_of(student.config)
    batch = two_image_batch(processor)
    assert batch["image_grid_thw"].shape[0] == 2
    t_out = teacher_outputs(teacher, family, batch, kd=True, rcka=True)
    parts = student_objective(student, family, batch, t_out, LossConfig(omega=1.0, kd=True, rcka=True), beta=1.0)
    with torch.no_grad():
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        hs = family.backbone(student)(**inputs, output_hidden_states=True).hidden_states[-2][0]
    ht = t_out.penultimate[0]
    pos = (batch["input_ids"][0] == family.image_token_id(student.config)).nonzero().squeeze(1)
    per_image = family.image_token_counts(student.config, batch).tolist()
    assert len(pos) == sum(per_image) and len(per_image) == 2
    a, b = pos[:per_image[0]], pos[per_image[0]:]
    expected = ((1 - cka64(hs[a], ht[a])) + (1 - cka64(hs[b], ht[b]))) / 2
    assert float(parts.rcka) == pytest.approx(expected, rel=1e-4)
    per_sequence = 1 - cka64(hs[pos], ht[pos])   # what one Gram matrix over both images would give
    assert abs(per_sequence - expected) > 1e-3


def test_ramps_reach_the_objective(qwen_pair):
    teacher, student, processor = qwen_pair
    family = family_of(student.config)
    batch = two_image_batch(processor)
    t_out = teacher_outputs(teacher, family, batch, kd=True, rcka=True)
    kw = dict(beta=0.7)
    settings = LossConfig(omega=3.0, kd=True, rcka=True)
    with torch.no_grad():
        full = student_objective(student, family, batch, t_out, settings, **kw)
        off = student_objective(student, family, batch, t_out, settings, rcka_scale=warmup_scale(0, 400), **kw)
        quarter = student_objective(student, family, batch, t_out, settings, rcka_scale=warmup_scale(100, 400), **kw)
    torch.testing.assert_close(off.total, full.ce + 0.7 * full.gdkd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(quarter.total, full.ce + 0.7 * full.gdkd + 3.0 * 0.25 * full.rcka,
                               rtol=1e-6, atol=1e-6)
    assert float(off.rcka) == pytest.approx(float(full.rcka))   # the logged term is unscaled


def test_trainer_passes_the_step_to_the_ramps(tmp_path, monkeypatch):
    """Steps 0 and 1 of a run with rcka_warmup_steps=2: the objective sees RCKA scales 0 and 1/2."""
    import importlib

    train_mod = importlib.import_module("grace.train")
    seen = []
    real = train_mod.student_objective

    def spy(*args, **kwargs):
        seen.append((kwargs["gdkd_scale"], kwargs["rcka_scale"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "student_objective", spy)
    root = tmp_path
    (root / "images").mkdir()
    records = []
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((56, 56, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color"}, {"from": "gpt", "value": "red"}]})
    (root / "data.json").write_text(json.dumps(records))
    t = build_tiny_vlm(str(root / "t"), family="qwen2_vl", size="teacher", seed=1)
    s = build_tiny_vlm(str(root / "s"), family="qwen2_vl", size="student", seed=2)
    cfg = TrainConfig(teacher=t, student=s, data=str(root / "data.json"), image_folder=str(root / "images"),
                      output_dir=str(root / "run"), max_steps=2, batch_size=1, grad_accum=1,
                      gdkd_warmup_steps=0, rcka_warmup_steps=2)
    train_mod.train(cfg, progress=False)
    assert seen == [(1.0, 0.0), (1.0, 0.5)]


def test_kd_convention_divides_t2_out_of_the_loss_and_its_gradient(qwen_pair):
    """kd_t2=False (the paper's Eqs. 1-3) is the release's T^2 term divided by T^2: the logged GDKD, the total
    and the student's gradient all equal the T^2 run's with beta / T^2."""
    teacher, student, processor = qwen_pair
    family = family_of(student.config)
    batch = two_image_batch(processor)
    t_out = teacher_outputs(teacher, family, batch, kd=True, rcka=False)
    temperature, beta = 2.0, 0.8

    def run(kd_t2, b):
        student.zero_grad(set_to_none=True)
        settings = LossConfig(omega=1.0, kd=True, rcka=False, temperature=temperature, kd_t2=kd_t2)
        parts = student_objective(student, family, batch, t_out, settings, beta=b)
        parts.total.backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        return parts, grads

    paper, g_paper = run(False, beta)
    release, g_release = run(True, beta / temperature ** 2)
    assert float(release.gdkd) > 0
    torch.testing.assert_close(paper.gdkd * temperature ** 2, release.gdkd, rtol=1e-6, atol=0)
    torch.testing.assert_close(paper.total, paper.ce + beta * paper.gdkd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(paper.total, release.total, rtol=1e-6, atol=1e-7)
    assert len(g_paper) == len(g_release) > 0
    for a, b in zip(g_paper, g_release, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    student.zero_grad(set_to_none=True)
