"""Ahead-of-time compile check for every GPU kernel of the package, runnable on a CPU-only machine.

The Triton interpreter (TRITON_INTERPRET=1, how CI runs the kernels) accepts code that the real
compiler rejects, and says nothing about registers, shared memory or spills. This check compiles
every Triton kernel listed in an ``AOT_SPECS`` list of a ``grace_kernels.triton`` module for each
target architecture (``triton.compile`` with a ``GPUTarget`` needs no GPU), then reads each cubin's
resource usage with the ``cuobjdump`` that ships in Triton's NVIDIA backend. It does the same for
the kernels inside the CUDA extension ``grace_kernels._C`` when it is built.

It fails (exit status 1) on any compile error, on any local-memory use (spills or stack arrays),
and on a module with a kernel (a ``@triton.jit`` function named ``*_kernel``) that no spec covers.

Usage::

    python -m grace_kernels.aot [--arch 80 --arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile

from grace_kernels.kernel_spec import KernelSpec


@dataclasses.dataclass
class Usage:
    kernel: str
    arch: int
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.local_bytes == 0 and self.stack_bytes == 0


def _nvidia_bin(tool: str) -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", tool)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tool} not found in Triton's NVIDIA backend ({path})")
    return path


_RES = re.compile(
    r"Function ([^\s:]+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", re.MULTILINE
)


def read_resource_usage(binary: str) -> list[tuple[str, int, int, int, int]]:
    """(function, registers, stack, shared, local) for each kernel in a cubin or fat binary (.so)."""
    out = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", binary], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {binary}: {out.stderr.strip()}")
    return [(m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in _RES.findall(out.stdout)]


def collect_specs() -> list[KernelSpec]:
    """Every ``AOT_SPECS`` entry of every ``grace_kernels.triton`` module; fails on uncovered kernels."""
    import grace_kernels.triton as pkg

    specs: list[KernelSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        mod_specs = list(getattr(mod, "AOT_SPECS", []))
        jitted = {n for n, obj in inspect.getmembers(mod) if type(obj).__name__ == "JITFunction"}
        covered = {getattr(s.kernel, "fn", s.kernel).__name__ for s in mod_specs}
        # Launched kernels are named *_kernel; other @triton.jit functions are device helpers that
        # get compiled inside the kernels that call them.
        missing = {n for n in jitted if n.endswith("_kernel") and n not in covered}
        if missing:
            raise RuntimeError(f"{mod.__name__} has kernels without AOT_SPECS entries: {sorted(missing)}")
        specs.extend(mod_specs)
    return specs


def compile_spec(spec: KernelSpec, arch: int) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        sig = dict(spec.signature)
        for k in spec.constexprs:
            sig[k] = "constexpr"
        src = ASTSource(fn=spec.kernel, signature=sig, constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            rows = read_resource_usage(f.name)
        finally:
            os.unlink(f.name)
        _, reg, stack, shared_static, local = rows[0]
        # Triton allocates its shared memory dynamically; the cubin reports the static part only.
        shared = max(shared_static, int(compiled.metadata.shared))
        return Usage(spec.name, arch, reg, shared, local, stack)
    except Exception as e:  # a compile error is a finding, not a crash of the whole check
        root = e.__cause__ or e  # Triton wraps the real error (e.g. a NameError) in a CompilationError
        return Usage(spec.name, arch, 0, 0, 0, 0, error=f"{type(root).__name__}: {str(root)[-600:]}")


def kernel_name(demangled: str, names: list[str]) -> str:
    """The entry of ``names`` (the extension's own names for its kernels, ``_C.dynamic_shared_memory``) that
    ``demangled`` (a c++filt-demangled symbol) is, else ``demangled`` itself.

    A name matches when it, whitespace ignored, appears in the symbol after a namespace separator (or at
    its start) and right before the parameter list: ``w4a16_gemm_kernel<__half, 4>`` matches
    ``void ns::(anonymous namespace)::w4a16_gemm_kernel<__half, 4>(__half const*, int)``. The extension
    owns the names; nothing here parses C++ beyond that.
    """
    flat = "".join(demangled.split())
    hits = []
    for name in names:
        key = "".join(name.split()) + "("
        at = flat.find(key)
        while at >= 0:
            if at == 0 or flat[at - 1] in ": ":
                hits.append(name)
                break
            at = flat.find(key, at + 1)
    return hits[0] if len(hits) == 1 else demangled


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def parse_fatbin_usage(text: str) -> list[tuple[str, int, int, int, int, int]]:
    """(function, arch, registers, stack, shared, local) from ``cuobjdump -res-usage`` of a fat binary."""
    rows, arch = [], 0
    # "arch = sm_80" opens a section; each kernel is "Function <mangled>:" followed by its usage line.
    for m in re.finditer(r"arch = sm_(\d+)|" + _RES.pattern, text, re.MULTILINE):
        if m.group(1):
            arch = int(m.group(1))
        else:
            rows.append((m.group(2), arch, int(m.group(3)), int(m.group(4)), int(m.group(5)), int(m.group(6))))
    return rows


def extension_usage() -> list[Usage]:
    """Resource usage of every kernel in the built CUDA extension, per embedded architecture.

    Shared memory is the larger of the static amount in the binary and the dynamic amount the kernel
    requests at launch (``grace_kernels._C.dynamic_shared_memory``).
    """
    spec = importlib.util.find_spec("grace_kernels._C")
    if spec is None or spec.origin is None:
        return []
    out = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", spec.origin], capture_output=True, text=True)
    rows = parse_fatbin_usage(out.stdout)
    if not rows:
        return [Usage("_C", 0, 0, 0, 0, 0, error=f"no kernels found by cuobjdump in {spec.origin}: "
                                                  f"{out.stderr.strip()[-300:]}")]
    try:
        dynamic = dict(getattr(importlib.import_module("grace_kernels._C"), "dynamic_shared_memory", {}))
    except ImportError:
        dynamic = {}
    names = [kernel_name(d, list(dynamic)) for d in _demangle([r[0] for r in rows])]
    return [Usage(f"_C:{name}", arch, reg, max(shared, dynamic.get(name, 0)), local, stack)
            for name, (_, arch, reg, stack, shared, local) in zip(names, rows, strict=True)]


def run(archs: tuple[int, ...] = (80, 90)) -> list[Usage]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the AOT check compiles real kernels: run it without TRITON_INTERPRET=1")
    results = [compile_spec(s, a) for s in collect_specs() for a in archs]
    return results + extension_usage()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="SM version, repeatable (default 80 and 90)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    results = run(tuple(args.arch or (80, 90)))
    print(f"{'kernel':<52} {'sm':>3} {'regs':>5} {'smem B':>8} {'local B':>8} {'stack B':>8}  status")
    for u in results:
        status = "ok" if u.ok else (u.error or "SPILLS/LOCAL MEMORY")
        print(f"{u.kernel:<52} {u.arch:>3} {u.registers:>5} {u.shared_bytes:>8} {u.local_bytes:>8} "
              f"{u.stack_bytes:>8}  {status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(u) for u in results], f, indent=1)
    bad = [u for u in results if not u.ok]
    print(f"{len(results) - len(bad)} ok, {len(bad)} failed")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
