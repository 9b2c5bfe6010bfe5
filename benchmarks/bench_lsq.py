"""LSQ fake-quant forward + backward: fused Triton kernels vs the eager reference vs torch.compile.

Bytes moved per forward+backward, the minimum any implementation must move: read W and write the
fake-quantized W (forward), read dout and W and write dW (backward); the scales are negligible.
GB/s is that over the measured time, and "% peak" compares it with the device's DRAM bandwidth.
On a CPU machine this runs small shapes of the CPU paths (reference eager and compiled), since
Triton only runs there under its interpreter, which is a correctness tool, not something to time.
"""

import pytest
import torch
from harness import Report, device, device_name, hardware_limits, time_ms
from shapes import CPU_LINEAR_SHAPES, LINEAR_SHAPES

import grace_kernels as gk
from grace_kernels.reference import lsq as ref
from grace_kernels.testing import make_weight

ON_GPU = torch.cuda.is_available()
SHAPES = LINEAR_SHAPES if ON_GPU else CPU_LINEAR_SHAPES
BACKENDS = ["triton", "reference", "compiled-reference"] if ON_GPU else ["reference", "compiled-reference"]
BITS, GROUP = 4, 128


def _step_fn(backend, w, log_s, dout):
    def step():
        x = w.detach().requires_grad_()
        s = log_s.detach().requires_grad_()
        y = gk.lsq_fake_quant(x, s, bits=BITS, group_size=GROUP)
        torch.autograd.grad(y, (x, s), dout)

    if backend != "compiled-reference":
        return step

    # torch.compile of the same math with autograd deriving the same STE gradients: round through
    # detach, LSQ's gradient scale through the s*g + (s - s*g).detach() trick.
    qn, qp = ref.qrange(BITS)
    g = ref.default_grad_scale(GROUP, BITS)

    def fwd(x, s):
        sc = torch.exp(s * g + (s - s * g).detach()).unsqueeze(-1)
        v = x.float().view(x.shape[0], -1, GROUP) / sc
        vc = v.clamp(-qn, qp)
        q = vc + (torch.round(vc) - vc).detach()
        return (q * sc).view_as(x).to(x.dtype)

    cfwd = torch.compile(fwd)

    def cstep():
        x = w.detach().requires_grad_()
        s = log_s.detach().requires_grad_()
        torch.autograd.grad(cfwd(x, s), (x, s), dout)

    return cstep


@pytest.fixture(scope="module")
def report():
    r = Report("lsq_fake_quant")
    yield r
    # Speed-up over the eager reference measured in this same run, per shape.
    eager = {row["shape"]: row["ms"] for row in r.rows if row["backend"] == "reference"}
    for row in r.rows:
        row["x_vs_eager"] = eager[row["shape"]] / row["ms"] if row["shape"] in eager else None
    r.finish()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,out,inp", SHAPES)
def test_lsq_fwd_bwd(name, out, inp, backend, report, benchmark):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    dev = device()
    w = make_weight(out, inp, dtype=dtype, device=dev)
    log_s = gk.lsq_init_log_scale(w, bits=BITS, group_size=GROUP)
    dout = torch.randn_like(w)
    ctx = gk.use_backend("reference" if backend != "triton" else "triton")
    with ctx:
        fn = _step_fn(backend, w, log_s, dout)
        ms = time_ms(fn, warmup=3, reps=20 if ON_GPU else 10)
        benchmark.pedantic(fn, rounds=3, iterations=1)
    gbytes = 5 * w.numel() * w.element_size() / 1e9
    peak_gbs, _ = hardware_limits()
    gbs = gbytes / (ms / 1e3)
    report.add(shape=name, out=out, inp=inp, dtype=str(dtype).removeprefix("torch."), backend=backend, ms=ms,
               gb_per_s=gbs, pct_peak=(100 * gbs / peak_gbs) if peak_gbs else None, device=device_name())
