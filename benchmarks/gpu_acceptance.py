"""GPU day in one command: build, parity tests, sanitizers, decode and kernel benchmarks, within a budget.

Made for a lent GPU machine with no network whose image already has torch, Triton, transformers, pytest,
pytest-benchmark, nvcc and compute-sanitizer (the H200 image: torch 2.11 + CUDA 13, Triton 3.6,
transformers 5.17). Each step runs as its own process group, in this order (most informative first):

    env          nvidia-smi and the versions of the stack
    install      pip install --no-deps --no-build-isolation -e . (the image's torch untouched), building
                 grace_kernels._C for this GPU's architecture only, with every core; then the registers,
                 shared memory and spills of every extension kernel (python -m grace_kernels.aot's reader)
    gpu-tests    python -m pytest -m gpu tests
    decode       benchmarks/bench_decode.py: LLaVA-1.5-7B-shaped decode, bf16 vs INT4 vs torch int4
    memcheck     compute-sanitizer --tool memcheck  on benchmarks/sanitize_w4a16.py (GEMM + dequantize)
    racecheck    compute-sanitizer --tool racecheck on the same driver
    bench-w4a16  pytest benchmarks/bench_w4a16.py (GPU shapes; GRACE_BENCH_QUICK=1 trims the M sweep)
    bench-rest   pytest benchmarks/ for the other ops (GPU shapes, trimmed grids)

Every step has a time estimate; their sum stays under 8 minutes (``--dry-run`` prints them and checks that
every file they use exists). ``--budget`` (seconds, default 450) bounds the whole run: a step gets the
time that is left, a step that runs past it is stopped (its process group killed) and reported as
"stopped at budget", later steps as "skipped for time"; results are rewritten after every step, so what
ran is saved whatever happens. ``--steps a,b`` runs only those; ``--full-benchmarks`` runs the complete
benchmark grids (longer than the budget allows).

Results, at most 8 files and no subfolder, go to ``$OUT`` (default benchmarks/results/): summary.md,
acceptance.json (steps, statuses, times, the environment, test counts, extension resource usage),
acceptance.log (every step's full output), decode.json, benchmarks.json (all kernel benchmark rows).

Usage: ``bash benchmarks/gpu_acceptance.sh [--budget SECONDS] [--dry-run] [--steps NAMES]``
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
# Pure Python (no torch, no grace_kernels): this process starts before the install step makes the package
# importable, so nothing it runs itself may import the package; only the steps' fresh interpreters can.
import decode_report  # noqa: E402

LIMIT_S = 480          # what the whole run must fit: 8 minutes
DEFAULT_BUDGET_S = 450  # leaves half a minute for start-up and the results' transfer
RESERVE_S = 5           # kept back from each step's timeout to write the results
MIN_START_S = 15        # a step is not started with less than this left
MAX_FILES = 8
LOG_CAP = 4_000_000     # characters of each step's output kept in acceptance.log


@dataclasses.dataclass
class Step:
    """One step: a command (argv, run from the repository root) or a Python callable returning (rc, output)."""

    name: str
    estimate_s: int
    what: str
    argv: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    uses: list[str] = dataclasses.field(default_factory=list)  # repository files the step needs
    needs_extension: bool = False
    after: object = None  # callable(step_result, ctx) run after the command, e.g. to parse its output


@dataclasses.dataclass
class StepResult:
    name: str
    estimate_s: int
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
    smi = shutil.which("nvidia-smi")
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


def find_cuda_tool(name: str) -> str:
    """``name`` on PATH, else in the CUDA toolkit (CUDA_HOME, /usr/local/cuda, beside nvcc), else the bare name
    (the step then reports it missing). compute-sanitizer is not always on PATH where nvcc is."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, roots):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(root, sub, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return name


def steps(work: str, full_benchmarks: bool = False) -> list[Step]:
    py = _python()
    bench_env = {"GRACE_BENCH_RESULTS": os.path.join(work, "bench"), "PYTHONUNBUFFERED": "1"}
    if not full_benchmarks:
        bench_env["GRACE_BENCH_QUICK"] = "1"
    pytest = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    sanitizer_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}

    def sanitizer(tool: str) -> list[str]:
        return [find_cuda_tool("compute-sanitizer"), "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
                "--kernel-name", "kns=w4a16", py, "benchmarks/sanitize_w4a16.py"]

    return [
        Step("env", 10, "nvidia-smi; python, torch, CUDA, Triton, transformers versions",
             [py, "-c", _ENV_PROBE], after=_parse_env),
        Step("install", 90, "pip install --no-deps --no-build-isolation -e . ; _C for this GPU's arch only",
             [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
             env={"GRACE_KERNELS_BUILD_EXT": "1", "MAX_JOBS": str(os.cpu_count() or 1), "PIP_NO_INDEX": "1"},
             uses=["setup.py", "pyproject.toml", "grace_kernels/aot.py"], after=_after_install),
        Step("gpu-tests", 100, "pytest -m gpu tests (parity of every kernel on the GPU)",
             [*pytest, "-m", "gpu", "tests", *_parallel(), "--junitxml", os.path.join(work, "gpu-tests.xml")],
             env={"PYTHONUNBUFFERED": "1"}, uses=["tests/conftest.py"], after=_parse_pytest),
        Step("decode", 70, "end-to-end decode, LLaVA-1.5-7B shapes, batch 1 and 8: bf16 / int4 / aten int4pack",
             [py, "benchmarks/bench_decode.py", "--json", os.path.join(work, "decode.json")], env=bench_env,
             uses=["benchmarks/bench_decode.py", "benchmarks/peers.py"]),
        Step("memcheck", 30, "compute-sanitizer memcheck: W4A16 GEMM + dequantize kernels, small shapes",
             sanitizer("memcheck"), env=sanitizer_env, uses=["benchmarks/sanitize_w4a16.py"], needs_extension=True),
        Step("racecheck", 35, "compute-sanitizer racecheck: W4A16 GEMM + dequantize kernels, small shapes",
             sanitizer("racecheck"), env=sanitizer_env, uses=["benchmarks/sanitize_w4a16.py"], needs_extension=True),
        Step("bench-w4a16", 60, "W4A16 GEMM vs cuBLAS / aten int4pack / Triton, LLaVA-7B and Qwen2-VL-2B layers",
             [*pytest, "benchmarks/bench_w4a16.py"], env=bench_env,
             uses=["benchmarks/bench_w4a16.py", "benchmarks/harness.py", "benchmarks/shapes.py"],
             after=_parse_pytest),
        Step("bench-rest", 45, "LSQ, gated DKD + fused linear loss, CKA benchmarks",
             [*pytest, "benchmarks/", "--ignore=benchmarks/bench_w4a16.py", "--ignore=benchmarks/bench_decode.py"],
             env=bench_env, uses=["benchmarks/bench_lsq.py", "benchmarks/bench_cka.py",
                                  "benchmarks/bench_fused_linear_grace_loss.py"], after=_parse_pytest),
    ]


def _parallel() -> list[str]:
    """pytest-xdist workers for the parity tests, where it is installed (the H200 image has it): most of their
    time is host work (building weights, compiling Triton kernels), which the GPU can overlap. Never for
    benchmarks, whose timings would disturb each other."""
    import importlib.util

    return ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []


_ENV_PROBE = r"""
import json, platform, subprocess, shutil
info = {"python": platform.python_version()}
for mod in ("torch", "triton", "transformers", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"missing: {e}"
import torch
info["torch_cuda"] = torch.version.cuda
info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
info["capability"] = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
for tool in ("nvcc", "compute-sanitizer", "ncu", "nvidia-smi"):
    info[tool] = shutil.which(tool)
if info["nvidia-smi"]:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
print("ENV_JSON " + json.dumps(info))
"""

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


def _after_install(result: StepResult, ctx: dict) -> None:
    if result.status == "ok" and not glob.glob(os.path.join(ROOT, "grace_kernels", "_C*.so")):
        # an editable install that left the extension in its own build folder: importing from the checkout
        # (every later step runs there) needs it beside the sources
        proc = subprocess.run([_python(), "setup.py", "build_ext", "--inplace"], capture_output=True, text=True,
                              cwd=ROOT, timeout=600, env={**os.environ, "GRACE_KERNELS_BUILD_EXT": "1",
                                                          "TORCH_CUDA_ARCH_LIST": result.details.get(
                                                              "TORCH_CUDA_ARCH_LIST", "")})
        result.output += "\n--- build_ext --inplace ---\n" + proc.stdout[-20000:] + proc.stderr[-20000:]
    proc = subprocess.run([_python(), "-c", _EXT_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    result.output += "\n--- extension check ---\n" + proc.stdout[-20000:] + proc.stderr[-5000:]
    info = _json_line(proc.stdout, "EXT_JSON") or {}
    result.details.update(info)
    ctx["extension"] = bool(info.get("describe", {}).get("cuda_extension"))
    if result.status == "ok" and not ctx["extension"]:
        result.status = "failed"
        result.details["why"] = "installed, but grace_kernels._C does not load"


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)")


def parse_pytest(output: str) -> dict:
    """Counts from pytest's last summary line, and the FAILED/ERROR lines of its short summary."""
    counts = {}
    for line in reversed(output.splitlines()):
        found = _SUMMARY.findall(line)
        if found and ("passed" in line or "failed" in line or "error" in line or "skipped" in line):
            counts = {kind.rstrip("s") if kind == "errors" else kind: int(n) for n, kind in found}
            break
    failed = [line.split(" ", 1)[1][:300] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "failed": failed[:100]}


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


def run(steps_: list[Step], *, budget_s: float, out: str, work: str, start: float | None = None) -> list[StepResult]:
    """Run the steps in order within ``budget_s`` seconds of ``start``; write the results after each one."""
    start = time.monotonic() if start is None else start
    ctx: dict = {"extension": None, "budget_s": budget_s}
    results = [StepResult(s.name, s.estimate_s) for s in steps_]
    for step, result in zip(steps_, results, strict=True):
        left = budget_s - (time.monotonic() - start)
        if left < MIN_START_S:
            result.status = "skipped for time"
            continue
        if step.needs_extension and ctx["extension"] is False:
            result.status = "skipped: grace_kernels._C was not built (see install)"
            continue
        missing = [tool for tool in step.argv[:1] if shutil.which(tool) is None and not os.path.isfile(tool)]
        if missing:
            result.status = f"skipped: {missing[0]} is not installed"
            continue
        env = {**os.environ, **step.env}
        if step.name == "install":
            env["TORCH_CUDA_ARCH_LIST"] = ctx.get("arch") or gpu_arch() or ""
            result.details["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
        print(f"[{time.monotonic() - start:6.1f}s] {step.name}: {step.what} (estimate {step.estimate_s} s, "
              f"{left:.0f} s left)", flush=True)
        t0 = time.monotonic()
        rc, output, timed_out = run_step(step, left - RESERVE_S, env)
        if step.name.endswith("check") and rc not in (0, None) and "kernel-name" in output and (
                "nrecognized" in output or "nknown" in output or "nvalid" in output):
            # an older compute-sanitizer without kernel filters: check every kernel of the driver instead
            argv = [a for a in step.argv if a not in ("--kernel-name", "kns=w4a16")]
            rc, output, timed_out = run_step(dataclasses.replace(step, argv=argv),
                                             budget_s - (time.monotonic() - start) - RESERVE_S, env)
        result.wall_s, result.rc, result.output = time.monotonic() - t0, rc, output[-LOG_CAP:]
        result.status = "stopped at budget" if timed_out else ("ok" if rc == 0 else "failed")
        if step.after is not None:
            try:
                step.after(result, ctx)
            except Exception as e:  # a parser's failure must not lose the step's own result
                result.details["parse_error"] = f"{type(e).__name__}: {e}"
        if step.name == "env":
            cap = (ctx.get("env") or {}).get("capability")
            ctx["arch"] = f"{cap[0]}.{cap[1]}" if cap else None
        print(f"[{time.monotonic() - start:6.1f}s] {step.name}: {result.status} in {result.wall_s:.0f} s", flush=True)
        write_results(results, out=out, work=work, budget_s=budget_s, elapsed_s=time.monotonic() - start)
    write_results(results, out=out, work=work, budget_s=budget_s, elapsed_s=time.monotonic() - start)
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


def write_results(results: list[StepResult], *, out: str, work: str, budget_s: float, elapsed_s: float) -> list[str]:
    """Write summary.md, acceptance.json, acceptance.log (+ decode.json, benchmarks.json when present)."""
    os.makedirs(out, exist_ok=True)
    written = []

    def put(name: str, text: str) -> None:
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        written.append(name)

    by_name = {r.name: r for r in results}
    env = by_name["env"].details if "env" in by_name else {}
    decode = None
    if os.path.exists(os.path.join(work, "decode.json")):
        shutil.copyfile(os.path.join(work, "decode.json"), os.path.join(out, "decode.json"))
        written.append("decode.json")
        with open(os.path.join(out, "decode.json")) as f:
            decode = json.load(f)
    bench = _merged_benchmarks(work)
    if bench:
        put("benchmarks.json", json.dumps(bench, indent=1))
    put("acceptance.json", json.dumps({"budget_s": budget_s, "elapsed_s": elapsed_s, "limit_s": LIMIT_S,
                                        "env": env, "steps": [r.public() for r in results]}, indent=1, default=str))
    put("acceptance.log", "".join(f"\n===== {r.name}: {r.status} (rc {r.rc}, {r.wall_s:.0f} s) =====\n{r.output}"
                                  for r in results))
    put("summary.md", summary_markdown(results, env, decode, bench, budget_s, elapsed_s))
    assert len(written) <= MAX_FILES, written
    return written


def summary_markdown(results, env, decode, bench, budget_s, elapsed_s) -> str:
    lines = ["# GPU acceptance", "",
             f"{env.get('gpu') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"Triton {env.get('triton')}, transformers {env.get('transformers')}; {elapsed_s:.0f} s of a "
             f"{budget_s:.0f} s budget.", "",
             "| step | estimate s | wall s | status | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = ""
        if "counts" in r.details:
            detail = ", ".join(f"{n} {k}" for k, n in r.details["counts"].items())
            if r.details.get("failed"):
                detail += "; first failure: " + r.details["failed"][0][:150]
        elif r.name == "install":
            detail = f"TORCH_CUDA_ARCH_LIST={r.details.get('TORCH_CUDA_ARCH_LIST')}"
        elif r.name.endswith("check") and r.output:
            verdict = [line for line in r.output.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
            detail = (verdict[-1].strip() if verdict else "") + f"; driver: {_last_line(r.output, 'failed')}"
        lines.append(f"| {r.name} | {r.estimate_s} | {r.wall_s:.0f} | {r.status} | {detail.replace('|', '/')} |")
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
                    lines.append(f"| {row['layer']} | {row['m']} | {row['dtype']} | {row['backend']} | "
                                 f"{row['ms']:.4g} | {row['gb_per_s']:.4g} | {_f(row.get('pct_peak_bw'))} | "
                                 f"{_f(row.get('speedup_vs_cublas'))} |")
    lines += ["", f"Other benchmark reports: {', '.join(r.get('op', '?') for r in bench) or 'none'} "
              "(all rows in benchmarks.json)."]
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _last_line(output: str, needle: str) -> str:
    return next((line.strip() for line in reversed(output.splitlines()) if needle in line), "")


# --------------------------------------------------------------------------------------------------- main


def dry_run(steps_: list[Step], budget_s: float) -> int:
    """Print every step with its estimate; check the files the steps use exist and the sum fits the limit."""
    problems = []
    total = 0
    for s in steps_:
        total += s.estimate_s
        print(f"{s.name:<12} {s.estimate_s:>4} s  {s.what}")
        print(f"{'':<19}$ {' '.join('<script>' if chr(10) in a else a for a in s.argv)}")
        for rel in s.uses + [a for a in s.argv if a.startswith(("benchmarks/", "tests"))]:
            path = os.path.join(ROOT, rel.split("=", 1)[-1])
            if not os.path.exists(path):
                problems.append(f"{s.name}: {rel} does not exist")
    print(f"{'total':<12} {total:>4} s  (limit {LIMIT_S} s, budget {budget_s:.0f} s)")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        if '"gpu:' not in f.read():
            problems.append("the pytest marker 'gpu' is not declared in pyproject.toml")
    gpu_tests = [p for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")) if "pytest.mark.gpu" in open(p).read()]
    print(f"{len(gpu_tests)} test files carry GPU tests")
    if not gpu_tests:
        problems.append("no test under tests/ is marked gpu")
    if total >= LIMIT_S:
        problems.append(f"the estimates sum to {total} s, over the {LIMIT_S} s limit")
    if budget_s > LIMIT_S:
        problems.append(f"--budget {budget_s:.0f} s is over the {LIMIT_S} s limit")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run (default 450)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and estimates, check files; run nothing")
    p.add_argument("--steps", help="comma-separated step names to run (default: all)")
    p.add_argument("--full-benchmarks", action="store_true", help="the complete benchmark grids (over budget)")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    out = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    work = tempfile.mkdtemp(prefix="gpu_acceptance_")
    all_steps = steps(work, args.full_benchmarks)
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s.name for s in all_steps})
        if unknown:
            p.error(f"--steps: unknown {unknown}; steps are {[s.name for s in all_steps]}")
        all_steps = [s for s in all_steps if s.name in wanted]
    if args.dry_run:
        return dry_run(all_steps, args.budget)
    results = run(all_steps, budget_s=args.budget, out=out, work=work, start=start)
    print(open(os.path.join(out, "summary.md")).read())
    print(f"results in {out}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
