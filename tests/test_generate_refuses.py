"""`grace generate` refuses what it cannot answer, in one line (exit 2): a prompt longer than the model's
positions, a device this machine does not have, a checkpoint with a corrupt tensor. Run in a subprocess, as a
user runs it, on a tiny LLaVA checkpoint."""

import os
import subprocess
import sys

import pytest
import torch
from test_real_data import ENV, assert_one_line_error, write_image
from test_train_inputs import _broken_copy

from grace.demo.tiny import build_tiny_vlm
from grace.device import resolve_device


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    write_image(root / "0.png")
    return {"dir": build_tiny_vlm(str(root / "student"), family="llava", size="student", seed=2),
            "image": str(root / "0.png"), "root": root}


def generate(model_dir, image, prompt, *extra):
    args = [sys.executable, "-m", "grace", "generate", model_dir, "--image", image, "--prompt", prompt, *extra]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)


def one_line(proc, *fragments):
    return assert_one_line_error(proc, *fragments, command="generate")


def test_prompt_longer_than_the_positions_is_refused_with_the_numbers(model):
    # 300 words + USER:/ASSISTANT: + 4 image tokens: 306 prompt tokens against the tiny model's 256 positions
    proc = generate(model["dir"], model["image"], "red " * 300, "--max-new-tokens", "4")
    one_line(proc, "the prompt is 306 tokens", "max_new_tokens is 4", "max_position_embeddings 256")


def test_prompt_plus_new_tokens_past_the_positions_is_refused(model):
    proc = generate(model["dir"], model["image"], "red " * 200, "--max-new-tokens", "60")
    one_line(proc, "the prompt is 206 tokens", "266 positions", "max_position_embeddings 256")


def test_prompt_within_the_positions_answers(model):
    proc = generate(model["dir"], model["image"], "what is the color of this object ?", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_absent_mps_device_is_one_line(model):
    one_line(generate(model["dir"], model["image"], "red", "--device", "mps"), "device 'mps'", "no Apple MPS device")
    with pytest.raises(ValueError, match="no Apple MPS device"):
        resolve_device("mps")


def test_unusable_device_types_are_refused_before_loading():
    for name in ("meta", "xpu"):
        if name == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
            continue
        with pytest.raises(ValueError, match=f"device '{name}': no {name} device is usable here"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_checkpoint_with_a_nan_weight_is_one_line(model):
    broken, name = _broken_copy(model["dir"], model["root"] / "nan", "nan")
    proc = generate(broken, model["image"], "red")
    one_line(proc, os.path.join(broken, "model.safetensors"), f"tensor {name} holds NaN or infinite values")
