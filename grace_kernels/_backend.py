"""The one place that decides which implementation runs an op.

Three backends exist:

* ``"cuda"``      the compiled extension ``grace_kernels._C`` (only ops that have one, e.g. W4A16 GEMM);
* ``"triton"``    the fused Triton kernels in ``grace_kernels.triton``;
* ``"reference"`` the pure-PyTorch implementations in ``grace_kernels.reference``.

Automatic choice:

* CUDA tensors: ``cuda`` if the op has a CUDA implementation and the extension loaded with a kernel
  image for the device's architecture (else a warning naming the missing architecture), else
  ``triton``, else ``reference``;
* CPU tensors: ``triton`` when ``TRITON_INTERPRET=1`` (how CI runs the Triton kernels), else
  ``reference``.

``GRACE_KERNELS_BACKEND=cuda|triton|reference`` (or the :func:`use_backend` context manager, which
wins over the variable) forces one backend for debugging and benchmarking. Forcing a backend an op
or device cannot run raises ``RuntimeError`` naming both, rather than silently running another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "GRACE_KERNELS_BACKEND"

_state = threading.local()


def _forced() -> str | None:
    name = getattr(_state, "forced", None) or os.environ.get(ENV_VAR, "").strip().lower() or None
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {BACKENDS + ('auto',)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (one of :data:`BACKENDS`, or None/"auto" for automatic) inside the block."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS + ('auto',)}")
    previous = getattr(_state, "forced", None)
    _state.forced = None if name == "auto" else name
    try:
        yield
    finally:
        _state.forced = previous


def triton_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once at import: torch.compile traces select_backend, and older dynamo (torch 2.11) refuses to
# trace importlib.util.find_spec, even behind functools.cache.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def cuda_ext_available() -> bool:
    from grace_kernels import _ext

    return _ext.C is not None


def cuda_ext_runs_on(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA device and the loaded extension has a kernel image for its architecture:
    the CUDA kernels will run there (automatic choice), so a model may hold their layout."""
    device = torch.device(device)
    return device.type == "cuda" and cuda_ext_available() and cuda_ext_unsupported(device) is None


_warned_devices: set[str] = set()


def cuda_ext_unsupported(device: torch.device) -> str | None:
    """Why the loaded extension has no kernel image for this CUDA device, or None (see ``_ext.unsupported_reason``).

    Automatic choice then falls back to Triton and warns once per device with this reason.
    """
    from grace_kernels import _ext

    return _ext.unsupported_reason(device)


def select_backend(op: str, device: torch.device | str, *, has_cuda_impl: bool = False,
                   cuda_unsupported: str | None = None) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``.

    Args:
        op: the op's name, only used in error messages.
        device: where the op's inputs live.
        has_cuda_impl: whether the op has an implementation in the CUDA extension.
        cuda_unsupported: why that implementation cannot take these particular inputs (a shape or dtype
            rule), or None when it can. With a reason, automatic choice skips ``cuda``.

    Raises:
        RuntimeError: a forced backend cannot run ``op`` here (the message names both).
    """
    device = torch.device(device)
    forced = _forced()
    if forced is not None:
        if forced == "cuda" and not (has_cuda_impl and device.type == "cuda" and cuda_ext_available()):
            why = ("has no CUDA-extension implementation" if not has_cuda_impl else
                   "needs CUDA tensors" if device.type != "cuda" else "needs grace_kernels._C, which is not built")
            raise RuntimeError(f"backend 'cuda' was forced but {op} {why}")
        if forced == "cuda" and cuda_unsupported is not None:
            raise RuntimeError(f"backend 'cuda' was forced but {op} cannot run these inputs there: {cuda_unsupported}")
        if forced == "cuda" and (why := cuda_ext_unsupported(device)) is not None:
            raise RuntimeError(f"backend 'cuda' was forced for {op} but {why}")
        if forced == "triton":
            if not triton_available():
                raise RuntimeError(f"backend 'triton' was forced for {op} but triton is not installed")
            if device.type != "cuda" and not triton_interpret():
                raise RuntimeError(
                    f"backend 'triton' was forced for {op} on {device.type} tensors; "
                    "set TRITON_INTERPRET=1 to run Triton kernels on the CPU"
                )
        return forced
    if device.type == "cuda":
        if has_cuda_impl and cuda_unsupported is None and cuda_ext_available():
            why = cuda_ext_unsupported(device)
            if why is None:
                return "cuda"
            if str(device) not in _warned_devices:
                _warned_devices.add(str(device))
                warnings.warn(f"{why}: running the Triton kernels instead", RuntimeWarning, stacklevel=2)
        return "triton" if triton_available() else "reference"
    if triton_interpret() and triton_available():
        return "triton"
    return "reference"


def describe() -> dict[str, object]:
    """What is available here: printed by ``grace info`` and recorded by the benchmarks."""
    from grace_kernels import _ext

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "triton_interpret": triton_interpret(),
        "cuda_extension": _ext.C is not None,
        "cuda_extension_error": _ext.error,
        "cuda_extension_archs": None if (archs := _ext.embedded_archs()) is None else
        {"sass": sorted(archs[0]), "ptx": sorted(archs[1])},
        "cuda_extension_unsupported": _ext.unsupported_reason("cuda") if torch.cuda.is_available() else None,
        "forced_backend": _forced(),
    }


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), "__version__", "unknown")

