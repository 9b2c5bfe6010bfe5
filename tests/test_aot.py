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
