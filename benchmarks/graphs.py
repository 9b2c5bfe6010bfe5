"""CUDA graph capture and replay, and device timing, each with the CPU stand-in CI runs in its place.

Torch only (no grace_kernels): the preflight (benchmarks/preflight.py) uses it before the package is
installed, and the decode engine (benchmarks/bench_decode.py) captures its step with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch


class CudaGraphs:
    """CUDA graph capture and replay, as the engine uses them: warm-up on a side stream, then one capture."""

    name = "CUDA graph"

    @contextlib.contextmanager
    def warmup(self):
        side = torch.cuda.Stream()  # cuBLAS handles, Triton JIT, lazy init: off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph


class EagerGraphs:
    """The CPU stand-in for :class:`CudaGraphs`, with the same interface, so that a capture path (its
    warm-up included) runs in CI: ``capture`` records ``fn`` without running it (a CUDA capture executes
    nothing either) and each ``replay`` runs it eagerly."""

    name = "eager stand-in for a CUDA graph"

    @contextlib.contextmanager
    def warmup(self):
        yield

    def capture(self, fn):
        return RecordedStep(fn)


@dataclasses.dataclass
class RecordedStep:
    """What :meth:`EagerGraphs.capture` returns: ``replay()`` runs the function and counts the replays."""

    fn: object
    replays: int = 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def graphs_for(device) -> CudaGraphs | EagerGraphs:
    """CUDA graphs on a CUDA device, the eager stand-in elsewhere."""
    return CudaGraphs() if torch.device(device).type == "cuda" else EagerGraphs()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes: CUDA events on GPUs (device time of the work it enqueues), the host clock
    elsewhere."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
