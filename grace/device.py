"""Picking the torch device from a ``--device`` string, shared by training, evaluation and generation."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch.device for ``name``: "auto" is the GPU when there is one, else the CPU; a bare "cuda" is
    this rank's GPU (``cuda:<local_rank>``, as torchrun numbers them); anything else as torch spells it.

    Raises:
        ValueError: ``name`` is not a device torch knows, or names a CUDA device when none is usable (no
            GPU, or a CPU-only torch), or a CUDA index beyond the visible GPUs, or another device type (mps,
            xpu, ...) this torch cannot use here.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: no Apple MPS device is usable here (torch.backends.mps.is_available() "
                         "is False); use --device cpu or --device auto")
    if dev.type not in ("cpu", "cuda", "mps") and not _backend_available(dev.type):
        raise ValueError(f"device {name!r}: no {dev.type} device is usable here; use --device cpu or --device auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                             "use --device cpu or --device auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def _backend_available(device_type: str) -> bool:
    """Whether torch's module for ``device_type`` (torch.xpu, ...) reports a usable device."""
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    try:
        return bool(is_available()) if callable(is_available) else False
    except RuntimeError:
        return False
