"""Test setup: without a GPU the Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before any @triton.jit function is created, that is before
grace_kernels is first imported, which is why it is set here at collection time.
"""

import json
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import grace_kernels  # noqa: E402,F401  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """'cuda' when a GPU is present (full shapes), else 'cpu' (Triton under the interpreter)."""
    return DEVICE


@pytest.fixture
def cuda_ext():
    """Skips the test unless grace_kernels._C is built (the one place that says so)."""
    if grace_kernels._ext.C is None:
        pytest.skip(f"grace_kernels._C is not built: {grace_kernels._ext.error}")


@pytest.fixture
def reference_backend(monkeypatch):
    """Run the test on the PyTorch references (for model-level tests, where the interpreter is too slow): set
    through the environment, so the processes the test starts (torchrun ranks, ``python -m grace``) run them too."""
    monkeypatch.setenv(grace_kernels._backend.ENV_VAR, "reference")


@pytest.fixture(scope="session")
def color_task():
    """A writer of the smallest training data: ``color_task(root, n)`` writes n random 28 x 28 images and n
    LLaVA records asking their color under ``root``; returns (data.json path, image folder)."""
    from PIL import Image

    def write(root, n: int = 4) -> tuple[str, str]:
        img = root / "images"
        img.mkdir(exist_ok=True)
        records = []
        for i in range(n):
            pixels = (np.random.default_rng(i).random((28, 28, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(img / f"{i}.png")
            records.append({"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": ["red", "blue"][i % 2]}]})
        (root / "data.json").write_text(json.dumps(records))
        return str(root / "data.json"), str(img)

    return write


@pytest.fixture(scope="session")
def tiny_pair():
    """A builder of the tests' teacher and student: ``tiny_pair(root, family)`` writes tiny checkpoints of that
    family under ``root`` (teacher/ larger, seed 1; student/, seed 2); returns their paths (teacher, student)."""
    from grace.demo.tiny import build_tiny_vlm

    def build(root, family: str = "llava") -> tuple[str, str]:
        return (build_tiny_vlm(str(root / "teacher"), family=family, size="teacher", seed=1),
                build_tiny_vlm(str(root / "student"), family=family, size="student", seed=2))

    return build


@pytest.fixture(scope="session")
def family_setup(tiny_pair):
    """``family_setup(root, family, write_data)``: the tiny pair of ``family`` and the data ``write_data(root)``
    writes (it returns (data.json path, image folder)), as the dict the trainer tests read: family, root,
    teacher, student, data, images."""

    def build(root, family: str, write_data) -> dict:
        teacher, student = tiny_pair(root, family)
        data, images = write_data(root)
        return {"family": family, "root": root, "teacher": teacher, "student": student, "data": data,
                "images": images}

    return build
