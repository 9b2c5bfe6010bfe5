"""KernelSpec: one concrete compilation of a ``@triton.jit`` kernel, declared beside the kernel.

Each ``grace_kernels.triton`` module lists its kernels' specs in ``AOT_SPECS``; the compile check
(``python -m grace_kernels.aot``) compiles every spec for each target architecture. The type lives here,
apart from both, so that the kernels do not import the checking tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class KernelSpec:
    """One concrete compilation of a ``@triton.jit`` kernel.

    ``signature`` maps every non-constexpr argument to a Triton type string ("*fp32", "*bf16",
    "i32", "fp32", ...); ``constexprs`` gives every constexpr argument a value. Use the block sizes
    the launcher really picks for the real model shapes (the largest ones are what can spill).
    """

    kernel: Callable
    signature: dict[str, str]
    constexprs: dict[str, object] = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return f"{fn.__name__}[{self.label}]" if self.label else fn.__name__
