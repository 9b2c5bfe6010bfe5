import pytest
import torch

import grace_kernels
from grace_kernels import _backend


def test_cpu_uses_triton_under_interpreter_else_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select_backend("op", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.select_backend("op", "cpu") == "reference"
    assert _backend.select_backend("op", "cpu", has_cuda_impl=True) == "reference"


def test_cuda_prefers_extension_then_triton(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: True)
    assert _backend.select_backend("op", "cuda", has_cuda_impl=True) == "cuda"
    assert _backend.select_backend("op", "cuda", has_cuda_impl=False) == "triton"
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: False)
    assert _backend.select_backend("op", "cuda", has_cuda_impl=True) == "triton"


def test_env_var_and_context_manager_force(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.select_backend("op", "cpu") == "reference"
    with grace_kernels.use_backend("triton"):  # the context manager wins over the variable
        assert _backend.select_backend("op", "cpu") == "triton"
    assert _backend.select_backend("op", "cpu") == "reference"


def test_impossible_forced_backend_raises(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    with grace_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="no CUDA-extension"):
        _backend.select_backend("my_op", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with grace_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.select_backend("my_op", torch.device("cpu"))


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        with grace_kernels.use_backend("tpu"):
            pass
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="GRACE_KERNELS_BACKEND"):
        _backend.select_backend("op", "cpu")


def test_describe_reports_environment():
    info = grace_kernels.describe()
    assert info["torch"] == torch.__version__
    assert set(info) >= {"triton", "cuda_extension", "triton_interpret"}


def test_cuda_unsupported_inputs_skip_cuda_or_raise_when_forced(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: True)
    rule = "the CUDA kernel needs N % 64 == 0"
    assert _backend.select_backend("op", "cuda", has_cuda_impl=True, cuda_unsupported=None) == "cuda"
    assert _backend.select_backend("op", "cuda", has_cuda_impl=True, cuda_unsupported=rule) == "triton"
    with grace_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match=f"forced but op cannot .*{rule}"):
        _backend.select_backend("op", "cuda", has_cuda_impl=True, cuda_unsupported=rule)
    with grace_kernels.use_backend("triton"):
        assert _backend.select_backend("op", "cuda", has_cuda_impl=True, cuda_unsupported=rule) == "triton"


def _fatbin(entries):
    """A fat binary as nvcc embeds it: header, then (kind, arch) entries with small payloads."""
    import struct

    body = b""
    for kind, arch in entries:
        payload = b"\0" * 24
        body += struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + struct.pack("<4I", 0, 0, 65544, arch)
        body += b"\0" * (64 - 32) + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_archs_are_read_from_the_binary():
    from grace_kernels import _ext

    data = b"ELF junk" + _fatbin([(2, 80), (2, 90)]) + b"more" + _fatbin([(2, 80), (1, 90)])
    assert _ext.parse_fatbin_archs(data) == ({80, 90}, {90})
    assert _ext.parse_fatbin_archs(b"no fat binary here") == (set(), set())


@pytest.mark.parametrize("capability,sass,ptx,runs", [
    ((8, 0), {80, 90}, set(), True),
    ((8, 6), {80, 90}, set(), True),      # same major, newer minor: the sm_80 cubin runs
    ((8, 9), {90}, set(), False),         # no sm_8x cubin and no PTX old enough
    ((9, 0), {80, 90}, set(), True),
    ((10, 0), {80, 90}, set(), False),    # Blackwell: "no kernel image" without PTX
    ((10, 0), {80, 90}, {90}, True),      # compute_90 PTX is JIT-compiled by the driver
    ((12, 0), {80}, {90}, True),
    ((7, 5), {80, 90}, {80}, False),      # below the kernels' minimum, whatever is embedded
])
def test_kernel_image_rule(capability, sass, ptx, runs):
    from grace_kernels import _ext

    why = _ext.image_unsupported(capability, frozenset(sass), frozenset(ptx))
    assert (why is None) == runs
    if not runs:
        assert f"sm_{10 * capability[0] + capability[1]}" in why


def test_cuda_falls_back_to_triton_without_a_kernel_image(monkeypatch):
    from grace_kernels import _ext

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: True)
    monkeypatch.setattr(_ext, "C", object())  # a loaded extension whose binary has sm_80/sm_90 code only
    monkeypatch.setattr(_ext, "embedded_archs", lambda: (frozenset({80, 90}), frozenset()))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _ext._device_reason.cache_clear()
    monkeypatch.setattr(_backend, "_warned_devices", set())
    try:
        with pytest.warns(RuntimeWarning, match="no kernel image for sm_120"):
            assert _backend.select_backend("w4a16_matmul", "cuda:0", has_cuda_impl=True) == "triton"
        with grace_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="no kernel image for sm_120"):
            _backend.select_backend("w4a16_matmul", "cuda:0", has_cuda_impl=True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
        _ext._device_reason.cache_clear()
        assert _backend.select_backend("w4a16_matmul", "cuda:0", has_cuda_impl=True) == "cuda"
    finally:
        _ext._device_reason.cache_clear()


def test_capability_check_reads_a_real_nvcc_object(tmp_path):
    """nvcc's own fat binary (when a CUDA toolkit is here): SASS for sm_80/sm_90 and compute_90 PTX."""
    import shutil
    import subprocess

    from grace_kernels import _ext

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the synthetic fat binary test covers the parser")
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run(["nvcc", "-c", str(src), "-o", str(obj), "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", "arch=compute_90,code=[sm_90,compute_90]"], check=True, capture_output=True,
                   timeout=300)
    assert _ext.parse_fatbin_archs(obj.read_bytes()) == ({80, 90}, {90})


@pytest.mark.parametrize("interpret, expected", [("0", "reference"), ("1", "triton")])
def test_grace_info_says_which_route_each_checkpoint_format_takes(interpret, expected):
    """``grace info`` (a subprocess, as a user runs it) on this CPU machine: every format on the reference, or
    on Triton under the interpreter; the asymmetric formats' layers named, none of them on a CUDA kernel."""
    import json
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if k != _backend.ENV_VAR}, "TRITON_INTERPRET": interpret}
    proc = subprocess.run([sys.executable, "-m", "grace", "info"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    routes = json.loads(proc.stdout)["routes"]
    assert routes["device"] == "cpu" and routes["int4"] == {"layer": "W4A16Linear", "backend": expected}
    for fmt in ("int4-asymmetric", "int8", "int8-asymmetric"):
        assert routes[fmt]["backend"] == f"{expected} (no CUDA kernel for 8-bit codes or zero points)", fmt
    assert routes["int4-asymmetric"]["layer"].startswith("W8A16Linear (read as symmetric 8-bit codes")
    assert routes["int8-asymmetric"]["layer"].startswith("W8A16Linear(asymmetric=True)")


def test_routes_on_a_gpu_with_the_extension(monkeypatch):
    """On a CUDA device with the extension built (simulated: the chooser is told the extension loaded), symmetric
    INT4 takes the CUDA kernel (Triton for the layers it does not take); the zero-point and 8-bit formats Triton."""
    from grace.schemes import serving_routes

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: True)
    routes = serving_routes("cuda")
    assert routes["int4"]["backend"].startswith("cuda (the CUDA kernel") and "other layers: triton" in \
        routes["int4"]["backend"]
    for fmt in ("int4-asymmetric", "int8", "int8-asymmetric"):
        assert routes[fmt]["backend"] == "triton (no CUDA kernel for 8-bit codes or zero points)", fmt
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: False)   # a GPU without the extension
    assert serving_routes("cuda")["int4"]["backend"] == "triton"
    with grace_kernels.use_backend("cuda"):   # forced where it cannot run: said, not raised
        assert serving_routes("cpu")["int8"]["backend"].startswith("none: backend 'cuda' was forced")
