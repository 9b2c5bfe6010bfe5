"""The GPU run's first step: what machine this is, which tools it has, and what a kernel costs in a graph.

Prints ``nvidia-smi``, then one line per fact, then ``ENV_JSON {...}`` (what benchmarks/gpu_acceptance.py
keeps in acceptance.json and its summary):

    python, torch, torch_cuda, triton, transformers, pytest     versions ("missing: ..." where absent)
    gpu, capability, sm_count, memory_gib                       the device (None without CUDA)
    nvcc, compute-sanitizer, ncu, cuobjdump, nvidia-smi         each tool's path, or None
    pytest_timeout, xdist                                       whether those pytest plugins are installed
    graph_us_per_kernel, eager_us_per_kernel                    a 4 KB in-place add, launched N times in one
                                                                graph replay, and N times eagerly
    graph_replay_us                                             one replay of a graph of one such kernel
    copy_gbps                                                   device-to-device copy of 1 GiB, bytes read
                                                                plus written over the time (the figure the
                                                                decode report's ~4.3 TB/s copy rate is)

The graph figures bound what a decode step can cost besides its weight streaming: a step of ~1,500 small
kernels replayed as one graph costs at least 1,500 x graph_us_per_kernel. Without CUDA the same code runs
on the CPU through the eager stand-in for graphs (benchmarks/graphs.py), so CI executes every line but the
CUDA calls; its numbers are the host's and say nothing about a GPU.

Imports only torch (lazily, so that the orchestrator can import :func:`find_cuda_tool` without it), never
grace_kernels: this runs before the package is installed, and must report the machine even if the
package is broken. Usage: ``python benchmarks/preflight.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

TOOLS = ("nvcc", "compute-sanitizer", "ncu", "cuobjdump", "nvidia-smi")
VERSIONED = ("torch", "triton", "transformers", "pytest")


def find_cuda_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda, the toolkit of the
    nvcc on PATH: bin/ or compute-sanitizer/), else None. compute-sanitizer and ncu are not always on PATH
    where nvcc is."""
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
    return None


def kernel_costs(device, kernels: int = 200, reps: int = 20) -> dict:
    """Microseconds per tiny kernel inside one graph replay and launched eagerly, and per replay of a
    one-kernel graph, on ``device`` (CUDA graphs on CUDA, the eager stand-in elsewhere).

    Raises RuntimeError if the work did not all run (the tensor's final value counts every add).
    """
    import torch
    from graphs import graphs_for, sync, timed

    x = torch.zeros(1024, device=device)

    def burst():
        for _ in range(kernels):
            x.add_(1.0)

    def one():
        x.add_(1.0)

    graphs = graphs_for(device)
    with graphs.warmup():
        burst()
    graph, single = graphs.capture(burst), graphs.capture(one)
    graph.replay()  # first replay: uploads the graph
    single.replay()
    sync(device)
    graph_s = timed(lambda: [graph.replay() for _ in range(reps)], device)
    single_s = timed(lambda: [single.replay() for _ in range(reps)], device)
    eager_s = timed(lambda: [burst() for _ in range(reps)], device)
    expected = kernels * (1 + 1 + 2 * reps) + 1 + reps
    if x[0].item() != expected:
        raise RuntimeError(f"the graph did not run every kernel: {x[0].item()} adds, expected {expected}")
    return {"graph_us_per_kernel": 1e6 * graph_s / (reps * kernels), "eager_us_per_kernel": 1e6 * eager_s / (
        reps * kernels), "graph_replay_us": 1e6 * single_s / reps, "kernels_per_graph": kernels}


def copy_gbps(device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Device-to-device copy rate, GB/s counting the bytes read and the bytes written (best of ``reps``)."""
    import torch
    from graphs import sync, timed

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(reps))
    return 2 * nbytes / best / 1e9


def probe() -> dict:
    """Everything the module docstring lists; a part that fails is reported as "<part>_error"."""
    info: dict = {"python": platform.python_version()}
    for mod in VERSIONED:
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # the run goes on and says what is missing
            info[mod] = f"missing: {type(e).__name__}: {e}"
    for tool in TOOLS:
        info[tool] = find_cuda_tool(tool)
    for plugin in ("pytest_timeout", "xdist"):
        info[plugin] = importlib.util.find_spec(plugin) is not None
    try:
        import torch
    except ImportError:
        return info
    info["torch_cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    info["device"] = device
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability()),
                    sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2 ** 30)
    else:
        info.update(gpu=None, capability=None)
    for part, fn in (("kernels", lambda: kernel_costs(device)),
                     ("copy", lambda: {"copy_gbps": copy_gbps(device, (1 << 30) if cuda else (64 << 20))})):
        try:
            info.update(fn())
        except Exception as e:  # e.g. graphs refused by a sandbox: report it, the run goes on
            info[f"{part}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return info


def describe(info: dict) -> list[str]:
    """The probe as lines a person reads in the log."""
    lines = [f"device: {info.get('gpu') or info.get('device') or 'unknown'} (capability {info.get('capability')}, "
             f"{info.get('sm_count')} SMs, {_f(info.get('memory_gib'))} GiB)",
             "versions: " + ", ".join(f"{k} {info.get(k)}" for k in ("python", *VERSIONED, "torch_cuda")),
             "tools: " + ", ".join(f"{t} {'at ' + info[t] if info.get(t) else 'MISSING'}" for t in TOOLS),
             f"pytest plugins: pytest-timeout {info.get('pytest_timeout')}, xdist {info.get('xdist')}"]
    if "graph_us_per_kernel" in info:
        lines.append(f"tiny kernel: {_f(info['graph_us_per_kernel'])} us inside a graph, "
                     f"{_f(info['eager_us_per_kernel'])} us launched eagerly; one-kernel graph replay "
                     f"{_f(info['graph_replay_us'])} us" + ("" if info.get("gpu") else " (CPU stand-in)"))
    if "copy_gbps" in info:
        lines.append(f"device copy: {_f(info['copy_gbps'])} GB/s (read + written)")
    lines += [f"{k}: {v}" for k, v in info.items() if k.endswith("_error")]
    return lines


def _f(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> int:
    smi = find_cuda_tool("nvidia-smi")
    if smi:
        print(subprocess.run([smi], capture_output=True, text=True, timeout=60).stdout, flush=True)
    info = probe()
    print("\n".join(describe(info)))
    print("ENV_JSON " + json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
