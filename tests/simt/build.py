"""Building the test machinery of tests/simt/ with the host C++ compiler (no GPU, no nvcc).

The CUDA sources include "simt/simt.h" when GRACE_SIMT is defined, so the include path is csrc/ (the kernels)
and tests/ (the executor). Only the CUDA toolkit's headers are used (cuda_fp16.h and friends); nothing
from it is linked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIMT = ROOT / "tests" / "simt"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory, or None when no toolkit is found."""
    candidates = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


def toolchain() -> tuple[str | None, Path | None]:
    """(C++ compiler, CUDA include directory); either is None when missing (the caller skips)."""
    return shutil.which(os.environ.get("CXX", "g++")), cuda_include()


def build(source: Path, exe: Path, flags: list[str]) -> Path:
    """Compiles ``source`` to ``exe`` with ``flags``; AssertionError with the compiler's output on failure."""
    cxx, include = toolchain()
    assert cxx is not None and include is not None, "no C++ compiler or CUDA headers: check toolchain() first"
    cmd = [cxx, "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare", *flags,
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests'}", f"-I{include}", str(source), "-o", str(exe), "-pthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return exe
