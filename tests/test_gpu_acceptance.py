"""The one-command GPU acceptance run (benchmarks/gpu_acceptance.sh): its dry run, which CI can execute,
and its budget mechanism, exercised with stand-in steps on CPU."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_acceptance as ga  # noqa: E402


def test_dry_run_lists_every_step_with_estimates_under_eight_minutes():
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_acceptance.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [s.name for s in ga.steps("/tmp/unused")]
    assert names == ["env", "install", "gpu-tests", "decode", "memcheck", "racecheck", "bench-w4a16", "bench-rest"]
    listed = dict(re.findall(r"^(\S+)\s+(\d+) s ", proc.stdout, re.MULTILINE))
    assert set(names) <= set(listed), proc.stdout
    total = int(listed["total"])
    assert total == sum(int(listed[n]) for n in names) and total < ga.LIMIT_S
    assert ga.DEFAULT_BUDGET_S < ga.LIMIT_S
    assert "PROBLEM" not in proc.stdout


def test_dry_run_reports_a_missing_file(monkeypatch, capsys):
    bad = ga.Step("ghost", 5, "uses a file that is not there", ["python3", "benchmarks/no_such_bench.py"])
    assert ga.dry_run([bad], 100) == 1
    assert "benchmarks/no_such_bench.py does not exist" in capsys.readouterr().out


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_budget_stops_a_step_and_skips_the_rest_saving_what_ran(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    # a benchmark row written before the stop must survive it
    (work / "bench" / "op-X.json").write_text(json.dumps({"op": "op", "rows": [{"ms": 1.0}]}))
    steps = [
        ga.Step("env", 1, "quick", _py("print('ENV_JSON {\"gpu\": \"fake\"}')"), after=ga._parse_env),
        ga.Step("gpu-tests", 1, "pytest-like",
                _py("print('FAILED tests/x.py::t - boom'); print('1 failed, 2 passed'); raise SystemExit(1)"),
                after=ga._parse_pytest),
        ga.Step("slow", 1, "runs past the budget", _py("import time; print('started', flush=True); time.sleep(120)")),
        ga.Step("late", 1, "never reached", _py("print('no')")),
    ]
    monkeypatch.setattr(ga, "MIN_START_S", 1)  # the real margins assume minutes of budget
    monkeypatch.setattr(ga, "RESERVE_S", 1)
    results = ga.run(steps, budget_s=12, out=str(out), work=str(work))
    status = {r.name: r.status for r in results}
    assert status == {"env": "ok", "gpu-tests": "failed", "slow": "stopped at budget", "late": "skipped for time"}
    assert results[1].details == {"counts": {"failed": 1, "passed": 2}, "failed": ["tests/x.py::t - boom"]}
    files = sorted(os.listdir(out))
    assert files == ["acceptance.json", "acceptance.log", "benchmarks.json", "summary.md"]
    assert len(files) <= ga.MAX_FILES and all(os.path.isfile(out / f) for f in files)
    saved = json.loads((out / "acceptance.json").read_text())
    assert [s["status"] for s in saved["steps"]] == list(status.values())
    assert "started" in (out / "acceptance.log").read_text()  # the stopped step's output is kept
    summary = (out / "summary.md").read_text()
    assert "| slow | 1 |" in summary and "stopped at budget" in summary and "1 failed, 2 passed" in summary
    assert json.loads((out / "benchmarks.json").read_text())[0]["rows"] == [{"ms": 1.0}]


def test_pytest_summary_parser():
    text = ("....\nFAILED tests/a.py::b[1] - AssertionError: x\nERROR tests/c.py::d\n"
            "== 3 failed, 10 passed, 2 skipped in 4s ==")
    assert ga.parse_pytest(text) == {"counts": {"failed": 3, "passed": 10, "skipped": 2},
                                     "failed": ["tests/a.py::b[1] - AssertionError: x", "tests/c.py::d"]}
    assert ga.parse_pytest("nothing ran") == {"counts": {}, "failed": []}


def test_bad_arguments():
    with pytest.raises(SystemExit):
        ga.main(["--steps", "env,nonsense", "--dry-run"])
    with pytest.raises(SystemExit):
        ga.main(["--budget", "0", "--dry-run"])


def test_cuda_tools_are_found_in_the_toolkit_when_not_on_path(tmp_path, monkeypatch):
    tool = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert ga.find_cuda_tool("compute-sanitizer") == str(tool)
    monkeypatch.delenv("CUDA_HOME")
    assert ga.find_cuda_tool("no-such-tool") == "no-such-tool"


# The orchestrator starts before its install step makes grace_kernels importable: on the GPU day only the
# steps' fresh interpreters can import the package. This sitecustomize makes that so on any machine: the
# process it starts in cannot import the named packages, and it removes its switch from the environment, so
# the processes that process starts (the steps) import them as usual.
_BLOCKER = '''
import os, sys

_blocked = [name for name in os.environ.pop("GRACE_TEST_BLOCK_IMPORTS", "").split(",") if name]


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _blocked:
            raise ImportError(f"{name} cannot be imported in this process (test blocker)")
        return None


if _blocked:
    sys.meta_path.insert(0, _Blocker())
'''
BLOCKED = "grace_kernels,grace,torch"


def _blocked_env(tmp_path) -> dict:
    """The environment of an orchestrator process that cannot import grace_kernels, grace or torch."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    path = os.pathsep.join([str(site), ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "GRACE_TEST_BLOCK_IMPORTS": BLOCKED}


def test_the_blocker_blocks_this_process_and_not_its_children(tmp_path):
    code = ("import subprocess, sys\n"
            "try:\n    import grace_kernels\nexcept ImportError as e:\n    print('blocked:', e)\n"
            "subprocess.run([sys.executable, '-c', 'import grace_kernels; print(\"child imports\")'], check=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_blocked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "blocked: grace_kernels cannot be imported" in proc.stdout and "child imports" in proc.stdout


def test_summary_is_written_from_decode_json_by_a_process_that_cannot_import_the_package(tmp_path):
    """Bug 2: the decode step (a fresh interpreter) writes decode.json; the orchestrator, which cannot import
    grace_kernels, must still write summary.md with the decode table, and go on to later steps."""
    out, work = tmp_path / "out", tmp_path / "work"
    code = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
import gpu_acceptance as ga
py = sys.executable
steps = [ga.Step("decode", 1, "toy decode on CPU", [py, "benchmarks/bench_decode.py", "--json",
                 {str(work / "decode.json")!r}, "--compile", "none", "--batches", "1", "--reps", "1"]),
         ga.Step("after", 1, "a later step", [py, "-c", "print('later step ran')"])]
results = ga.run(steps, budget_s=600, out={str(out)!r}, work={str(work)!r})
print("STATUS", [r.status for r in results])
assert "torch" not in sys.modules and "grace_kernels" not in sys.modules
"""
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=_blocked_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STATUS ['ok', 'ok']" in proc.stdout, proc.stdout[-3000:]
    assert sorted(os.listdir(out)) == ["acceptance.json", "acceptance.log", "decode.json", "summary.md"]
    decode = json.loads((out / "decode.json").read_text())
    summary = (out / "summary.md").read_text()
    assert "## Decode" in summary
    for row in decode["rows"]:  # every measured path is in the summary's decode table
        assert f"| {row['batch']} | {row['path']} | {row['decode_tokens_per_s']:.4g} |" in summary
    assert "later step ran" in (out / "acceptance.log").read_text()
