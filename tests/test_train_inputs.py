"""What `grace train` is given is checked before it trains: the teacher's tokenizer against the student's, and
every tensor of both checkpoints. Run as a user runs it (a subprocess) on tiny checkpoints and mix665k-shaped
data (see test_real_data)."""

import json
import os
import shutil

import pytest
import test_real_data
import torch
from safetensors.torch import load_file, save_file
from test_real_data import assert_one_line_error, grace_train, metrics

from grace.demo.tiny import DEFAULT_WORDS, build_processor, build_tiny_vlm
from grace.families import check_same_tokenizer

pair = test_real_data.pair   # the fixture (a teacher, a student and mix665k-shaped data), by its family
LLAVA = pytest.mark.parametrize("pair", ["llava"], indirect=True)


def _teacher_with_words(root, name, words, family="llava"):
    return build_tiny_vlm(str(root / name), family=family, size="teacher", vocab_words=words, seed=1)


# --- tokenizers ---

@LLAVA
def test_teacher_with_the_same_words_at_other_ids_is_refused(pair, tmp_path):
    words = list(DEFAULT_WORDS)
    words[0], words[1] = words[1], words[0]   # "what" and "is" swap ids: same size, same words
    teacher = _teacher_with_words(tmp_path, "teacher", words)
    proc = grace_train(pair, tmp_path / "run", teacher=teacher)
    line = assert_one_line_error(proc, "tokenizers differ", "'is'", "'what'")
    assert "id 7 " in line, line   # the first differing id: the first word after the 7 special tokens
    assert not os.path.exists(tmp_path / "run")


@LLAVA
def test_teacher_with_real_words_in_the_padding_rows_is_refused(pair, tmp_path):
    teacher = _teacher_with_words(tmp_path, "teacher", [*DEFAULT_WORDS, "purple"])
    rows = [json.load(open(os.path.join(d, "config.json")))["text_config"]["vocab_size"]
            for d in (teacher, pair["student"])]
    assert rows[0] == rows[1]   # the extra word sits in a row the student's tokenizer leaves as padding
    proc = grace_train(pair, tmp_path / "run", teacher=teacher)
    assert_one_line_error(proc, "tokenizers differ", "'purple'", "None for the student")


@LLAVA
def test_teacher_with_another_eos_or_image_token_is_refused(pair, tmp_path):
    teacher = _teacher_with_words(tmp_path, "teacher", None)
    config = json.load(open(os.path.join(teacher, "tokenizer_config.json")))
    config["eos_token"] = "<unk>"
    json.dump(config, open(os.path.join(teacher, "tokenizer_config.json"), "w"))
    proc = grace_train(pair, tmp_path / "run", teacher=teacher)
    assert_one_line_error(proc, "eos_token is '<unk>'", "'</s>'")


def test_special_and_image_tokens_are_compared():
    student = build_processor()
    teacher = build_processor()
    rows = 64
    check_same_tokenizer(teacher.tokenizer, student.tokenizer, teacher_rows=rows, student_rows=rows,
                         teacher_image_token="<image>", student_image_token="<image>")
    with pytest.raises(ValueError, match=r"image token is 'ASSISTANT:' \(id 6\) for the teacher and '<image>' "
                                         r"\(id 4\)"):
        check_same_tokenizer(teacher.tokenizer, student.tokenizer, teacher_rows=rows, student_rows=rows,
                             teacher_image_token="ASSISTANT:", student_image_token="<image>")
    with pytest.raises(ValueError, match="has id 4.*only 4 vocabulary rows"):
        check_same_tokenizer(teacher.tokenizer, student.tokenizer, teacher_rows=4, student_rows=rows)


@LLAVA
def test_teacher_with_more_padding_rows_trains(pair, tmp_path):
    """Padding rows the teacher's tokenizer does not use are allowed: a 128-row teacher for a 64-row student."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(pair["teacher"])
    model.resize_token_embeddings(128, mean_resizing=False)
    teacher = str(tmp_path / "teacher128")
    model.save_pretrained(teacher)
    AutoProcessor.from_pretrained(pair["teacher"]).save_pretrained(teacher)
    proc = grace_train(pair, tmp_path / "run", "--max-steps", "1", teacher=teacher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 1


# --- checkpoint tensors ---

def _broken_copy(src, dst, kind):
    """A copy of checkpoint ``src`` with one defect; returns (dir, on-disk name of the tensor concerned)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if "layers.1.self_attn.q_proj.weight" in k)
    if kind == "truncated":
        os.truncate(path, os.path.getsize(path) - 1000)
        return str(dst), None
    if kind == "missing":
        del tensors[name]
    elif kind == "unexpected":
        name = name.replace("q_proj", "r_proj")
        tensors[name] = torch.zeros(2)
    elif kind == "mismatched":
        tensors[name] = tensors[name][:, :64].contiguous()
    elif kind in ("nan", "inf"):
        tensors[name][3, 5] = float(kind)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst), name


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("kind", ["missing", "unexpected", "mismatched", "nan", "inf", "truncated"])
@LLAVA
def test_checkpoint_defects_are_one_line_naming_file_and_tensor(pair, tmp_path, role, kind):
    broken, name = _broken_copy(pair[role], tmp_path / "broken", kind)
    proc = grace_train(pair, tmp_path / "run", **{role: broken})
    width = 128 if role == "student" else 256
    expect = {"missing": "is missing", "unexpected": "is not a tensor of the model",
              "mismatched": f"has shape ({width}, 64), the model built from config.json needs ({width}, {width})",
              "nan": "NaN or infinite", "inf": "NaN or infinite", "truncated": "truncated or corrupt"}[kind]
    line = assert_one_line_error(proc, os.path.join(broken, "model.safetensors"), expect)
    if name is not None:
        assert f"{role} checkpoint" in line and f"tensor {name} " in line, line
    assert not os.path.exists(tmp_path / "run")   # nothing a corrected retry would need --overwrite for


@pytest.mark.parametrize("pair", ["qwen2_vl"], indirect=True)
def test_qwen_teacher_missing_a_tensor_is_refused(pair, tmp_path):
    broken, name = _broken_copy(pair["teacher"], tmp_path / "broken", "missing")
    proc = grace_train(pair, tmp_path / "run", teacher=broken)
    assert_one_line_error(proc, "teacher checkpoint", f"tensor {name} is missing")


@pytest.mark.slow
@LLAVA
def test_torchrun_student_missing_a_tensor_stops_every_rank(pair, tmp_path):
    """Under torchrun only rank 0 reads the student: its refusal reaches every rank (the others would wait in
    the weight broadcast forever)."""
    import subprocess
    import sys

    broken, name = _broken_copy(pair["student"], tmp_path / "broken", "missing")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "grace", "train",
            "--teacher", pair["teacher"], "--student", broken, "--data", pair["data"], "--image-folder",
            pair["images"], "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "1",
            "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, env=test_real_data.ENV, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("grace train: error:")]
    assert len(lines) == 2 and all(f"tensor {name} is missing" in line for line in lines), proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run")
