"""Timing, hardware limits and result files shared by the benchmarks.

Every benchmark times with device synchronisation, reports a rate (GB/s or TFLOP/s) against the
hardware limit of the device it ran on, and names that device. GPU results are written as JSON
under benchmarks/results/, file names carrying the GPU name; CPU runs only print (CPU timings
of the references are not the product).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

import grace_kernels
from grace.io import write_json

# GRACE_BENCH_RESULTS redirects the JSON files (gpu_acceptance.py collects them into one file); where it is
# set the files are written on CPUs too (the acceptance run's stand-in), since the caller asked for them.
RESULTS_DIR = os.environ.get("GRACE_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
PERSIST = torch.cuda.is_available() or bool(os.environ.get("GRACE_BENCH_RESULTS"))
# GRACE_BENCH_QUICK=1: the same GPU shapes, fewer points per sweep (what fits gpu_acceptance's budget).
QUICK = os.environ.get("GRACE_BENCH_QUICK") == "1"

# Peak DRAM bandwidth (GB/s) and dense bf16 tensor-core TFLOP/s from the vendors' data sheets.
GPU_LIMITS = {
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100-SXM4-40GB": (1555.0, 312.0),
    "A100-PCIE-40GB": (1555.0, 312.0),
    "A100 80GB PCIe": (1935.0, 312.0),
    "H100 80GB HBM3": (3350.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H200": (4800.0, 989.0),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def hardware_limits() -> tuple[float | None, float | None]:
    """(peak GB/s, peak bf16 TFLOP/s) of this device, or (None, None) when unknown (CPUs)."""
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    for key, limits in GPU_LIMITS.items():
        if key in name:
            return limits
    return None, None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, graph: bool = False) -> float:
    """Median time of fn() in milliseconds.

    By default the wall time of each call, synchronising the device around it. With ``graph=True`` on a
    GPU, ``graph_calls`` calls of fn are captured into one CUDA graph and each replay is timed with CUDA
    events: the GPU time per call without Python and launch overhead, which would otherwise swamp a
    microsecond decode GEMM (serving engines replay decode steps as CUDA graphs for the same reason).
    """
    if graph and torch.cuda.is_available():
        return _graph_time_ms(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph_time_ms(fn: Callable[[], object], warmup: int, reps: int, graph_calls: int = 16) -> float:
    side = torch.cuda.Stream()  # warm-up (lazy init, autotuning, measured dispatch) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(graph_calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / graph_calls)
    return statistics.median(times)


class Report:
    """Collects rows of one benchmark file, prints them as a table, writes JSON on GPUs (and wherever
    GRACE_BENCH_RESULTS names the folder)."""

    def __init__(self, op: str):
        self.op, self.rows = op, []

    def add(self, **row) -> None:
        self.rows.append(row)
        if PERSIST:  # rewritten after every row: a run stopped midway keeps what it measured
            self._write()

    def finish(self) -> str | None:
        if not self.rows:
            return None
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        print(f"\n{self.op} on {device_name()}")
        print(" | ".join(keys))
        for r in self.rows:
            print(" | ".join(_fmt(r.get(k)) for k in keys))
        return self._write() if PERSIST else None

    def _write(self) -> str:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-")
        path = os.path.join(RESULTS_DIR, f"{self.op}-{slug}.json")
        # never a half-written file, even when the run is killed
        write_json({"op": self.op, "device": device_name(), "env": grace_kernels.describe(), "rows": self.rows},
                   path)
        return path


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
