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
