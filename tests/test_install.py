"""The README's install (command 1) in a fresh virtual environment, then the README's own load snippet.

README command 1 is ``pip install torch "setuptools>=70.1" && pip install --no-build-isolation -e .``. Here the
first half is served by this environment's torch and setuptools (the distributions and their
requirements, linked into the new environment: the same files a pip cache would install, without
downloading torch again); the second half runs as written, with pip resolving the project's declared
runtime dependencies from the package index into an environment that has nothing else. The CUDA
extension is not built (``GRACE_KERNELS_BUILD_EXT=0``): it changes no dependency.

In that environment: ``grace export`` on an INT4 and an INT8 run, then the README's "load in transformers"
snippet, taken from README.md itself, on each export, and a greedy generation with the loaded model,
compared with ``grace generate``'s answer in the same environment.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme_load_snippet() -> str:
    """The README's Python block that loads an export in transformers (the one calling from_pretrained)."""
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    loads = [b for b in blocks if "AutoModelForImageTextToText.from_pretrained(" in b]
    assert len(loads) == 1, f"README.md should hold one load-in-transformers snippet, found {len(loads)}"
    return loads[0]


def _requirement_closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need, with their requirements, markers evaluated here."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = seen[key] = md.distribution(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_host_packages(names: list[str], into: str, site: str) -> None:
    """Symlink the top-level files of ``names`` and their requirements (packages and .dist-info) into
    ``into``, put ``into`` on the new environment's path (``site``: its site-packages) and copy their .pth
    files there (setuptools' distutils shim): pip then finds them installed, as after
    ``pip install torch "setuptools>=70.1"``."""
    os.makedirs(into)
    for dist in _requirement_closure(names):
        for top in {str(f).split("/")[0] for f in dist.files or []}:
            src = os.path.join(str(dist.locate_file("")), top)
            if top.startswith("..") or top == "__pycache__" or os.path.lexists(os.path.join(into, top)):
                continue
            if top.endswith(".pth"):
                shutil.copy(src, os.path.join(site, top))
            else:
                os.symlink(src, os.path.join(into, top))
    # .pth files run in name order: this one first, so the others can import from ``into``
    with open(os.path.join(site, "_host_torch.pth"), "w") as f:
        f.write(into + "\n")


def _fresh_env(tmp_path) -> tuple[str, dict]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # Python <= 3.11 venvs come with setuptools 65, which has no bdist_wheel of its own (70.1 and later do), and
    # `pip install setuptools` leaves it there: README command 1 asks for 70.1, as done here by the link.
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True, timeout=120,
                   capture_output=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    _link_host_packages(["torch", "setuptools"], str(tmp_path / "host-torch"), site)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               GRACE_KERNELS_BUILD_EXT="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return py, env


def _make_run(base: str, out: str, bits: int) -> None:
    """A finished run as training leaves it (the INT4/INT8 student of ``base``, perturbed)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.config import TrainConfig
    from grace.quantize import quantize_model
    from grace.rundir import save_final

    model = AutoModelForImageTextToText.from_pretrained(base)
    quantize_model(model, bits=bits, group_size=128, scale_dtype=torch.bfloat16, verbose=False)
    g = torch.Generator().manual_seed(0)   # a tiny model whose greedy answers are words, not empty
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if name.endswith("log_scale") else 0.01))
    cfg = TrainConfig(student=base, output_dir=out, bits=bits, group_size=128, scale_dtype="bfloat16")
    save_final(model, model.state_dict(), AutoProcessor.from_pretrained(base), cfg)
    cfg.to_json(os.path.join(out, "config.json"))


# The README snippet, then one greedy generation with what it loaded (prompt rendered as grace generate
# renders it), printed for the test to compare.
CHECK = """
import sys
from grace.evaluate import generate
{snippet}
print("ANSWER", repr(generate(model, processor, sys.argv[1], "what color is the circle ?", max_new_tokens=6)))
import compressed_tensors, torch, transformers
print("STACK", transformers.__version__, compressed_tensors.__version__, torch.__file__)
"""


@pytest.mark.slow
def test_readme_install_loads_an_export_in_transformers(tmp_path):
    import numpy as np
    from PIL import Image

    from grace.demo import tiny

    py, env = _fresh_env(tmp_path)
    pip = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "-e", ROOT], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    # the environment has only what command 1 installed: the project's declared runtime dependencies
    installed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               env=env, check=True).stdout
    assert "compressed-tensors==" in installed and "pytest==" not in installed, installed

    base = tiny.build_tiny_vlm(str(tmp_path / "base"), family="llava")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    for bits in (4, 8):
        run, export = str(tmp_path / f"run{bits}"), str(tmp_path / f"int{bits}")
        _make_run(base, run, bits)
        grace = [os.path.join(os.path.dirname(py), "grace")]
        exp = subprocess.run(grace + ["export", run, export], capture_output=True, text=True, env=env, timeout=300)
        assert exp.returncode == 0, exp.stderr[-3000:]
        snippet = _readme_load_snippet().replace('"models/llava-int4"', repr(export))
        assert repr(export) in snippet, snippet
        script = tmp_path / f"check{bits}.py"
        script.write_text(CHECK.format(snippet=snippet))
        out = subprocess.run([py, str(script), str(image)], capture_output=True, text=True, env=env, timeout=300,
                             cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr[-3000:]
        answer = re.search(r"^ANSWER (.*)$", out.stdout, flags=re.M).group(1)
        stack = re.search(r"^STACK (\S+) (\S+) (\S+)$", out.stdout, flags=re.M)
        # the linked torch, no other
        assert stack and os.path.realpath(stack.group(3)) == os.path.realpath(torch.__file__), out.stdout
        gen = subprocess.run(grace + ["generate", export, "--image", str(image), "--prompt",
                                      "what color is the circle ?", "--max-new-tokens", "6", "--device", "cpu"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert answer == repr(gen.stdout.rstrip("\n")) and gen.stdout.strip(), (bits, answer, gen.stdout)
