"""Loads the optional CUDA extension ``grace_kernels._C``.

The extension only registers CUDA implementations of op schemas that are defined in Python
(``grace_kernels.ops``), so everything imports, traces and runs on CPU without it. ``C`` is the
module or None; ``error`` says why it is None (not built, or failed to load).
"""

from __future__ import annotations

import importlib
from types import ModuleType

C: ModuleType | None = None
error: str | None = None


def load() -> None:
    global C, error
    try:
        C = importlib.import_module("grace_kernels._C")
        error = None
    except ImportError as e:  # not built (CPU-only install) or built against another torch
        C, error = None, f"{type(e).__name__}: {e}"
