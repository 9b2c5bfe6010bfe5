"""fused_linear_grace_loss vs the eager composition (both LM-head GEMMs, full float32 logits, gated
DKD and cross-entropy through autograd): peak extra memory and time of forward + backward.

"Extra" memory is what the loss needs beyond its inputs and the parameter gradients: the peak during
forward + backward, minus what was resident before, minus the bytes of the gradients of the
student's hidden states and LM head (which every implementation must produce; .grad starts as None,
as after optimizer.zero_grad()).
* CPU (what CI has): each variant runs in its own subprocess; the peak is the process's resident
  high-water mark (VmHWM, reset through /proc/self/clear_refs). Shape: N = 2048, V = 151936,
  H = 1536, float32 (the issue's CPU case).
* GPU: torch.cuda.max_memory_allocated over the call, for N in {1024, 4096, 8192, 16384},
  V in {32000, 151936}, H in {1536, 3584, 4096}, bf16; plus Liger-Kernel's LigerFusedLinearJSDLoss
  on the same shapes where liger-kernel is installed (skipped otherwise).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import QUICK, Report, device_name, time_ms

import grace_kernels as gk
from grace_kernels.reference.fused_linear_grace_loss import fused_linear_grace_loss_ref

ON_GPU = torch.cuda.is_available()

_CPU_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    import grace_kernels as gk
    from grace_kernels.reference.fused_linear_grace_loss import fused_linear_grace_loss_ref

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    variant, n, v, h = sys.argv[1], *map(int, sys.argv[2:5])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xs = torch.randn(n, h).requires_grad_()
    ws = (torch.randn(v, h) * 0.02).requires_grad_()
    xt, wt = torch.randn(n, h), torch.randn(v, h) * 0.02
    tgt = torch.randint(0, v, (n,))
    grad_bytes = (xs.numel() + ws.numel()) * 4                      # parameter gradients: not "extra"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                  # reset VmHWM to the current RSS
    base = rss("VmRSS:")
    t0 = time.perf_counter()
    fn = gk.fused_linear_grace_loss if variant == "fused" else fused_linear_grace_loss_ref
    with gk.use_backend("reference"):
        out = fn(xs, ws, xt, wt, tgt)
        out[0].backward()
    print(json.dumps({"variant": variant, "extra_bytes": rss("VmHWM:") - base - grad_bytes,
                      "seconds": time.perf_counter() - t0,
                      "loss": float(out[0])}))
""")


def _cpu_run(variant: str, n: int, v: int, h: int) -> dict:
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CPU_CHILD, variant, str(n), str(v), str(h)], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(ON_GPU, reason="the CPU memory case; GPUs run test_gpu_memory_and_time")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the RSS peak")
def test_cpu_peak_extra_memory_is_at_most_an_eighth_of_eager():
    n, v, h = 2048, 151936, 1536
    fused, eager = _cpu_run("fused", n, v, h), _cpu_run("eager", n, v, h)
    ratio = fused["extra_bytes"] / eager["extra_bytes"]
    report = Report("fused_linear_grace_loss_memory")
    for r in (fused, eager):
        report.add(device=device_name(), n=n, v=v, h=h, variant=r["variant"], extra_gib=r["extra_bytes"] / 2 ** 30,
                   seconds=r["seconds"], loss=r["loss"])
    report.add(device=device_name(), n=n, v=v, h=h, variant="fused/eager", extra_gib=ratio)
    report.finish()
    assert abs(fused["loss"] - eager["loss"]) <= 1e-4 * abs(eager["loss"])
    assert ratio <= 1 / 8, f"fused uses {ratio:.3f} of eager's extra memory"


GPU_GRID = ([(n, v, h) for n in (4096, 16384) for v, h in ((32000, 4096), (151936, 1536))] if QUICK else
            [(n, v, h) for n in (1024, 4096, 8192, 16384) for v in (32000, 151936) for h in (1536, 3584, 4096)])


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,v,h", GPU_GRID)
@pytest.mark.parametrize("variant", ["fused", "eager", "liger-jsd"])
def test_gpu_memory_and_time(n, v, h, variant):
    dev = "cuda"
    xs = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ws = (torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    xt = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    wt = torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02
    tgt = torch.randint(0, v, (n,), device=dev)
    if variant == "liger-jsd":
        liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
        loss_mod = liger.LigerFusedLinearJSDLoss()
        call = lambda: loss_mod(xs, ws, xt, wt, tgt)  # noqa: E731
    else:
        fn = gk.fused_linear_grace_loss if variant == "fused" else fused_linear_grace_loss_ref
        call = lambda: fn(xs, ws, xt, wt, tgt)[0]  # noqa: E731

    def step():
        xs.grad = ws.grad = None
        call().backward()

    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - (xs.numel() + ws.numel()) * xs.element_size()
        ms = time_ms(step, warmup=1, reps=3)
    except torch.OutOfMemoryError:
        extra, ms = float("nan"), float("nan")
    report = Report(f"fused_linear_grace_loss-{variant}-n{n}-v{v}-h{h}")
    report.add(device=device_name(), n=n, v=v, h=h, variant=variant, extra_gib=extra / 2 ** 30, ms=ms)
    report.finish()
