"""Build script: the optional CUDA extension ``grace_kernels._C`` from csrc/.

The extension is built when a CUDA build of torch and a CUDA toolkit are both present, and
skipped (with a message) otherwise; the package works without it on every non-CUDA path.

Environment switches:
    GRACE_KERNELS_BUILD_EXT=1   build it, and fail loudly if it cannot be built
    GRACE_KERNELS_BUILD_EXT=0   never build it
    (unset / "auto")            build it when possible
    TORCH_CUDA_ARCH_LIST        defaults to "8.0;9.0+PTX" when no GPU is visible (CI, build hosts): machine
                                code for Ampere and Hopper plus compute_90 PTX that the driver compiles for
                                newer GPUs (Blackwell); with a GPU visible, torch builds for that GPU only
    MAX_JOBS                    parallel nvcc jobs (torch's ninja build; defaults to the CPU count)
    CUDA_HOME                   honoured when set; otherwise asked of nvcc itself (see _find_cuda_home)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# sm_80 and sm_90 machine code; "+PTX" also embeds compute_90 PTX so that GPUs newer than Hopper run the
# kernels after a driver JIT instead of failing with "no kernel image" (grace_kernels._ext checks which).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[grace-kernels setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """Locate the CUDA toolkit root.

    torch guesses CUDA_HOME from the directory of the first `nvcc` on PATH, which is wrong when
    that `nvcc` is a wrapper script or a symlink living outside the toolkit (e.g. /usr/local/bin/nvcc
    exec'ing /usr/local/cuda-13.0/bin/nvcc). nvcc's dry run prints the directory it really runs from.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        ).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if "TOP=" in line:
            top = os.path.realpath(line.split("TOP=", 1)[1].strip())
            if os.path.isfile(os.path.join(top, "bin", "nvcc")):
                return top
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _extensions():
    mode = os.environ.get("GRACE_KERNELS_BUILD_EXT", "auto").lower()
    if mode in ("0", "false", "off", "no"):
        _log("GRACE_KERNELS_BUILD_EXT=0: not building the CUDA extension")
        return [], {}
    forced = mode in ("1", "true", "on", "yes")

    def skip(reason: str):
        if forced:
            raise RuntimeError(f"GRACE_KERNELS_BUILD_EXT=1 but the CUDA extension cannot be built: {reason}")
        _log(f"skipping the CUDA extension: {reason}")
        return [], {}

    # Everything under csrc/ is the extension; the CPU executor the tests build (tests/simt/) lives outside it.
    sources = [
        path
        for ext in ("cu", "cpp")
        for path in sorted(glob.glob(os.path.join("csrc", "**", f"*.{ext}"), recursive=True))
    ]
    if not sources:
        return skip("no sources under csrc/")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit (nvcc) found")
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        return skip(f"torch is not importable in the build environment ({e}); use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    _log(f"building grace_kernels._C with CUDA_HOME={cuda_home}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
    ext = CUDAExtension(
        name="grace_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            # -Xptxas -v prints registers and spills per kernel into the build log; the AOT check
            # (python -m grace_kernels.aot) reads the same numbers back from the built .so.
            # --expt-relaxed-constexpr: the kernels call constexpr helpers of csrc/w4a16/w4a16.h (the plan
            # shared with the host and the CPU emulator, so they cannot be __device__-only). torch's
            # CUDAExtension happens to pass it too; stated here so the build does not depend on that.
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
