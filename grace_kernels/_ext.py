"""Loads the optional CUDA extension ``grace_kernels._C`` and says on which GPUs it can run.

The extension only registers CUDA implementations of op schemas that are defined in Python
(``grace_kernels.ops``), so everything imports, traces and runs on CPU without it. ``C`` is the
module or None; ``error`` says why it is None (not built, or failed to load).

A loaded extension is not enough: it holds machine code (SASS) for the architectures it was built
for (``TORCH_CUDA_ARCH_LIST``, see setup.py) and possibly PTX that the driver compiles for newer ones.
On any other GPU every launch fails with "no kernel image is available". :func:`unsupported_reason`
reads the embedded architectures from the binary itself and answers before a launch, so the backend
chooser (``grace_kernels._backend``) can fall back to Triton with that reason.
"""

from __future__ import annotations

import functools
import importlib
import struct
from types import ModuleType

import torch

C: ModuleType | None = None
error: str | None = None

# The kernels use cp.async, ldmatrix and mma.sync.m16n8k16 with bf16: sm_80 and newer.
MIN_CAPABILITY = (8, 0)

_FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX, _KIND_SASS = 1, 2


def load() -> None:
    global C, error
    try:
        C = importlib.import_module("grace_kernels._C")
        error = None
    except ImportError as e:  # not built (CPU-only install) or built against another torch
        C, error = None, f"{type(e).__name__}: {e}"
    embedded_archs.cache_clear()


def parse_fatbin_archs(data: bytes) -> tuple[frozenset[int], frozenset[int]]:
    """(SASS archs, PTX archs) of every CUDA fat binary embedded in ``data`` (an ELF .so or .o).

    Each fat binary is a 16-byte header (u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size
    of the entries) followed by entries: u16 kind (1 PTX, 2 ELF/SASS), u16 version, u32 entry-header
    size, u64 padded payload size, ..., u32 SM version (e.g. 90) at byte 28. That is the layout
    ``cuobjdump --list-elf/--list-ptx`` reads; architectures are returned as 10 * major + minor.
    """
    sass, ptx = set(), set()
    magic = struct.pack("<I", _FATBIN_MAGIC)
    start = data.find(magic)
    while start != -1 and start + 16 <= len(data):
        _, header_size, size = struct.unpack_from("<HHQ", data, start + 4)
        off, end = start + header_size, min(start + header_size + size, len(data))
        while off + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            (arch,) = struct.unpack_from("<I", data, off + 28)
            if entry_header == 0:
                break
            if kind == _KIND_SASS:
                sass.add(arch)
            elif kind == _KIND_PTX:
                ptx.add(arch)
            off += entry_header + payload
        start = data.find(magic, max(end, start + 4))
    return frozenset(sass), frozenset(ptx)


def image_unsupported(capability: tuple[int, int], sass: frozenset[int], ptx: frozenset[int]) -> str | None:
    """Why a binary with these SASS/PTX archs cannot run on a GPU of ``capability``, or None when it can.

    SASS for sm_XY runs on GPUs of the same major version X and minor >= Y (an sm_80 cubin runs on
    sm_86 and sm_89, not on sm_90); PTX for compute_XY is compiled by the driver for any GPU of
    capability >= XY. Below MIN_CAPABILITY the kernels' instructions do not exist at all.
    """
    major, minor = capability
    cc = 10 * major + minor
    if capability < MIN_CAPABILITY:
        return f"the CUDA kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, this GPU is " \
               f"sm_{cc}"
    if any(a // 10 == major and a % 10 <= minor for a in sass) or any(a <= cc for a in ptx):
        return None
    built = ", ".join(f"sm_{a}" for a in sorted(sass)) or "none"
    embedded = ", ".join(f"compute_{a}" for a in sorted(ptx)) or "none"
    return (f"grace_kernels._C has no kernel image for sm_{cc} (machine code for {built}; PTX for {embedded}); "
            f"rebuild it with TORCH_CUDA_ARCH_LIST={major}.{minor}")


@functools.cache
def embedded_archs() -> tuple[frozenset[int], frozenset[int]] | None:
    """(SASS archs, PTX archs) of the loaded extension's binary, or None when it is not loaded."""
    path = getattr(C, "__file__", None)
    if C is None or path is None:
        return None
    with open(path, "rb") as f:
        return parse_fatbin_archs(f.read())


@functools.cache
def _device_reason(index: int) -> str | None:
    archs = embedded_archs()
    if archs is None:
        return None
    return image_unsupported(torch.cuda.get_device_capability(index), *archs)


def unsupported_reason(device: torch.device | str) -> str | None:
    """Why the loaded extension cannot launch on the CUDA ``device``, or None when it can (or is not loaded).

    Only the extension's own limits: whether it is loaded at all is :data:`C` / :data:`error`.
    """
    device = torch.device(device)
    if C is None or device.type != "cuda" or not torch.cuda.is_available():  # no GPU: nothing to launch on
        return None
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())
