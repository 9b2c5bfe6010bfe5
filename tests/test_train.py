"""The GRACE trainer end to end on tiny local LLaVA-1.5, Qwen2-VL and Qwen2.5-VL checkpoints (CPU)."""

import collections
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from grace import TrainConfig, train
from grace.data import ConversationDataset, SkipSample, load_records
from grace.demo.tiny import build_processor, build_tiny_vlm
from grace.errors import GraceError
from grace.families import family_of
from grace.objective import LossConfig, student_objective, teacher_outputs
from grace.quantize import quantize_model

ANSWERS = ["red", "green", "blue", "yellow"]
train_mod = importlib.import_module("grace.train")   # ``grace.train`` the attribute is the function
rundir = importlib.import_module("grace.rundir")


@pytest.fixture(autouse=True)
def reference_kernels(request):
    """The trainer's logic is under test here, the kernels are parity-tested in their own files: run the
    PyTorch references (the Triton interpreter is ~10x slower on these shapes), except in the tests that
    exercise the kernels inside the trainer on purpose."""
    if "triton_in_trainer" not in request.keywords:
        request.getfixturevalue("reference_backend")


def write_dataset(root, n=8, corrupt=True):
    """n good samples (one-word answers, so every sample has the same number of supervised tokens),
    plus a corrupt image, a missing image and an empty conversation."""
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        pixels = (np.random.default_rng(i).random((28, 28, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(img / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color of this object ?"},
            {"from": "gpt", "value": ANSWERS[i % 4]}]})
    if corrupt:
        (img / "corrupt.png").write_bytes(b"this is not a png")
        records += [{"id": "corrupt", "image": "corrupt.png", "conversations": records[0]["conversations"]},
                    {"id": "missing", "image": "nope.png", "conversations": records[0]["conversations"]},
                    {"id": "empty", "image": "0.png", "conversations": []},
                    {"id": "no placeholder", "image": "0.png", "conversations": [
                        {"from": "human", "value": "what is the color ?"}, {"from": "gpt", "value": "red"}]}]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(img)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def setup(request, tmp_path_factory, family_setup):
    return family_setup(tmp_path_factory.mktemp(request.param), request.param, write_dataset)


def config(s, out, **kw):
    base = dict(teacher=s["teacher"], student=s["student"], data=s["data"], image_folder=s["images"],
                output_dir=str(out), max_steps=2, batch_size=2, grad_accum=2, lr=1e-3, seed=0)
    return TrainConfig(**{**base, **kw})


def test_data_loader_skips_bad_samples_and_supervises_answers_only(setup):
    processor = build_processor(family=setup["family"])
    ds = ConversationDataset(load_records(setup["data"]), processor, setup["images"], max_length=2048)
    samples, met = _encode_all(ds)   # bad records are found when drawn
    assert len(samples) == 8 and met == {"missing or unreadable image": 2, "empty conversation": 1,
                                         "image without exactly one <image> token": 1}
    tok = processor.tokenizer
    for i, sample in enumerate(samples):
        supervised = sample["labels"][sample["labels"] != -100].tolist()
        assert tok.convert_ids_to_tokens(supervised) == [ANSWERS[i % 4], "</s>"]
    short = ConversationDataset(load_records(setup["data"]), processor, setup["images"], max_length=8)
    assert _encode_all(short)[1]["longer than max_length"] == 8


def _encode_all(ds):
    samples, met = [], collections.Counter()
    for i in range(len(ds)):
        try:
            samples.append(ds[i])
        except SkipSample as s:
            met[s.reason] += 1
    return samples, met


def test_data_loader_supervises_every_assistant_turn(setup, tmp_path):
    processor = build_processor(family=setup["family"])
    conv = [{"from": "human", "value": "<image>\nwhat is the color ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what is the shape ?"}, {"from": "gpt", "value": "circle square"}]
    ds = ConversationDataset([{"id": "multi", "image": "0.png", "conversations": conv}], processor,
                             setup["images"], max_length=2048)
    labels = ds[0]["labels"]
    tokens = processor.tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
    assert tokens == ["red", "</s>", "circle", "square", "</s>"]


@pytest.mark.triton_in_trainer
def test_one_step_end_to_end(setup, tmp_path):
    from transformers import AutoModelForImageTextToText

    result = train(config(setup, tmp_path / "run", max_steps=1), progress=False)
    row = result.metrics[-1]
    assert all(np.isfinite(row[k]) for k in ("loss", "ce", "gdkd", "rcka"))
    assert row["gdkd"] > 0 and row["rcka"] > 0 and 0 < row["gate"] <= 1
    # Bad records are counted when drawn: the 4 samples of one step meet some of them.
    bad = {"missing or unreadable image": 2, "empty conversation": 1, "image without exactly one <image> token": 1}
    assert all(0 < n <= bad[k] for k, n in result.skipped.items())
    after = torch.load(os.path.join(result.final_dir, "student_state.pt"))
    initial = AutoModelForImageTextToText.from_pretrained(setup["student"], dtype=torch.float32)
    quantize_model(initial, bits=4, group_size=128, verbose=False)
    before = initial.state_dict()
    qnames = json.load(open(os.path.join(result.final_dir, "quantization.json")))["modules"]
    assert len(qnames) == 14
    for name in qnames:   # every quantized layer's weight and LSQ scales moved
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
        assert not torch.equal(after[f"{name}.log_scale"], before[f"{name}.log_scale"]), name
    vision = [k for k in before if ".vision_tower." in k or ".visual." in k]
    assert vision and all(torch.equal(after[k].float(), before[k].float()) for k in vision)  # frozen
    assert os.path.getsize(os.path.join(result.run_dir, "controller.png")) > 1000
    assert json.load(open(os.path.join(result.run_dir, "config.json")))["gate"] is True


@pytest.fixture(scope="module")
def models_and_batch(setup):
    from transformers import AutoModelForImageTextToText

    from grace.data import collate

    processor = build_processor(family=setup["family"])
    ds = ConversationDataset(load_records(setup["data"]), processor, setup["images"], max_length=2048)
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
    teacher = AutoModelForImageTextToText.from_pretrained(setup["teacher"], dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    # A random tiny teacher is almost uniform on every token, so every gate would be equal and gating a
    # no-op; a sharper LM head gives tokens of different confidence.
    teacher.get_output_embeddings().weight.mul_(30.0)
    student = AutoModelForImageTextToText.from_pretrained(setup["student"], dtype=torch.float32)
    quantize_model(student, bits=4, group_size=128, verbose=False)
    return student, teacher, family_of(student.config), batch


def _parts(models_and_batch, **kw):
    student, teacher, family, batch = models_and_batch
    settings = LossConfig(**{**dict(omega=1.5, kd=True, rcka=True), **kw})
    t_out = teacher_outputs(teacher, family, batch, kd=settings.kd, rcka=settings.rcka)
    return student_objective(student, family, batch, t_out, settings, beta=0.7)


def test_objective_gradients_reach_student_not_teacher(models_and_batch):
    student, teacher, _, _ = models_and_batch
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.zero_grad()
    parts = _parts(models_and_batch)
    parts.total.backward()
    scales = [p for n, p in student.named_parameters() if n.endswith("log_scale")]
    assert scales and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    torch.testing.assert_close(parts.total.detach(), parts.ce + 0.7 * parts.gdkd + 1.5 * parts.rcka)


def test_ablation_switches_change_exactly_their_terms(models_and_batch):
    with torch.no_grad():
        full = _parts(models_and_batch)
        no_kd = _parts(models_and_batch, kd=False)
        no_rcka = _parts(models_and_batch, rcka=False)
        no_gate = _parts(models_and_batch, gate=False)
        naive = _parts(models_and_batch, kd_type="kl")
    exact = dict(rtol=1e-6, atol=1e-7)
    for p in (no_kd, no_rcka, no_gate, naive):   # CE is never touched by an ablation
        torch.testing.assert_close(p.ce, full.ce, **exact)
    assert float(no_kd.gdkd) == 0 and torch.allclose(no_kd.rcka, full.rcka)
    torch.testing.assert_close(no_kd.total, full.ce + 1.5 * full.rcka, **exact)
    assert float(no_rcka.rcka) == 0 and torch.allclose(no_rcka.gdkd, full.gdkd)
    torch.testing.assert_close(no_rcka.total, full.ce + 0.7 * full.gdkd, **exact)
    assert not torch.allclose(no_gate.gdkd, full.gdkd) and torch.allclose(no_gate.rcka, full.rcka)
    assert float(no_gate.gate_mean) == 1.0
    assert not torch.allclose(naive.gdkd, full.gdkd) and torch.allclose(naive.rcka, full.rcka)


def test_fixed_beta_never_moves(setup, tmp_path):
    result = train(config(setup, tmp_path / "fixed", adaptive_beta=False, beta_init=2.0, max_steps=2), progress=False)
    assert [r["beta"] for r in result.metrics] == [2.0, 2.0]
    adaptive = train(config(setup, tmp_path / "adaptive", max_steps=2), progress=False)
    betas = [r["beta"] for r in adaptive.metrics]
    assert betas[0] != 1.0 and betas[0] != betas[1]


def test_resume_continues_bit_for_bit(setup, tmp_path, monkeypatch):
    if setup["family"] != "llava":
        pytest.skip("one family is enough for the checkpoint logic")
    full = train(config(setup, tmp_path / "full", max_steps=4, save_every=2), progress=False)

    real_publish = rundir.publish_checkpoint

    def crash_after_first_checkpoint(tmp, path):
        real_publish(tmp, path)
        raise KeyboardInterrupt("simulated kill after step 2")

    monkeypatch.setattr(rundir, "publish_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, tmp_path / "cut", max_steps=4, save_every=2), progress=False)
    monkeypatch.setattr(rundir, "publish_checkpoint", real_publish)
    assert torch.load(tmp_path / "cut" / "checkpoint" / rundir.TRAINER_STATE, weights_only=False)["step"] == 2
    resumed = train(config(setup, tmp_path / "cut", max_steps=4, save_every=2, resume=True), progress=False)
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in full.metrics]
    assert [r["beta"] for r in resumed.metrics] == [r["beta"] for r in full.metrics]
    a = torch.load(os.path.join(full.final_dir, "student_state.pt"))
    b = torch.load(os.path.join(resumed.final_dir, "student_state.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_saved_before_kd_t2_reads_the_t2_convention(setup, tmp_path):
    """A checkpoint whose settings predate kd_t2 trained with KD x T^2: resuming it under the paper's
    convention (kd_t2 False, the default now) is refused by name, under --kd-t2 it continues; a run without KD
    has no KD term to scale and resumes under the default. What the resume reads is the checkpoint's trainer state."""
    if setup["family"] != "llava":
        pytest.skip("one family is enough for the checkpoint logic")
    for kd in (True, False):
        out = tmp_path / f"kd{kd}"
        train(config(setup, out, max_steps=2, save_every=2, kd=kd, kd_t2=True), progress=False)
        state_path = out / "checkpoint" / rundir.TRAINER_STATE
        state = torch.load(state_path, weights_only=False)
        del state["config"]["kd_t2"]
        torch.save(state, state_path)
        if kd:
            with pytest.raises(GraceError, match=r"kd_t2 False \(checkpoint: True\)"):
                rundir.check_run_dir(config(setup, out, max_steps=2, save_every=2, resume=True))
        resumed = rundir.check_run_dir(config(setup, out, max_steps=2, save_every=2, kd=kd, kd_t2=kd,
                                                 resume=True))
        assert resumed["step"] == 2 and "kd_t2" not in resumed["config"]


def test_teacher_cache_replays_the_teacher_bit_for_bit(setup, tmp_path):
    """Runs of one seed draw the same micro-batches: with a shared TeacherCache the second run computes no
    teacher forward and trains exactly as it does alone (losses, beta, final weights); another seed misses."""
    if setup["family"] != "llava":
        pytest.skip("the cache is family-agnostic: it keys the batch's model inputs")

    def run(name, cache=None, **kw):
        return train(config(setup, tmp_path / name, **kw), progress=False, teacher_cache=cache)

    def same(x, y):
        drop = ("tokens_per_s",)   # wall time
        assert [{k: v for k, v in r.items() if k not in drop} for r in x.metrics] == \
            [{k: v for k, v in r.items() if k not in drop} for r in y.metrics]
        a = torch.load(os.path.join(x.final_dir, "student_state.pt"))
        b = torch.load(os.path.join(y.final_dir, "student_state.pt"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    alone_kd, alone_grace = run("kd", kd_type="kl", rcka=False), run("grace")
    cache = train_mod.TeacherCache()
    same(run("kd-cached", cache, kd_type="kl", rcka=False), alone_kd)
    assert (cache.hits, cache.misses) == (0, 4)   # 2 steps x 2 micro-batches, each computed once
    same(run("grace-cached", cache), alone_grace)   # needs the penultimate layer the first run did not
    assert (cache.hits, cache.misses) == (4, 4) and cache.bytes > 0
    run("other-seed", cache, seed=1)
    assert cache.misses > 4
    with pytest.raises(ValueError, match="max_bytes"):
        train_mod.TeacherCache(max_bytes=-1)


def test_bad_configuration_fails_before_loading(setup, tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found"):
        train(config(setup, tmp_path / "x", teacher=str(tmp_path / "nowhere")), progress=False)
    with pytest.raises(ValueError, match="bits must be"):
        train(config(setup, tmp_path / "x", bits=3), progress=False)
    other = "llava" if setup["family"].startswith("qwen") else "qwen2_vl"
    other_dir = build_tiny_vlm(str(tmp_path / "other"), family=other, size="teacher")
    with pytest.raises(ValueError, match="same family"):
        train(config(setup, tmp_path / "x", teacher=other_dir), progress=False)


def test_cli_reports_bad_config_in_one_line(setup, tmp_path, capsys):
    from grace.cli import main

    rc = main(["train", "--student", setup["student"], "--teacher", setup["teacher"], "--data", "missing.json",
               "--output-dir", str(tmp_path / "cli")])
    assert rc == 2 and "data file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(setup, tmp_path):
    """2 ranks x batch 1 (gloo, FSDP-sharded student) == 1 process x batch 2: same samples per step."""
    if setup["family"] != "llava":
        pytest.skip("one family is enough for the distributed logic")
    args = ["-m", "grace", "train", "--teacher", setup["teacher"], "--student", setup["student"],
            "--data", setup["data"], "--image-folder", setup["images"], "--max-steps", "3", "--grad-accum", "2",
            "--lr", "1e-3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist_run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args,
                               "--batch-size", "1", "--output-dir", str(tmp_path / "dist")],
                              capture_output=True, text=True, env=env, timeout=600)
    assert dist_run.returncode == 0, dist_run.stderr[-3000:]
    single = train(config(setup, tmp_path / "single", max_steps=3, batch_size=2, grad_accum=2), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "dist" / "metrics.jsonl")]
    assert len(rows) == 3
    for d, s in zip(rows, single.metrics, strict=True):
        # Step 1 sees identical parameters: only float summation order differs. Later steps follow Adam
        # updates, which amplify those last-bit gradient differences where gradients are near zero.
        rel = 1e-4 if d["step"] == 1 else 1e-2
        for key in ("loss", "ce", "gdkd", "rcka", "beta"):
            assert d[key] == pytest.approx(s[key], rel=rel, abs=1e-6), (d["step"], key)
        assert d["tokens"] == s["tokens"]
    state = torch.load(tmp_path / "dist" / "final" / "student_state.pt")
    assert all(not hasattr(v, "device_mesh") for v in state.values())   # gathered, not sharded

    # The 2 ranks' sharded checkpoint resumes in 1 process (same global batch): the student and AdamW states
    # it loads and saves again are the ones the 2 ranks wrote, bit for bit.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "dist" / "checkpoint", tmp_path / "two_ranks.pt")
    resumed = train(config(setup, tmp_path / "dist", max_steps=3, batch_size=2, grad_accum=2, resume=True),
                    progress=False)
    assert resumed.metrics == rows
    dcp_to_torch_save(tmp_path / "dist" / "checkpoint", tmp_path / "one_rank.pt")
    two, one = torch.load(tmp_path / "two_ranks.pt"), torch.load(tmp_path / "one_rank.pt")
    assert two["student"].keys() == one["student"].keys() and two["optimizer"]["state"]
    torch.testing.assert_close(one["student"], two["student"], rtol=0, atol=0)
    torch.testing.assert_close(one["optimizer"]["state"], two["optimizer"]["state"], rtol=0, atol=0)
    final = torch.load(os.path.join(resumed.final_dir, "student_state.pt"))
    torch.testing.assert_close(final, state, rtol=0, atol=0)
