"""The one-command GPU acceptance run (benchmarks/gpu_acceptance.sh): its dry run (which imports what every
step imports), its CPU stand-in run (every group, every result file, in an orchestrator that cannot import
the package), its group budgets with stand-in steps, its parsers and its preflight, all on CPU."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_acceptance as ga  # noqa: E402
import preflight  # noqa: E402

STEPS = ["env", "install", "gpu-tests", "decode", "bench-w4a16", "memcheck", "racecheck", "bench-rest"]


def test_groups_in_order_of_value_with_budgets_that_fit_the_machine():
    groups = ga.groups("/tmp/unused")
    assert [g.name for g in groups] == list(ga.GROUPS_BUDGET_S) == ["core", "bench", "sanitize", "extra"]
    assert [s.name for g in groups for s in g.steps] == STEPS
    assert [s.name for s in groups[0].steps] == ["env", "install", "gpu-tests"]
    assert sum(s.estimate_s for g in groups for s in g.steps) + ga.STARTUP_S < ga.LIMIT_S
    assert sum(g.budget_s for g in groups) + ga.STARTUP_S <= ga.LIMIT_S
    for g in groups:  # a group's budget covers its estimates
        assert g.budget_s >= sum(s.estimate_s for s in g.steps), g.name
    argv = {s.name: s.argv for g in groups for s in g.steps}
    for name in ("gpu-tests", "bench-w4a16", "bench-rest"):
        assert "-vv" in argv[name]  # each result logged as it finishes
        assert ("--timeout" in argv[name]) == ga.has_module("pytest_timeout")
    assert "--ignore=benchmarks/bench_data.py" in argv["bench-rest"]  # CPU-only benchmark
    assert all("bench_data" not in a for a in argv["bench-w4a16"])
    assert [g.budget_s for g in ga.scaled(groups, 81)] == pytest.approx(
        [81 * b / sum(ga.GROUPS_BUDGET_S.values()) for b in ga.GROUPS_BUDGET_S.values()])


@pytest.mark.slow
def test_dry_run_imports_what_every_step_imports():
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_acceptance.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PROBLEM" not in proc.stdout
    listed = dict(re.findall(r"^  (\S+)\s+(\d+) s ", proc.stdout, re.MULTILINE))
    assert list(listed) == STEPS, proc.stdout
    total = int(re.search(r"total estimate (\d+) s", proc.stdout).group(1))
    assert total == sum(int(v) for v in listed.values()) and total + ga.STARTUP_S < ga.LIMIT_S
    assert proc.stdout.count("imports ok") == len(STEPS), proc.stdout


def test_dry_run_reports_a_missing_file_and_a_failing_import(capsys):
    bad = ga.Step("ghost", 5, "uses a file that is not there", [sys.executable, "benchmarks/no_such_bench.py"],
                  dry=[sys.executable, "-c", "import no_such_module_for_the_dry_run"])
    assert ga.dry_run([ga.Group("g", 10, "one bad step", [bad])]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: ghost: benchmarks/no_such_bench.py does not exist" in out
    assert "PROBLEM: ghost: its imports fail" in out and "no_such_module_for_the_dry_run" in out


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


@pytest.mark.slow
def test_stand_in_run_completes_every_group_and_writes_every_file_without_importing_the_package(tmp_path):
    """The whole day on CPU (CUDA hidden, no network): the orchestrator, which cannot import grace_kernels
    (bug 2: its summary once imported bench_decode), runs every step of every group; the decode step (a
    fresh interpreter) writes decode.json and the summary carries its table."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_acceptance.sh"), "--stand-in"],
                          capture_output=True, text=True, timeout=900,
                          env={**_blocked_env(tmp_path), "OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["acceptance.json", "acceptance.log", "benchmarks.json", "decode.json",
                                       "summary.md"]
    saved = json.loads((out / "acceptance.json").read_text())
    assert [(s["group"], s["name"], s["status"]) for s in saved["steps"]] == [
        (g.name, s.name, "ok") for g in ga.groups("/tmp/unused") for s in g.steps]
    assert [g["name"] for g in saved["groups"]] == list(ga.GROUPS_BUDGET_S)
    assert saved["env"]["device"] == "cpu" and "graph_us_per_kernel" in saved["env"]
    steps = {s["name"]: s for s in saved["steps"]}
    assert steps["gpu-tests"]["details"]["counts"].get("skipped", 0) > 0  # collected; CUDA hidden
    assert "0 failed" in steps["memcheck"]["output_tail"]  # the driver's checks ran through the CPU ops
    decode = json.loads((out / "decode.json").read_text())
    summary = (out / "summary.md").read_text()
    assert "## Decode" in summary and "tiny kernel:" in summary
    for row in decode["rows"]:  # every measured path is in the summary's decode table
        assert f"| {row['batch']} | {row['path']} | {row['decode_tokens_per_s']:.4g} |" in summary
    ops = [r["op"] for r in json.loads((out / "benchmarks.json").read_text())]
    assert "w4a16_matmul" in ops and "decode" in ops


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_each_group_has_its_own_budget_and_what_ran_is_saved(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    # a benchmark row written before the stop must survive it
    (work / "bench" / "op-X.json").write_text(json.dumps({"op": "op", "rows": [{"ms": 1.0}]}))
    sleep = "import time; print('started', flush=True); time.sleep({})"
    groups = [
        ga.Group("first", 9, "quick steps, then one that hangs", [
            ga.Step("env", 1, "quick", _py("print('ENV_JSON {\"gpu\": \"fake\", \"copy_gbps\": 4321.0}')"),
                    after=ga._parse_env),
            ga.Step("gpu-tests", 1, "pytest-like",
                    _py("print('FAILED tests/x.py::t - boom'); print('1 failed, 2 passed'); raise SystemExit(1)"),
                    after=ga._parse_pytest),
            ga.Step("hang", 1, "runs past its group's budget", _py(sleep.format(120))),
            ga.Step("late", 1, "no time left in its group", _py("print('no')"))]),
        ga.Group("second", 5, "runs whole although the first group hung", [
            ga.Step("after-hang", 1, "quick",
                    _py("import os; print('second group ran', os.environ['GRACE_COPY_GBPS'])"))]),
        ga.Group("third", 4, "inherits the time the second left", [
            ga.Step("longer", 1, "longer than its own budget", _py(sleep.format(5)))]),
    ]
    # The real margins assume minutes of budget. A step stopped at its group's deadline ends RESERVE_S
    # before it, so less than MIN_START_S is left for the next step of that group.
    monkeypatch.setattr(ga, "MIN_START_S", 2)
    monkeypatch.setattr(ga, "RESERVE_S", 1)
    results = ga.run(groups, out=str(out), work=str(work), env={})
    status = {r.name: r.status for r in results}
    assert status == {"env": "ok", "gpu-tests": "failed", "hang": "stopped at budget", "late": "skipped for time",
                      "after-hang": "ok", "longer": "ok"}
    assert results[1].details == {"counts": {"failed": 1, "passed": 2}, "failed": ["tests/x.py::t - boom"]}
    files = sorted(os.listdir(out))
    assert files == ["acceptance.json", "acceptance.log", "benchmarks.json", "summary.md"]
    saved = json.loads((out / "acceptance.json").read_text())
    assert [s["status"] for s in saved["steps"]] == list(status.values())
    log = (out / "acceptance.log").read_text()
    assert "started" in log  # the stopped step's output is kept
    assert "second group ran 4321.0" in log  # later steps see the copy rate the preflight measured
    summary = (out / "summary.md").read_text()
    assert "| first | hang | 1 |" in summary and "stopped at budget" in summary and "1 failed, 2 passed" in summary
    assert json.loads((out / "benchmarks.json").read_text())[0]["rows"] == [{"ms": 1.0}]


def test_pytest_parser_reads_the_summary_or_the_verbose_lines_of_a_stopped_run():
    text = ("....\nFAILED tests/a.py::b[1] - AssertionError: x\nERROR tests/c.py::d\n"
            "== 3 failed, 10 passed, 2 skipped in 4s ==")
    assert ga.parse_pytest(text) == {"counts": {"failed": 3, "passed": 10, "skipped": 2},
                                     "failed": ["tests/a.py::b[1] - AssertionError: x", "tests/c.py::d"]}
    assert ga.parse_pytest("nothing ran") == {"counts": {}, "failed": []}
    stopped = ("tests/a.py::t[1] PASSED                [ 10%]\ntests/a.py::t[2] FAILED                [ 20%]\n"
               "[gw1] [ 30%] SKIPPED tests/b.py::u\n[gw0] [ 40%] PASSED tests/b.py::v\ntests/c.py::w ")
    assert ga.parse_pytest(stopped) == {"counts": {"passed": 2, "failed": 1, "skipped": 1}, "partial": True,
                                        "failed": ["tests/a.py::t[2] FAILED                [ 20%]"]}


def test_bad_arguments():
    for argv in (["--steps", "env,nonsense", "--dry-run"], ["--groups", "core,nonsense", "--dry-run"],
                 ["--budget", "0", "--dry-run"], ["--groups", "bench", "--steps", "env", "--dry-run"]):
        with pytest.raises(SystemExit) as e:
            ga.main(argv)
        assert e.value.code == 2, argv


def test_cuda_tools_are_found_in_the_toolkit_when_not_on_path(tmp_path, monkeypatch):
    tool = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert preflight.find_cuda_tool("compute-sanitizer") == str(tool)
    monkeypatch.delenv("CUDA_HOME")
    assert preflight.find_cuda_tool("no-such-tool") is None


def test_preflight_times_a_tiny_kernel_through_the_graph_stand_in():
    costs = preflight.kernel_costs("cpu", kernels=20, reps=3)
    assert costs["kernels_per_graph"] == 20
    for key in ("graph_us_per_kernel", "eager_us_per_kernel", "graph_replay_us"):
        assert 0 < costs[key] < 1e5, (key, costs)
    assert preflight.copy_gbps("cpu", 1 << 20, reps=2) > 0
    lines = preflight.describe({**costs, "device": "cpu", "nvcc": None, "ncu": "/x/ncu"})
    assert any(line.startswith("tiny kernel:") and "CPU stand-in" in line for line in lines)
    assert any("nvcc MISSING" in line and "ncu at /x/ncu" in line for line in lines)


def test_the_documented_commands_fit_the_machine_and_parse():
    """docs/gpu-run.md's commands for the lent machine: each under the device tool's 2,000 characters, its
    results under $OUT, its arguments valid, its budget inside the timeout_s stated before it, and the first
    run plus a retry inside the 15 minutes."""
    doc = open(os.path.join(ROOT, "docs", "gpu-run.md")).read()
    blocks = re.findall(r"`timeout_s` (\d+):\n\n```\n(.*?)\n```", doc, re.S)
    assert len(blocks) == 4, blocks  # the first run; retries: on the warm machine, on a fresh one, without a build
    timeouts = []
    for timeout_s, command in blocks:
        assert len(command) < 2000 and "\n" not in command and '"$OUT/' in command, command
        argv = command.split("gpu_acceptance.sh", 1)[1].split("2>&1")[0].split()
        _, groups = ga.plan(argv, "/tmp/unused")
        budget = sum(g.budget_s for g in groups)
        assert budget + 30 <= int(timeout_s), (command, budget, timeout_s)
        timeouts.append(int(timeout_s))
    first, warm, fresh, no_build = timeouts
    start = 120  # a machine's start, at the slow end
    assert start + first + warm <= 900  # the warm machine is retried at once: no second start
    assert start + fresh <= 330 and start + no_build <= 240  # within the 5.5 and 4 minutes the doc names
    assert "--steps" not in blocks[0][1] and "install" not in blocks[1][1] and "install" in blocks[2][1]


def test_the_documented_plan_is_the_code():
    """docs/gpu-run.md's table of groups, budgets, steps and estimates matches the orchestrator's."""
    doc = open(os.path.join(ROOT, "docs", "gpu-run.md")).read()
    rows = re.findall(r"^\| (?:(\w+) \((\d+)\))? ?\| ([\w-]+) \| (\d+) \|", doc, re.MULTILINE)
    documented, group = [], None
    for name, budget, step, estimate in rows:
        group = (name, int(budget)) if name else group
        documented.append((*group, step, int(estimate)))
    assert documented == [(g.name, g.budget_s, s.name, s.estimate_s) for g in ga.groups("/tmp/unused") for s in g.steps]
    total = sum(s.estimate_s for g in ga.groups("/tmp/unused") for s in g.steps)
    assert f"The estimates sum to {total} s" in doc and f"that is {total + ga.STARTUP_S} s" in doc
    assert f"The run's own budget is {sum(ga.GROUPS_BUDGET_S.values())} s" in doc
