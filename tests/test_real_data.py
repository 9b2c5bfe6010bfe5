"""Real data trains what it should: `grace train` run as a user runs it (a subprocess) on tiny LLaVA-1.5 and
Qwen2-VL checkpoints and LLaVA-format JSON shaped like LLaVA-1.5's mix665k (image records, text-only records,
multi-turn conversations)."""

import json
import os
import subprocess
import sys

import cli_checks
import numpy as np
import pytest
import torch
from PIL import Image

FAMILIES = ("llava", "qwen2_vl")
ENV = {**os.environ, "GRACE_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1"}


def write_image(path, size=28, seed=0):
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def mix665k_like(root, n_image=3, n_text=3):
    """Records shaped like mix665k's: single-turn image questions, text-only multi-turn conversations (the
    ShareGPT part, no "image" key) and a multi-turn image conversation."""
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_image):
        write_image(img / f"{i}.png", seed=i)
        records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color of this object ?"},
            {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]})
    for i in range(n_text):
        records.append({"id": f"text{i}", "model": "", "conversations": [
            {"from": "human", "value": "how many objects are there ?"}, {"from": "gpt", "value": "two"},
            {"from": "human", "value": "where are they ?"}, {"from": "gpt", "value": "top left"}]})
    records.append({"id": "multi", "image": "0.png", "conversations": [
        {"from": "human", "value": "what is the shape of this object ?\n<image>"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "what is the color ?"}, {"from": "gpt", "value": "red"}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(img)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, family_setup):
    return family_setup(tmp_path_factory.mktemp(request.param), request.param, mix665k_like)


def grace_train(pair, out, *extra, data=None, images=None, teacher=None, student=None):
    """`grace train` in a subprocess, 4 steps of 1 x 1 by default; returns the CompletedProcess."""
    args = [sys.executable, "-m", "grace", "train", "--teacher", teacher or pair["teacher"],
            "--student", student or pair["student"], "--data", data or pair["data"],
            "--image-folder", images or pair["images"], "--output-dir", str(out), "--max-steps", "4",
            "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-3", "--num-workers", "0", "--no-progress", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_one_line_error(proc, *fragments, command="train"):
    """``proc`` (a finished `grace <command>`) exited 2 with one error line holding every fragment amid its
    log, no traceback; returns the line."""
    return cli_checks.assert_one_line_error(proc.returncode, proc.stderr, *fragments, command=command)


# --- text-only micro-batches with RCKA on (the default) ---

@pytest.mark.parametrize("extra", [(), ("--group-by-length", "--batch-size", "2")], ids=["batch1", "grouped"])
def test_text_only_micro_batches_train_with_rcka_on(pair, tmp_path, extra):
    out = tmp_path / "run"
    proc = grace_train(pair, out, "--max-steps", "6", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert len(rows) == 6
    text_only = [r for r in rows if r["rcka_images"] == 0]
    with_images = [r for r in rows if r["rcka_images"] > 0]
    assert text_only and with_images, rows   # 7 records, 3 of them with an image: both kinds of step occur
    for r in text_only:   # no image measured: no fake zero, CE and GDKD still train and steer beta
        assert r["rcka"] is None and r["ce"] > 0 and r["gdkd"] > 0
    for r in with_images:
        assert 0 < r["rcka"] < 2
    assert all(np.isfinite(r["ema_gdkd"]) and np.isfinite(r["loss"]) for r in rows)
    beta, ema = 1.0, None   # the controller saw every step's GDKD, text-only steps included (paper defaults)
    for r in rows:
        ema = r["gdkd"] if ema is None else 0.99 * ema + 0.01 * r["gdkd"]
        beta += 0.0015 * (ema - 0.35)
        assert r["ema_gdkd"] == pytest.approx(ema, rel=1e-4) and r["beta"] == pytest.approx(beta, rel=1e-6)


def test_text_only_micro_batch_has_no_rcka_weight_or_gradient(pair):
    """student_objective on a text-only batch: rcka_images 0, total == CE + beta * GDKD exactly, and the
    vision-free backward is the one without RCKA."""
    from transformers import AutoModelForImageTextToText

    from grace.data import ConversationDataset, RecordIndex, collate
    from grace.demo.tiny import build_processor
    from grace.families import family_of
    from grace.objective import LossConfig, student_objective, teacher_outputs

    records = json.load(open(pair["data"]))
    text = [r for r in records if "image" not in r][:2]
    processor = build_processor(family=pair["family"])
    ds = ConversationDataset(RecordIndex.from_records(text), processor, pair["images"], 128)
    batch = collate([ds[0], ds[1]], processor.tokenizer.pad_token_id)
    student = AutoModelForImageTextToText.from_pretrained(pair["student"])
    teacher = AutoModelForImageTextToText.from_pretrained(pair["teacher"]).eval()
    family = family_of(student.config)
    grads = []
    for rcka in (True, False):
        student.zero_grad()
        t_out = teacher_outputs(teacher, family, batch, kd=True, rcka=rcka)
        parts = student_objective(student, family, batch, t_out, LossConfig(omega=1.5, kd=True, rcka=rcka), beta=0.7)
        assert parts.rcka_images == 0 and float(parts.rcka) == 0
        torch.testing.assert_close(parts.total.detach(), parts.ce + 0.7 * parts.gdkd)
        parts.total.backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
