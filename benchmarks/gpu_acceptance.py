"""GPU day in one command: build, parity tests, benchmarks, sanitizers, in groups with their own budgets.

Made for a lent GPU machine with no network whose image already has torch, Triton, transformers, pytest,
pytest-benchmark, pytest-timeout, pytest-xdist, nvcc and compute-sanitizer (the H200 image: torch 2.11 +
CUDA 13, Triton 3.6, transformers 5.17). The steps run in groups, most valuable first; each step is its own
process group:

    core      env          benchmarks/preflight.py: nvidia-smi, versions, tools (nvcc, compute-sanitizer,
                           ncu), a tiny kernel's cost inside a CUDA graph, the device copy rate
              install      pip install --no-deps --no-build-isolation --no-index -e . (the image's torch
                           untouched), building grace_kernels._C for this GPU's architecture only, with every
                           core; then every extension kernel's registers, shared memory and spills
              gpu-tests    pytest -m gpu tests (parity of every kernel on the GPU)
    bench     decode       benchmarks/bench_decode.py: LLaVA-1.5-7B-shaped decode, bf16 vs INT4 vs torch int4
              bench-w4a16  pytest benchmarks/bench_w4a16.py (GPU shapes; GRACE_BENCH_QUICK=1 trims the M sweep)
    sanitize  memcheck     compute-sanitizer --tool memcheck  on benchmarks/sanitize_w4a16.py
              racecheck    compute-sanitizer --tool racecheck on the same driver
    extra     bench-rest   pytest benchmarks/ for the other GPU ops (not bench_data, which is CPU-only)

Budgets: each group has one (``GROUPS_BUDGET_S``; ``--budget`` rescales them all). Group i must end by the
sum of the budgets of groups 1..i after the start, so a group that hangs is stopped at its own deadline and
every later group still gets its full budget, and time a group leaves unused passes to the next. A step
still running at its group's deadline is stopped (its process group killed): "stopped at budget"; a step
that cannot start: "skipped for time". pytest runs with ``-vv`` (each result logged as it finishes) and,
where pytest-timeout is installed, ``--timeout`` per test. Results are rewritten after every step, so what
ran is kept whatever happens. The estimates, plus the machine's start-up (``STARTUP_S``), stay under
``LIMIT_S`` (8 minutes of the 15-minute machine).

``--dry-run`` prints the plan and, in a fresh interpreter per step with the step's environment, imports
everything the step imports (pytest steps: their collection), so a missing module or a syntax error
shows before a GPU is spent. ``--stand-in`` runs every group on a machine without CUDA (CI): CUDA hidden,
the install a ``pip --dry-run``, the sanitizer driver run without compute-sanitizer through the CPU
operators, the decode benchmark at toy size, bench-rest collected only; every result file is written.

This process imports neither torch nor grace_kernels (only the steps' fresh interpreters do: on the GPU
day the package becomes importable only after the install step, which runs after this process started);
its own summary is written with decode_report and preflight, which are pure Python at import.

Results, at most 8 files and no subfolder, go to ``$OUT`` (default benchmarks/results/; for the stand-in, a
temporary folder): summary.md,
acceptance.json (groups, steps, statuses, times, the preflight, test counts, extension resource usage),
acceptance.log (every step's full output), decode.json, benchmarks.json (all kernel benchmark rows).

Usage: ``bash benchmarks/gpu_acceptance.sh [--budget S] [--groups a,b | --steps a,b] [--dry-run] [--stand-in]``
(docs/gpu-run.md has the command for the lent machine and its retries).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)
# Pure Python at import (no torch, no grace_kernels), see the module docstring.
import decode_report  # noqa: E402
import preflight  # noqa: E402

LIMIT_S = 480       # what the estimates, start-up included, must fit: 8 minutes of the 15-minute machine
STARTUP_S = 60      # the machine's start and the working tree's transfer, before this script starts
GROUPS_BUDGET_S = {"core": 180, "bench": 160, "sanitize": 45, "extra": 20}  # seconds; sum 405
RESERVE_S = 5       # kept back from each step's timeout to write the results
MIN_START_S = 15    # a step is not started with less than this left in its group
MAX_FILES = 8
LOG_CAP = 4_000_000  # characters of each step's output kept in acceptance.log
TEST_TIMEOUT_S = 120   # pytest-timeout, per parity test (the first Triton compile of a kernel included)
BENCH_TIMEOUT_S = 150  # pytest-timeout, per benchmark test (one sweep)


@dataclasses.dataclass
class Step:
    """One step: a command (argv, run from the repository root in its own process group).

    ``uses``: repository files it needs (the dry run checks they exist). ``dry``: the argv that imports
    what the step imports, in a fresh interpreter (the dry run). ``after(result, ctx)``: parses the output.
    """

    name: str
    estimate_s: int
    what: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    uses: list[str] = dataclasses.field(default_factory=list)
    needs_extension: bool = False
    after: object = None
    dry: list[str] | None = None


@dataclasses.dataclass
class Group:
    """Steps that share one budget (seconds), run in order."""

    name: str
    budget_s: float
    what: str
    steps: list[Step]


@dataclasses.dataclass
class StepResult:
    name: str
    estimate_s: int
    group: str = ""
    status: str = "not run"  # ok, failed, stopped at budget, skipped for time, skipped: <why>
    rc: int | None = None
    wall_s: float = 0.0
    output: str = ""
    details: dict = dataclasses.field(default_factory=dict)

    def public(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tail"] = d.pop("output")[-4000:]
        return d


# ---------------------------------------------------------------------------------------------- the steps


def _python() -> str:
    return sys.executable or "python3"


def gpu_arch() -> str | None:
    """This GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0"), from nvidia-smi or torch."""
    smi = preflight.find_cuda_tool("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
        cap = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
        if re.fullmatch(r"\d+\.\d+", cap):
            return cap
    out = subprocess.run([_python(), "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                         capture_output=True, text=True, timeout=120)
    cap = out.stdout.strip()
    return cap if re.fullmatch(r"\d+\.\d+", cap) else None


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported by the steps' interpreter (the same one as this process)."""
    return importlib.util.find_spec(name) is not None


def _imports(script: str | None, *modules: str, present: tuple[str, ...] = ()) -> list[str]:
    """argv of a fresh interpreter that imports ``script`` as its step would run it (its folder first on
    sys.path, its top level executed, not its main), then ``modules``, and finds ``present`` (modules run
    with -m, not imported here): the dry run of a script step."""
    code = ["import importlib.util, runpy, sys"]
    if script:
        path = os.path.join(ROOT, script)
        code += [f"sys.path.insert(0, {os.path.dirname(path)!r})", f"runpy.run_path({path!r}, run_name='dry_run')"]
    code += [f"import {m}" for m in modules]
    code += [f"assert importlib.util.find_spec({m!r}), '{m} is not installed'" for m in present]
    return [_python(), "-c", "; ".join(code)]


def _collect(argv: list[str]) -> list[str]:
    """The dry run of a pytest step: the same collection (every module imported), nothing run."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-n", "--junitxml", "--timeout"):
            skip = True
        elif not a.startswith("-vv"):
            out.append(a)
    return [*out, "--collect-only", "-q"]


def groups(work: str, *, stand_in: bool = False, full_benchmarks: bool = False) -> list[Group]:
    """The day's groups, in order of value. ``stand_in``: the commands a machine without CUDA can run in
    their place (module docstring)."""
    py = _python()
    bench_env = {"GRACE_BENCH_RESULTS": os.path.join(work, "bench")}
    if not full_benchmarks:
        bench_env["GRACE_BENCH_QUICK"] = "1"
    pytest = [py, "-m", "pytest", "-vv", "-rfEs", "-p", "no:cacheprovider"]
    timeout = has_module("pytest_timeout")
    tests = [*pytest, "-m", "gpu", "tests", *_parallel(), "--junitxml", os.path.join(work, "gpu-tests.xml")]
    if timeout:
        tests += ["--timeout", str(TEST_TIMEOUT_S)]
    bench = pytest + (["--timeout", str(BENCH_TIMEOUT_S)] if timeout else [])
    rest = [*bench, "benchmarks/", *(f"--ignore=benchmarks/{f}" for f in ("bench_w4a16.py", "bench_decode.py",
                                                                           "bench_data.py"))]
    decode = [py, "benchmarks/bench_decode.py", "--json", os.path.join(work, "decode.json")]
    install = [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    install_env = {"GRACE_KERNELS_BUILD_EXT": "1", "MAX_JOBS": str(os.cpu_count() or 1),
                   "PIP_BREAK_SYSTEM_PACKAGES": "1"}  # an image's system Python may be marked externally managed
    driver = "benchmarks/sanitize_w4a16.py"
    sanitizer_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # each tensor its own allocation

    def sanitizer(tool: str) -> list[str]:
        if stand_in:  # the driver's every check, through the CPU operators; no compute-sanitizer
            return [py, driver, "--device", "cpu"]
        return [preflight.find_cuda_tool("compute-sanitizer") or "compute-sanitizer", "--tool", tool,
                "--error-exitcode", "3", "--print-limit", "20", "--kernel-name", "kns=w4a16", py, driver]

    if stand_in:
        install = [*install[:4], "--dry-run", *install[4:]]  # builds the metadata, installs nothing
        install_env["GRACE_KERNELS_BUILD_EXT"] = "0"
        decode += ["--compile", "none", "--batches", "1", "--reps", "1"]
        rest += ["--collect-only"]  # the CPU grids take minutes
    steps_install = ["setup.py", "pyproject.toml", "grace_kernels/aot.py"]
    return [
        Group("core", GROUPS_BUDGET_S["core"], "the machine, the build, the parity tests", [
            Step("env", 15, "preflight: GPU, versions, tools, tiny kernel in a graph, copy rate",
                 [py, "benchmarks/preflight.py"], uses=["benchmarks/preflight.py", "benchmarks/graphs.py"],
                 after=_parse_env, dry=_imports("benchmarks/preflight.py", "torch", "graphs")),
            Step("install", 80, "pip install --no-deps --no-build-isolation -e . ; _C for this GPU's arch only",
                 install, env=install_env, uses=steps_install, after=_after_install,
                 dry=_imports(None, "setuptools", "torch.utils.cpp_extension", "grace_kernels.aot", present=("pip",))),
            Step("gpu-tests", 85, "pytest -m gpu tests (parity of every kernel on the GPU)", tests,
                 uses=["tests/conftest.py"], after=_parse_pytest, dry=_collect(tests)),
        ]),
        Group("bench", GROUPS_BUDGET_S["bench"], "decode and W4A16 GEMM benchmarks", [
            Step("decode", 100, "end-to-end decode, LLaVA-1.5-7B shapes, batch 1 and 8: bf16 / int4 / aten int4pack",
                 decode, env=bench_env, uses=["benchmarks/bench_decode.py", "benchmarks/peers.py"],
                 dry=_imports("benchmarks/bench_decode.py")),
            Step("bench-w4a16", 50, "W4A16 GEMM vs cuBLAS / aten int4pack / Triton, LLaVA-7B and Qwen2-VL-2B layers",
                 [*bench, "benchmarks/bench_w4a16.py"], env=bench_env,
                 uses=["benchmarks/bench_w4a16.py", "benchmarks/harness.py", "benchmarks/shapes.py"],
                 after=_parse_pytest, dry=_collect([*bench, "benchmarks/bench_w4a16.py"])),
        ]),
        Group("sanitize", GROUPS_BUDGET_S["sanitize"], "compute-sanitizer on the CUDA W4A16 kernels", [
            Step("memcheck", 20, "compute-sanitizer memcheck: W4A16 GEMM + dequantize kernels, small shapes",
                 sanitizer("memcheck"), env=sanitizer_env, uses=[driver], needs_extension=not stand_in,
                 dry=_imports(driver)),
            Step("racecheck", 25, "compute-sanitizer racecheck: W4A16 GEMM + dequantize kernels, small shapes",
                 sanitizer("racecheck"), env=sanitizer_env, uses=[driver], needs_extension=not stand_in,
                 dry=_imports(driver)),
        ]),
        Group("extra", GROUPS_BUDGET_S["extra"], "the other GPU benchmarks", [
            Step("bench-rest", 20, "LSQ, gated DKD + fused linear loss, CKA benchmarks", rest, env=bench_env,
                 uses=["benchmarks/bench_lsq.py", "benchmarks/bench_cka.py",
                       "benchmarks/bench_fused_linear_grace_loss.py"], after=_parse_pytest, dry=_collect(rest)),
        ]),
    ]


def step_env(stand_in: bool) -> dict[str, str]:
    """What every step's environment adds to this process's: unbuffered output (a stopped step keeps its
    log), the checkout first on the path (the package imports even where the install failed), no network,
    and, for the stand-in, no CUDA."""
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    if stand_in:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _parallel() -> list[str]:
    """pytest-xdist workers for the parity tests, where it is installed (the H200 image has it): most of their
    time is host work (building weights, compiling Triton kernels), which the GPU can overlap. Never for
    benchmarks, whose timings would disturb each other."""
    return ["-n", "4"] if has_module("xdist") else []


_EXT_PROBE = r"""
import dataclasses, json
import grace_kernels
from grace_kernels import aot
info = {"describe": grace_kernels.describe()}
try:
    info["extension_kernels"] = [dataclasses.asdict(u) for u in aot.extension_usage()]
except Exception as e:
    info["extension_kernels_error"] = f"{type(e).__name__}: {e}"
print("EXT_JSON " + json.dumps(info, default=str))
"""


def _json_line(output: str, tag: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def _parse_env(result: StepResult, ctx: dict) -> None:
    result.details = _json_line(result.output, "ENV_JSON") or {}
    ctx["env"] = result.details
    cap = result.details.get("capability")
    ctx["arch"] = f"{cap[0]}.{cap[1]}" if cap else None
    if result.details.get("gpu") and result.details.get("copy_gbps"):
        # the decode benchmark states its bandwidth against this machine's measured copy rate
        ctx.setdefault("step_env", {})["GRACE_COPY_GBPS"] = f"{result.details['copy_gbps']:.1f}"


def _left(ctx: dict) -> float:
    """Seconds an after-hook's own commands may take: what is left of the group's budget, less the reserve
    for writing the results (a hook that overruns raises TimeoutExpired, which the run records)."""
    return max(1.0, ctx.get("deadline", time.monotonic() + 600) - time.monotonic() - RESERVE_S)


def _after_install(result: StepResult, ctx: dict) -> None:
    env = {**os.environ, **ctx.get("step_env", {})}
    if ctx.get("stand_in"):
        result.details["stand_in"] = "pip --dry-run (nothing installed); no CUDA, so no extension to build"
    elif result.status == "ok" and not glob.glob(os.path.join(ROOT, "grace_kernels", "_C*.so")):
        # an editable install that left the extension in its own build folder: importing from the checkout
        # (every later step runs there) needs it beside the sources
        proc = subprocess.run([_python(), "setup.py", "build_ext", "--inplace"], capture_output=True, text=True,
                              cwd=ROOT, timeout=_left(ctx), env={**env, "GRACE_KERNELS_BUILD_EXT": "1",
                                                          "TORCH_CUDA_ARCH_LIST": result.details.get(
                                                              "TORCH_CUDA_ARCH_LIST", "")})
        result.output += "\n--- build_ext --inplace ---\n" + proc.stdout[-20000:] + proc.stderr[-20000:]
    proc = subprocess.run([_python(), "-c", _EXT_PROBE], capture_output=True, text=True, cwd=ROOT,
                          timeout=_left(ctx), env=env)
    result.output += "\n--- extension check ---\n" + proc.stdout[-20000:] + proc.stderr[-5000:]
    info = _json_line(proc.stdout, "EXT_JSON") or {}
    result.details.update(info)
    ctx["extension"] = bool(info.get("describe", {}).get("cuda_extension"))
    if result.status == "ok" and not ctx["extension"] and not ctx.get("stand_in"):
        result.status = "failed"
        result.details["why"] = "installed, but grace_kernels._C does not load"


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|tests? collected)")
_VERBOSE = re.compile(r"::\S*.*?\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b|\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL"
                      r"|XPASS)\b.*::")


def parse_pytest(output: str) -> dict:
    """Counts from pytest's last summary line, or, where there is none (a run stopped at its budget), from
    the ``-vv`` result lines printed so far ("partial": True); and the FAILED/ERROR lines of its short
    summary (or, when stopped, of the verbose lines)."""
    counts, partial = {}, False
    for line in reversed(output.splitlines()):
        found = _SUMMARY.findall(line)
        if found and line.lstrip("= ").split(" ")[0].isdigit():
            counts = {_kind(kind): int(n) for n, kind in found}
            break
    failed = [line.split(" ", 1)[1][:300] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if not counts:
        verbose = [(m.group(1) or m.group(2), line.strip()) for line in output.splitlines()
                   if (m := _VERBOSE.search(line))]
        for kind, _ in verbose:
            key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error",
                   "XFAIL": "xfailed", "XPASS": "xpassed"}[kind]
            counts[key] = counts.get(key, 0) + 1
        partial = bool(verbose)
        failed = failed or [line[:300] for kind, line in verbose if kind in ("FAILED", "ERROR")]
    out = {"counts": counts, "failed": failed[:100]}
    if partial:
        out["partial"] = True
    return out


def _kind(kind: str) -> str:
    if kind.startswith("error"):
        return "error"
    return "collected" if "collected" in kind else kind


def _parse_pytest(result: StepResult, ctx: dict) -> None:
    result.details = parse_pytest(result.output)


# ------------------------------------------------------------------------------------------------- runner


def run_step(step: Step, timeout_s: float, env: dict[str, str]) -> tuple[int | None, str, bool]:
    """(return code, output, timed out). The step runs in its own process group, killed whole on timeout."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout_s)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = None, True
        log.seek(0)
        return rc, log.read(), timed_out


def scaled(groups_: list[Group], budget_s: float | None) -> list[Group]:
    """The groups with their budgets rescaled to sum to ``budget_s`` (unchanged when None)."""
    if budget_s is None:
        return groups_
    total = sum(g.budget_s for g in groups_)
    return [dataclasses.replace(g, budget_s=g.budget_s * budget_s / total) for g in groups_]


def run(groups_: list[Group], *, out: str, work: str, start: float | None = None, stand_in: bool = False,
        env: dict[str, str] | None = None) -> list[StepResult]:
    """Run the groups in order, each step within its group's deadline (the sum of the budgets so far after
    ``start``); write the results after each step. ``env``: added to every step's environment."""
    start = time.monotonic() if start is None else start
    extra_env = dict(step_env(stand_in) if env is None else env)
    ctx: dict = {"extension": None, "stand_in": stand_in, "step_env": extra_env}
    results = [StepResult(s.name, s.estimate_s, g.name) for g in groups_ for s in g.steps]
    budget_s = sum(g.budget_s for g in groups_)
    by_step = iter(results)
    deadline = start

    def save():
        write_results(results, groups_, out=out, work=work, elapsed_s=time.monotonic() - start)

    for group in groups_:
        deadline += group.budget_s
        print(f"[{time.monotonic() - start:6.1f}s] group {group.name}: {group.what} (budget {group.budget_s:.0f} s, "
              f"until {deadline - start:.0f} s)", flush=True)
        for step in group.steps:
            result = next(by_step)
            left = deadline - time.monotonic()
            if left < MIN_START_S:
                result.status = "skipped for time"
                continue
            if step.needs_extension and ctx["extension"] is False:
                result.status = "skipped: grace_kernels._C was not built (see install)"
                continue
            if shutil.which(step.argv[0]) is None and not os.path.isfile(step.argv[0]):
                result.status = f"skipped: {step.argv[0]} is not installed"
                continue
            step_env_ = {**os.environ, **extra_env, **step.env}
            if step.name == "install":
                step_env_["TORCH_CUDA_ARCH_LIST"] = ("" if stand_in else ctx.get("arch") or gpu_arch() or "")
                result.details["TORCH_CUDA_ARCH_LIST"] = step_env_["TORCH_CUDA_ARCH_LIST"]
            print(f"[{time.monotonic() - start:6.1f}s] {step.name}: {step.what} (estimate {step.estimate_s} s, "
                  f"{left:.0f} s left in {group.name})", flush=True)
            t0 = time.monotonic()
            rc, output, timed_out = run_step(step, left - RESERVE_S, step_env_)
            if step.name.endswith("check") and rc not in (0, None) and "kernel-name" in output and (
                    "nrecognized" in output or "nknown" in output or "nvalid" in output):
                # an older compute-sanitizer without kernel filters: check every kernel of the driver instead
                argv = [a for a in step.argv if a not in ("--kernel-name", "kns=w4a16")]
                rc, output, timed_out = run_step(dataclasses.replace(step, argv=argv),
                                                 deadline - time.monotonic() - RESERVE_S, step_env_)
            result.wall_s, result.rc, result.output = time.monotonic() - t0, rc, output[-LOG_CAP:]
            result.status = "stopped at budget" if timed_out else ("ok" if rc == 0 else "failed")
            if step.after is not None:
                ctx["deadline"] = deadline  # what an after-hook runs (a build, a probe) stays in the group's time
                try:
                    step.after(result, ctx)
                except Exception as e:  # a parser's failure must not lose the step's own result
                    result.details["parse_error"] = f"{type(e).__name__}: {e}"
            print(f"[{time.monotonic() - start:6.1f}s] {step.name}: {result.status} in {result.wall_s:.0f} s",
                  flush=True)
            save()
        save()
    print(f"[{time.monotonic() - start:6.1f}s] done ({budget_s:.0f} s budget)", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ results


def _merged_benchmarks(work: str) -> list[dict]:
    merged = []
    for path in sorted(glob.glob(os.path.join(work, "bench", "*.json"))):
        with open(path) as f:
            try:
                merged.append(json.load(f))
            except json.JSONDecodeError:  # a file being rewritten when a step was stopped
                continue
    return merged


def _write(path: str, text: str) -> None:
    """Atomically: a reader (or a stop) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(results: list[StepResult], groups_: list[Group], *, out: str, work: str,
                  elapsed_s: float) -> list[str]:
    """Write summary.md, acceptance.json, acceptance.log (+ decode.json, benchmarks.json when present)."""
    os.makedirs(out, exist_ok=True)
    written = []

    def put(name: str, text: str) -> None:
        _write(os.path.join(out, name), text)
        written.append(name)

    env = next((r.details for r in results if r.name == "env"), {})
    decode = None
    if os.path.exists(os.path.join(work, "decode.json")):
        with open(os.path.join(work, "decode.json")) as f:
            text = f.read()
        try:
            decode = json.loads(text)
            put("decode.json", text)
        except json.JSONDecodeError:
            pass
    bench = _merged_benchmarks(work)
    if bench:
        put("benchmarks.json", json.dumps(bench, indent=1))
    budget_s = sum(g.budget_s for g in groups_)
    put("acceptance.json", json.dumps({
        "budget_s": budget_s, "elapsed_s": elapsed_s, "limit_s": LIMIT_S, "startup_s": STARTUP_S, "env": env,
        "groups": [{"name": g.name, "budget_s": g.budget_s, "steps": [s.name for s in g.steps]} for g in groups_],
        "steps": [r.public() for r in results]}, indent=1, default=str))
    put("acceptance.log", "".join(f"\n===== {r.name}: {r.status} (rc {r.rc}, {r.wall_s:.0f} s) =====\n{r.output}"
                                  for r in results))
    put("summary.md", summary_markdown(results, env, decode, bench, budget_s, elapsed_s))
    assert len(written) <= MAX_FILES, written
    return written


def _step_detail(r: StepResult) -> str:
    detail = ""
    if "counts" in r.details:
        detail = ", ".join(f"{n} {k}" for k, n in r.details["counts"].items())
        if r.details.get("partial"):
            detail += " (stopped: counted from the results logged so far)"
        if r.details.get("failed"):
            detail += "; first failure: " + r.details["failed"][0][:150]
    elif r.name == "install":
        parts = [f"TORCH_CUDA_ARCH_LIST={r.details.get('TORCH_CUDA_ARCH_LIST')}", r.details.get("why"),
                 r.details.get("stand_in")]
        detail = "; ".join(filter(None, parts))
    elif r.name.endswith("check") and r.output:
        verdict = [line for line in r.output.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        parts = [verdict[-1].strip() if verdict else "", f"driver: {_last_line(r.output, 'failed')}"]
        detail = "; ".join(filter(None, parts))
    return detail.replace("|", "/")


def summary_markdown(results, env, decode, bench, budget_s, elapsed_s) -> str:
    """The run as Markdown: the preflight, the step table, extension kernels, decode and GEMM tables."""
    lines = ["# GPU acceptance", "",
             f"{env.get('gpu') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"Triton {env.get('triton')}, transformers {env.get('transformers')}; {elapsed_s:.0f} s of a "
             f"{budget_s:.0f} s budget.", ""]
    if env:
        lines += [f"- {line}" for line in preflight.describe(env)] + [""]
    lines += ["| group | step | estimate s | wall s | status | detail |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.group} | {r.name} | {r.estimate_s} | {r.wall_s:.0f} | {r.status} | {_step_detail(r)} |"
              for r in results]
    install = next((r for r in results if r.name == "install"), None)
    kernels = (install.details.get("extension_kernels") or []) if install else []
    if kernels:
        lines += ["", "## Extension kernels (registers, shared memory, spills)", "",
                  "| kernel | sm | regs | smem B | local B |", "|---|---|---|---|---|"]
        lines += [f"| {k['kernel']} | {k['arch']} | {k['registers']} | {k['shared_bytes']} | {k['local_bytes']} |"
                  for k in kernels]
    if decode:
        lines += ["", "## Decode", "", decode_report.markdown(decode)]
    for report in bench:
        if report.get("op") == "w4a16_matmul":
            lines += ["", "## W4A16 GEMM (ms; speedup vs cuBLAS on the dequantized weight)", "",
                      "| layer | m | dtype | backend | ms | GB/s | % peak BW | vs cuBLAS |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in report["rows"]:
                if row.get("m") in (1, 16, 64, 256, 4096):
                    lines.append(f"| {row.get('layer')} | {row['m']} | {row.get('dtype')} | {row.get('backend')} | "
                                 f"{_f(row.get('ms'))} | {_f(row.get('gb_per_s'))} | {_f(row.get('pct_peak_bw'))} | "
                                 f"{_f(row.get('speedup_vs_cublas'))} |")
    targets = decode_report.gemm_targets(bench)
    if targets:
        met, lowest = sum(t["meets"] for t in targets), min(t["speedup_vs_cublas"] for t in targets)
        lines += ["", f"W4A16 GEMM at M <= 16 on the LLaVA-7B layers: {met} of {len(targets)} at >= "
                  f"{decode_report.TARGET_GEMM_SPEEDUP}x cuBLAS (lowest {lowest:.2f}x)."]
    lines += ["", f"Other benchmark reports: {', '.join(r.get('op', '?') for r in bench) or 'none'} "
              "(all rows in benchmarks.json)."]
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def _last_line(output: str, needle: str) -> str:
    return next((line.strip() for line in reversed(output.splitlines()) if needle in line), "")


# --------------------------------------------------------------------------------------------------- main


def dry_run(groups_: list[Group], *, stand_in: bool = False, imports: bool = True) -> int:
    """Print every group and step with its budget and estimate; check that the files the steps use exist,
    that the estimates with the start-up fit ``LIMIT_S``, and (``imports``) that each step's imports load in
    a fresh interpreter with the step's environment. Returns 1 if anything is wrong, else 0."""
    problems, total = [], 0
    env = {**os.environ, **step_env(stand_in)}
    for g in groups_:
        print(f"group {g.name}: budget {g.budget_s:.0f} s, {g.what}")
        for s in g.steps:
            total += s.estimate_s
            print(f"  {s.name:<12} {s.estimate_s:>4} s  {s.what}")
            print(f"  {'':<19}$ {' '.join('<script>' if chr(10) in a else a for a in s.argv)}")
            for rel in s.uses + [a for a in s.argv if a.startswith(("benchmarks/", "tests"))]:
                if not os.path.exists(os.path.join(ROOT, rel.split("=", 1)[-1])):
                    problems.append(f"{s.name}: {rel} does not exist")
            if shutil.which(s.argv[0]) is None and not os.path.isfile(s.argv[0]):
                print(f"  {'':<19}note: {s.argv[0]} is not on this machine (the step will be skipped here)")
            if imports and s.dry:
                t0 = time.monotonic()
                proc = subprocess.run(s.dry, cwd=ROOT, env={**env, **s.env}, capture_output=True, text=True,
                                      timeout=300)
                verdict = "imports ok" if proc.returncode == 0 else "IMPORTS FAIL"
                print(f"  {'':<19}{verdict} ({time.monotonic() - t0:.0f} s)")
                if proc.returncode != 0:
                    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                    problems.append(f"{s.name}: its imports fail:\n      " + "\n      ".join(tail))
    budget = sum(g.budget_s for g in groups_)
    print(f"total estimate {total} s + start-up {STARTUP_S} s = {total + STARTUP_S} s (limit {LIMIT_S} s); "
          f"budgets {budget:.0f} s")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        if '"gpu:' not in f.read():
            problems.append("the pytest marker 'gpu' is not declared in pyproject.toml")
    gpu_tests = [p for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")) if "pytest.mark.gpu" in open(p).read()]
    print(f"{len(gpu_tests)} test files carry GPU tests")
    if not gpu_tests:
        problems.append("no test under tests/ is marked gpu")
    if total + STARTUP_S >= LIMIT_S:
        problems.append(f"the estimates with start-up sum to {total + STARTUP_S} s, over the {LIMIT_S} s limit")
    if budget + STARTUP_S > LIMIT_S:
        problems.append(f"the budgets ({budget:.0f} s) with start-up are over the {LIMIT_S} s limit")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def plan(argv: list[str] | None, work: str) -> tuple[argparse.Namespace, list[Group]]:
    """The command line's arguments and the groups it runs (budgets scaled); exits 2 on a bad argument."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, help=f"seconds for the chosen groups, shared in proportion to their "
                   f"budgets (default: theirs, {sum(GROUPS_BUDGET_S.values())} s for all)")
    p.add_argument("--groups", help=f"comma-separated groups to run, in the day's order ({','.join(GROUPS_BUDGET_S)})")
    p.add_argument("--steps", help="comma-separated steps to run (default: every step of the chosen groups)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, check files and every step's imports")
    p.add_argument("--stand-in", action="store_true", help="the CPU stand-in run: CUDA hidden, stand-in commands")
    p.add_argument("--full-benchmarks", action="store_true", help="the complete benchmark grids (over budget)")
    args = p.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        p.error("--budget must be positive")
    chosen = groups(work, stand_in=args.stand_in, full_benchmarks=args.full_benchmarks)
    if args.groups:
        wanted = args.groups.split(",")
        unknown = sorted(set(wanted) - {g.name for g in chosen})
        if unknown:
            p.error(f"--groups: unknown {unknown}; groups are {[g.name for g in chosen]}")
        chosen = [g for g in chosen if g.name in wanted]
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s.name for g in chosen for s in g.steps})
        if unknown:
            p.error(f"--steps: unknown {unknown} (in the chosen groups); steps are "
                    f"{[s.name for g in chosen for s in g.steps]}")
        chosen = [dataclasses.replace(g, steps=[s for s in g.steps if s.name in wanted]) for g in chosen]
        chosen = [g for g in chosen if g.steps]
    return args, scaled(chosen, args.budget)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    work = tempfile.mkdtemp(prefix="gpu_acceptance_")
    args, chosen = plan(argv, work)
    if args.dry_run:
        return dry_run(chosen, stand_in=args.stand_in)
    # the stand-in's CPU numbers never land beside GPU results
    out = os.environ.get("OUT") or (os.path.join(work, "out") if args.stand_in else
                                    os.path.join(ROOT, "benchmarks", "results"))
    results = run(chosen, out=out, work=work, start=start, stand_in=args.stand_in)
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    print(f"results in {out}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
