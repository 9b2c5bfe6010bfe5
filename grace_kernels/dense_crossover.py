"""Large-M W4A16 on the CUDA backend: the fused kernel or dequantize + cuBLAS, whichever is measured faster.

From about a hundred rows on, a W4A16 GEMM is bound by math rather than by the weight stream, and
dequantizing the weight once and handing x @ W^T to cuBLAS can beat dequantizing inside every row tile.
Where the crossover falls depends on the GPU, the shape and cuBLAS's own heuristics, so it is measured where
it is used rather than written down (:class:`DenseCrossover`). ``GRACE_KERNELS_W4A16_DENSE=auto|never|always``
overrides the measurement.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable

import torch

DENSE_ENV = "GRACE_KERNELS_W4A16_DENSE"
DENSE_POLICIES = ("auto", "never", "always")
# Below this many rows the fused kernel is not measured against dequantize + cuBLAS: a W4A16 GEMM of up to
# a few dozen rows is bound by the weight stream, which the fused kernel reads at 4 bits and the dense path
# at 16 (after writing them), so it cannot lose there.
DENSE_MIN_M = 128

# (x2d [M, K], kernel_packed, kernel_scales, group_size, bias or None) -> y [M, N] in x's dtype
Path = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]
Timer = Callable[[Callable[[], torch.Tensor], int], "tuple[float, torch.Tensor]"]


def dense_policy() -> str:
    """``GRACE_KERNELS_W4A16_DENSE``: auto (measure, the default), never (fused kernel), always (dense).

    Raises ValueError on any other value."""
    name = os.environ.get(DENSE_ENV, "").strip().lower() or "auto"
    if name not in DENSE_POLICIES:
        raise ValueError(f"{DENSE_ENV}={name!r} is not one of {DENSE_POLICIES}")
    return name


def cuda_time_ms(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, torch.Tensor]:
    """Median of reps timed calls (CUDA events) after one untimed call; returns it and the last output."""
    out = fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def cannot_time() -> bool:
    """True while a CUDA graph is being captured or torch.compile is tracing (nothing can be timed)."""
    # A capture needs an initialised CUDA context; asking without one would create it (or fail on CPU hosts).
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


class DenseCrossover:
    """Runs a large-M W4A16 GEMM by ``kernel`` (the fused kernel) or ``dense`` (dequantize + dense GEMM),
    remembering per GEMM shape which is faster.

    Calling the object applies :func:`dense_policy`: ``always`` runs ``dense``, ``never`` and inputs of fewer
    than :data:`DENSE_MIN_M` rows run ``kernel``; otherwise the first call of each key (device, dtype, N, K,
    bias, M rounded up to a power of two) times both with ``timer`` on its own inputs, remembers the winner
    and returns its output. The dense path must win by ``margin`` (5%) to be chosen, since it costs an
    N x K transient (where that transient does not fit, ``kernel`` is kept). While ``cannot_time()`` (a CUDA
    graph capture, torch.compile tracing) a known key runs its winner, an unknown one ``kernel`` (warm a
    model up eagerly before capturing it to have the measured choice baked in).

    Args:
        kernel, dense: (x2d [M, K], kernel_packed, kernel_scales, group_size, bias) -> y [M, N].
        timer: (fn, reps) -> (milliseconds, fn's output); :func:`cuda_time_ms` by default.
        cannot_time: () -> bool; :func:`cannot_time` by default.
    """

    def __init__(self, kernel: Path, dense: Path, *, timer: Timer = cuda_time_ms,
                 cannot_time: Callable[[], bool] = cannot_time, reps: int = 5, margin: float = 0.05):
        self.kernel, self.dense, self.timer, self.cannot_time = kernel, dense, timer, cannot_time
        self.reps, self.margin = reps, margin
        self._choices: dict[tuple, str] = {}
        self._times: dict[tuple, dict[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(x: torch.Tensor, n: int, k: int, has_bias: bool) -> tuple:
        m = x.shape[0]
        return (str(x.device), str(x.dtype).removeprefix("torch."), n, k, has_bias, 1 << (m - 1).bit_length())

    def __call__(self, x2d: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
        args = (x2d, kernel_packed, kernel_scales, group_size, bias)
        policy = dense_policy()
        if policy == "always":
            return self.dense(*args)
        if policy == "never" or x2d.shape[0] < DENSE_MIN_M:
            return self.kernel(*args)
        n, k = kernel_packed.shape[1] // 2, kernel_packed.shape[0] * 16
        return self._run(self.key(x2d, n, k, bias is not None), lambda: self.kernel(*args), lambda: self.dense(*args))

    def _run(self, key: tuple, kernel: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor]) -> torch.Tensor:
        choice = self._choices.get(key)
        if choice is not None:
            return dense() if choice == "dense" else kernel()
        if self.cannot_time():
            return kernel()
        t_kernel, y_kernel = self.timer(kernel, self.reps)
        try:
            t_dense, y_dense = self.timer(dense, self.reps)
        except torch.OutOfMemoryError:  # no room for the N x K transient: the fused kernel needs none
            t_dense, y_dense = float("inf"), None
        choice = "dense" if t_dense < (1 - self.margin) * t_kernel else "kernel"
        with self._lock:
            self._choices[key] = choice
            self._times[key] = {"kernel": t_kernel, "dense": t_dense}
        return y_dense if choice == "dense" else y_kernel

    def table(self) -> list[dict]:
        """The decisions so far, with the times (ms) they were made on: one row per key."""
        names = ("device", "dtype", "n", "k", "bias", "m_bucket")
        with self._lock:
            return [{**dict(zip(names, key, strict=True)), "choice": choice,
                     **{f"{path}_ms": ms for path, ms in self._times[key].items()}}
                    for key, choice in self._choices.items()]

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()
            self._times.clear()
