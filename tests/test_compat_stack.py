"""Compatibility with the GPU image's stack (torch 2.11, Triton 3.6, transformers 5.17), checked on CPU.

The lent GPU machine has no network: the project must install and import against what its image holds.
The first test that needs it builds a side environment under .compat/site (ignored by git, reused when
its stamp matches): exactly those three releases, with ``pip install --no-deps --target``, layered before
this environment on PYTHONPATH (their own small dependencies that this environment lacks, and a NumPy
that Triton 3.6's interpreter works with, are listed below; everything else, such as the CUDA libraries
torch links, comes from this environment).
About 750 MB to download and 2.5 GB on disk; two to four minutes on a fresh CI machine.

In that environment: the package imports and two CPU test files pass (backend choice, the decode
benchmark's three paths and its decoder against transformers' LlamaForCausalLM), the project installs with pip, the
minimum versions in pyproject.toml are the ones tested here, every Triton kernel compiles ahead of
time for sm_90 with Triton 3.6 (``python -m grace_kernels.aot --arch 90``), and the GPU day's one command
(benchmarks/gpu_acceptance.sh) passes its dry run and completes its CPU stand-in run.

Also here, for the Triton installed in this environment and in the side one: the float32 W4A16 kernel
is compiled with IEEE float32 products, not TF32 (the interpreter ignores ``input_precision``, so only
the compiled IR shows it), and on a GPU its result has float32 accuracy.

Besides the side stack: every transformers minor release between the declared minimum and the installed one
(the newest patch of each, read from the package index, installed alone with ``--no-deps --target`` under
.compat/) loads every kind of export and generates grace's tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = os.path.join(ROOT, ".compat", "site")
STACK = {"torch": "2.11", "triton": "3.6", "transformers": "5.17"}
SIDE_PACKAGES = [
    "torch==2.11.*", "torchvision==0.26.*",  # torchvision: transformers imports it, and it must match torch
    "triton==3.6.*", "transformers==5.17.*",
    # transformers 5.17 wants huggingface-hub 1.x, which needs httpx (newer hubs, in this environment, do not)
    "huggingface-hub>=1.5,<2", "httpx", "httpcore", "h11", "anyio", "certifi", "idna",
    # Triton 3.6's interpreter turns 1-element arrays into ints, which NumPy 2.4 made an error: every loop
    # with a runtime bound fails under TRITON_INTERPRET=1 with a newer NumPy (the compiled path is unaffected)
    "numpy>=2,<2.4",
]

# Compiles the float32 W4A16 kernel for sm_90 with whatever Triton is importable, plus a control kernel
# whose float32 dot keeps Triton's default precision, and reports what the IR says about TF32.
IR_CHECK = r"""
import json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from grace_kernels.triton import w4a16

@triton.jit
def _default_precision_kernel(a_ptr, b_ptr, c_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

def compile_(fn, sig, constexprs, num_warps=4, num_stages=3):
    sig = dict(sig); sig.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs)),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})

def report(c):
    dots = [line.strip() for line in c.asm["ttir"].splitlines() if "tt.dot" in line]
    return {"ttir_dots": dots, "ptx_tf32": ".tf32" in c.asm["ptx"],
            "ptx_mma": sorted(set(re.findall(r"\b(?:wgmma|mma)\.[\w.]+", c.asm["ptx"])))}

out = {"triton": triton.__version__, "fp32": [], "control": None}
for spec in w4a16.AOT_SPECS:
    if spec.signature["x_ptr"] == "*fp32":
        out["fp32"].append({"label": spec.label, **report(compile_(spec.kernel, spec.signature, spec.constexprs,
                                                                    spec.num_warps, spec.num_stages))})
out["control"] = report(compile_(_default_precision_kernel, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"},
                                 {}))
print("IR_JSON " + json.dumps(out))
"""


def _env(side: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(([SIDE] if side else []) + [ROOT] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _ir_check(side: bool, tmp_path) -> dict:
    script = tmp_path / "ir_check.py"  # @triton.jit reads its function's source: a file, not python -c
    script.write_text(IR_CHECK)
    proc = _run([sys.executable, str(script)], side=side)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _json_line(proc.stdout, "IR_JSON")


def _run(argv: list[str], side: bool, timeout: int = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or _env(side))


def _json_line(text: str, tag: str) -> dict:
    line = next(line for line in reversed(text.splitlines()) if line.startswith(tag + " "))
    return json.loads(line[len(tag) + 1:])


def _check_ieee(out: dict) -> None:
    assert out["fp32"], "no float32 spec of the W4A16 kernel in AOT_SPECS"
    for kernel in out["fp32"]:
        assert kernel["ttir_dots"], kernel
        assert not any("tf32" in dot for dot in kernel["ttir_dots"]), kernel  # ieee is the attribute-free default
        assert not kernel["ptx_tf32"], kernel
    # the detector sees TF32 where Triton's default applies: a check that cannot fail would prove nothing
    assert any("tf32" in dot for dot in out["control"]["ttir_dots"]) and out["control"]["ptx_tf32"], out["control"]


@pytest.mark.slow
def test_fp32_w4a16_kernel_compiles_without_tf32_for_sm90(tmp_path):
    _check_ieee(_ir_check(False, tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_fp32_w4a16_has_float32_accuracy(m):
    """Float32 x on CUDA runs the Triton kernel (the CUDA one takes half precision): IEEE products give
    about 1e-6 relative error against a float64 product of the same weights; TF32 would give about 1e-3."""
    import grace_kernels as gk
    from grace_kernels.testing import make_weight

    w = gk.quantize_rtn(make_weight(4096, 4096, device="cuda"), scale_dtype=torch.float16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float32)
    y = gk.w4a16_matmul(x, w)
    gold = x.double() @ w.dequantize().double().t()
    err = ((y.double() - gold).norm() / gold.norm()).item()
    assert y.dtype == torch.float32 and err < 1e-5, err


# ---------------------------------------------------------------------------------------- the side stack


def _stamp() -> str:
    return json.dumps({"packages": SIDE_PACKAGES, "python": sys.version_info[:2]})


@pytest.fixture(scope="module")
def side_env():
    """.compat/site with the GPU image's torch, Triton and transformers (built once, reused while the stamp holds)."""
    return _pip_target(SIDE, SIDE_PACKAGES, _stamp(), timeout=1800)


def _pip_target(target: str, packages: list[str], stamp_text: str, timeout: int) -> str:
    """``packages`` installed with ``pip install --no-deps --target target`` (a folder this module owns under
    .compat/), rebuilt only when its stamp file does not hold ``stamp_text``."""
    stamp = os.path.join(target, ".grace-compat-stamp")
    if not (os.path.exists(stamp) and open(stamp).read() == stamp_text):
        shutil.rmtree(target, ignore_errors=True)
        proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", target,
                     *packages], side=False, timeout=timeout)
        assert proc.returncode == 0, f"pip could not install {packages} into {target}:\n{proc.stdout[-3000:]}" \
                                     f"{proc.stderr[-3000:]}"
        with open(stamp, "w") as f:
            f.write(stamp_text)
    return target


_VERSIONS = r"""
import json, torch, triton, transformers, grace_kernels, grace, grace.cli
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
print("VERSIONS " + json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                                "transformers": transformers.__version__, "torch_file": torch.__file__,
                                "grace_kernels_file": grace_kernels.__file__}))
"""


@pytest.mark.slow
def test_side_stack_imports_the_project(side_env):
    proc = _run([sys.executable, "-c", _VERSIONS], side=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = _json_line(proc.stdout, "VERSIONS")
    for name, version in STACK.items():
        assert got[name].startswith(version + "."), (name, got[name])
    assert got["torch_file"].startswith(side_env) and got["grace_kernels_file"].startswith(ROOT)


@pytest.mark.slow
def test_side_stack_passes_cpu_tests(side_env):
    """The backend chooser and the decode benchmark's CPU checks (its decoder against transformers 5.17's
    LlamaForCausalLM and generate, torch 2.11's CPU int4 GEMM) under the image's releases."""
    proc = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_backend.py",
                 "tests/test_decode.py"], side=True, env={**_env(True), "TRITON_INTERPRET": "1"})
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", proc.stdout) and "failed" not in proc.stdout.splitlines()[-1]


@pytest.mark.slow
def test_side_stack_installs_the_project_and_minimums_are_the_tested_versions(side_env, tmp_path):
    target = tmp_path / "installed"
    proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                 "--target", str(target), "."], side=True, env={**_env(True), "GRACE_KERNELS_BUILD_EXT": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = "import grace_kernels, grace, torch; print('INSTALLED', grace_kernels.__file__, torch.__version__)"
    env = {**_env(True), "PYTHONPATH": os.pathsep.join([str(target), side_env])}
    run = subprocess.run([sys.executable, "-c", probe], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(target) in run.stdout and f" {STACK['torch']}." in run.stdout
    # pyproject.toml's minimum for each of these is the release tested here, no older untested one
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for name, version in STACK.items():
        (spec,) = [d for d in deps if re.match(rf"{name}\b", d)]
        assert re.search(rf">={re.escape(version)}\b", spec), spec


@pytest.mark.slow
def test_triton_36_compiles_every_kernel_for_sm90_with_ieee_fp32(side_env, tmp_path):
    out = tmp_path / "aot.json"
    proc = _run([sys.executable, "-m", "grace_kernels.aot", "--arch", "90", "--json", str(out)], side=True)
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [r for r in json.loads(out.read_text()) if not r["kernel"].startswith("_C:")]
    assert rows and {r["arch"] for r in rows} == {90} and all(r["error"] is None for r in rows)
    result = _ir_check(True, tmp_path)
    assert result["triton"].startswith(STACK["triton"] + ".")
    _check_ieee(result)


@pytest.mark.slow
def test_side_stack_runs_the_gpu_day_dry_run_and_stand_in(side_env, tmp_path):
    """The GPU day's orchestrator under the image's releases: its dry run imports what every step imports,
    and its CPU stand-in run completes every group and writes every result file."""
    script = os.path.join(ROOT, "benchmarks", "gpu_acceptance.sh")
    env = {**_env(True), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    dry = _run(["bash", script, "--dry-run"], side=True, env=env)
    assert dry.returncode == 0 and "PROBLEM" not in dry.stdout, dry.stdout[-4000:] + dry.stderr[-2000:]
    run = _run(["bash", script, "--stand-in"], side=True, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "acceptance.json").read_text())
    assert saved["env"]["torch"].startswith(STACK["torch"]) and saved["env"]["triton"].startswith(STACK["triton"])
    assert {s["status"] for s in saved["steps"]} == {"ok"}, [(s["name"], s["status"]) for s in saved["steps"]]
    assert {"summary.md", "decode.json", "benchmarks.json"} <= set(os.listdir(tmp_path / "out"))


# Loads each export with plain transformers and prints its greedy tokens (run in the side environment).
_LOAD_EXPORTS = r"""
import json, sys
from PIL import Image
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor
from grace.data import to_messages

cases = json.load(open(sys.argv[1]))
out = {}
for export, case in cases.items():
    model, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(export)
    turns = to_messages([{"from": "human", "value": "<image>\n" + case["prompt"]}])
    text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.open(case["image"]).convert("RGB")], return_tensors="pt")
    enc = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in enc.items()}
    ids = model.eval().generate(**enc, max_new_tokens=8, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
    out[export] = {"problems": {k: sorted(map(str, v)) for k, v in info.items() if v},
                   "tokens": ids[0, enc["input_ids"].shape[1]:].tolist()}
print("EXPORTS " + json.dumps({"transformers": transformers.__version__, "exports": out}))
"""


def _export_cases(tmp_path, bits_list) -> tuple[str, dict]:
    """Exports of tiny LLaVA and Qwen2-VL runs of each bit width in ``bits_list`` (None: full precision), in
    float32 and bfloat16, written to ``tmp_path``: the cases file _LOAD_EXPORTS reads and grace's own greedy
    tokens per export."""
    import numpy as np
    from PIL import Image

    from grace.data import to_messages
    from grace.demo import tiny
    from grace.export import export_run
    from grace.load import load_model
    from grace_kernels import use_backend
    from tests.test_export import _make_run

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    prompt = "what color is the circle ?"
    cases, grace_tokens = {}, {}
    for family in ("llava", "qwen2_vl"):
        base = tiny.build_tiny_vlm(str(tmp_path / f"base-{family}"), family=family)
        for bits in bits_list:
            run = tmp_path / f"run-{family}-{bits}"
            _make_run(base, run, bits=bits, seed=1)
            for dtype in (None, "bfloat16"):
                export = export_run(str(run), str(tmp_path / f"{family}-{bits}-{dtype or 'float32'}"), dtype=dtype)
                cases[export] = {"image": str(image), "prompt": prompt}
                with use_backend("reference"):
                    model, processor = load_model(export)
                    turns = to_messages([{"from": "human", "value": "<image>\n" + prompt}])
                    text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                    enc = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
                    enc = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in enc.items()}
                    ids = model.generate(**enc, max_new_tokens=8, do_sample=False,
                                         pad_token_id=processor.tokenizer.pad_token_id)
                grace_tokens[export] = ids[0, enc["input_ids"].shape[1]:].tolist()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    return str(tmp_path / "cases.json"), grace_tokens


def _load_exports(cases: str, env: dict) -> dict:
    """_LOAD_EXPORTS run on ``cases`` in ``env``: the transformers version and each export's load problems and
    greedy tokens."""
    script = os.path.join(os.path.dirname(cases), "load_exports.py")
    with open(script, "w") as f:
        f.write(_LOAD_EXPORTS)
    proc = _run([sys.executable, script, cases], side=False, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _json_line(proc.stdout, "EXPORTS")


def _check_exports(got: dict, grace_tokens: dict) -> None:
    assert set(got["exports"]) == set(grace_tokens)
    for export, result in got["exports"].items():
        assert not result["problems"], (got["transformers"], export, result["problems"])
        assert result["tokens"] == grace_tokens[export], (got["transformers"], export, result["tokens"],
                                                          grace_tokens[export])


@pytest.mark.slow
def test_side_stack_transformers_loads_every_export_and_generates_like_grace(side_env, tmp_path):
    """The declared minimum transformers loads INT4 and INT8 exports of tiny LLaVA and Qwen2-VL runs in
    float32 (the default: float32 scales) and bfloat16 with no missing, unexpected or mismatched key, and
    greedy decoding gives grace's tokens (before float32 exports stored float32 scales, the first forward
    failed there with a float / bfloat16 dtype mismatch)."""
    cases, grace_tokens = _export_cases(tmp_path, (4, 8))
    got = _load_exports(cases, _env(side=True))
    assert got["transformers"].startswith(STACK["transformers"] + "."), got["transformers"]
    _check_exports(got, grace_tokens)


def _released_minors(package: str, above: str, below: str) -> list[str]:
    """The newest release of every minor version of ``package`` on the package index strictly between
    ``above`` and ``below`` (major.minor), as pip lists them."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        pytest.skip(f"pip index versions {package} failed: {proc.stderr.strip()[-300:]}")
    listed = re.search(r"Available versions: (.*)", proc.stdout)
    def key(v):
        return tuple(int(x) for x in v.split(".")[:2])

    newest = {}
    for v in (listed.group(1).split(", ") if listed else []):
        if re.fullmatch(r"\d+\.\d+\.\d+", v) and key(above) < key(v) < key(below):
            newest.setdefault(key(v), v)   # pip lists the newest first
    return [newest[k] for k in sorted(newest)]


@pytest.mark.slow
def test_every_transformers_minor_between_the_minimum_and_this_one_loads_every_export(tmp_path):
    """Each transformers minor release after the declared minimum (checked with its own torch in the side
    stack) and before the installed one (checked by the export tests), its newest patch installed alone with
    ``pip install --no-deps --target`` in front of this environment, loads the INT4, INT8 and full-precision
    exports of tiny LLaVA and Qwen2-VL runs, float32 and bfloat16, with no load problem and grace's greedy
    tokens. The list is read from the package index, so a release that appears later is checked too."""
    import transformers

    minimum = STACK["transformers"]
    installed = ".".join(transformers.__version__.split(".")[:2])
    versions = _released_minors("transformers", minimum, installed)
    if not versions:
        pytest.skip(f"no transformers minor release between {minimum} and {installed}")
    cases, grace_tokens = _export_cases(tmp_path, (4, 8, None))
    for version in versions:
        package = f"transformers=={version}"
        target = _pip_target(os.path.join(ROOT, ".compat", f"transformers-{version}"), [package], package, timeout=900)
        env = {**_env(side=False), "PYTHONPATH": os.pathsep.join([target, ROOT])}
        got = _load_exports(cases, env)
        assert got["transformers"] == version, got["transformers"]
        _check_exports(got, grace_tokens)
