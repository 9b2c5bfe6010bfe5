"""The ahead-of-time compile check: every Triton kernel builds for sm_80 and sm_90 without spills.

It runs in a subprocess because the check needs TRITON_INTERPRET unset, while the rest of the
suite runs the kernels under the interpreter.
"""

import json
import os
import subprocess
import sys

import pytest

from grace_kernels import aot


def test_resource_parser_reads_cuobjdump_lines():
    text = " Function _lsq_fwd_kernel:\n  REG:40 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:392 TEXTURE:0"
    (name, reg, stack, shared, local), = aot._RES.findall(text)
    assert (name, reg, stack, shared, local) == ("_lsq_fwd_kernel", "40", "0", "0", "8")
    assert not aot.Usage("k", 80, 40, 0, 8, 0).ok  # local memory (a spill) fails the check
    assert aot.Usage("k", 80, 40, 1024, 0, 0).ok


def test_fatbin_parser_and_demangled_names():
    text = ("arch = sm_80\n Function _Z3fooILi1EEvPKf:\n  REG:72 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:416\n"
            "arch = sm_90\n Function _Z3fooILi1EEvPKf:\n  REG:77 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:416\n")
    assert aot.parse_fatbin_usage(text) == [("_Z3fooILi1EEvPKf", 80, 72, 0, 0, 0),
                                            ("_Z3fooILi1EEvPKf", 90, 77, 0, 1024, 8)]


def test_kernels_are_named_by_the_extension_not_by_parsing_cxx():
    names = ["w4a16_gemm_kernel<__half, 1>", "w4a16_gemm_kernel<__half, 4>", "reduce_partials_kernel<__half>"]
    symbol = "void grace_kernels::w4a16::(anonymous namespace)::w4a16_gemm_kernel<__half, {}>(__half const*, int)"
    assert aot.kernel_name(symbol.format(4), names) == "w4a16_gemm_kernel<__half, 4>"
    assert aot.kernel_name(symbol.format(1), names) == "w4a16_gemm_kernel<__half, 1>"
    # spacing is c++filt's business: names match whitespace-insensitively
    assert aot.kernel_name(symbol.format(1).replace(", ", ","), names) == "w4a16_gemm_kernel<__half, 1>"
    # a kernel the extension does not name keeps its full demangled name, never a near miss
    other = symbol.format(16)
    assert aot.kernel_name(other, names) == other
    suffix = "void ns::my_reduce_partials_kernel<__half>(float const*)"
    assert aot.kernel_name(suffix, names) == suffix


def test_kernels_do_not_import_the_compile_check():
    # The spec type lives in grace_kernels.kernel_spec; the kernels declare specs without importing the tool.
    code = ("import sys, pkgutil, importlib, grace_kernels.triton as t\n"
            "[importlib.import_module(f'grace_kernels.triton.{m.name}') for m in pkgutil.iter_modules(t.__path__)]\n"
            "print('grace_kernels.aot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    assert aot.KernelSpec is __import__("grace_kernels.kernel_spec").kernel_spec.KernelSpec


@pytest.mark.usefixtures("cuda_ext")
def test_extension_kernels_are_reported_per_arch_without_spills():
    rows = aot.extension_usage()
    print("\n".join(f"{u.kernel} sm_{u.arch}: {u.registers} regs, {u.shared_bytes} B smem, {u.local_bytes} B local"
                    for u in rows))
    assert {u.arch for u in rows} >= {80, 90} and all(u.ok for u in rows)
    gemm = [u for u in rows if u.kernel.startswith("_C:w4a16_gemm_kernel<")]
    assert len(gemm) == 12 and all(u.shared_bytes > 48 * 1024 for u in gemm)  # dynamic shared memory counted
    dequant = [u for u in rows if u.kernel.startswith("_C:w4a16_dequant_kernel<")]
    assert len(dequant) == 4 and all(u.shared_bytes == 64 * 68 * 4 for u in dequant)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "grace_kernels.aot", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    print(proc.stdout[-6000:], proc.stderr[-3000:])  # the table shows in CI's log (-rA / on failure)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["arch"] for r in rows if not r["kernel"].startswith("_C:")} == {80, 90}
