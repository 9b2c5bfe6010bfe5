"""RCKA forward + backward: the one-launch Triton kernels vs the eager reference (a Python loop over
samples) vs torch.compile of that loop, for padded and ragged batches of visual tokens.

TFLOP/s counts the Gram work any dense implementation does: forward 2 n^2 (dS + dT) per sample for
the two Gram matrices, backward the same again plus 2 n^2 dS for 2 G Xc. "gram-only" times the two
batched Gram GEMMs alone (cuBLAS), the floor the issue compares the kernel with. On a CPU machine
only the eager/compiled references run, at small sizes.
"""

import pytest
import torch
from harness import QUICK, Report, device, device_name, hardware_limits, time_ms

import grace_kernels as gk

ON_GPU = torch.cuda.is_available()
if ON_GPU:
    GRID = [(b, n, ragged, ds, dt) for b in ((1, 32) if QUICK else (1, 8, 32))
            for n, ragged in ((576, False), (1024, True)) for ds, dt in ((4096, 5120), (1536, 3584))]
    BACKENDS = ["triton", "reference", "compiled-reference", "gram-only"]
else:
    GRID = [(4, 64, False, 128, 256), (4, 96, True, 128, 256)]
    BACKENDS = ["reference", "compiled-reference"]


def _batch(b, n, ragged, ds, dt, dev):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(n // 2, n + 1, (b,), generator=g) if ragged else torch.full((b,), n)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(dev)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    xs = torch.randn(int(lens.sum()), ds, generator=g).to(dev, dtype)
    xt = torch.randn(int(lens.sum()), dt, generator=g).to(dev, dtype)
    return xs, xt, cu, lens


@pytest.fixture(scope="module")
def report():
    r = Report("rcka_loss")
    yield r
    r.finish()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,n,ragged,ds,dt", GRID)
def test_rcka_fwd_bwd(b, n, ragged, ds, dt, backend, report):
    dev = device()
    xs, xt, cu, lens = _batch(b, n, ragged, ds, dt, dev)
    if backend == "gram-only":
        pad = torch.zeros(b, int(lens.max()), ds, device=dev, dtype=xs.dtype)
        pad_t = torch.zeros(b, int(lens.max()), dt, device=dev, dtype=xs.dtype)
        fn = lambda: (torch.bmm(pad, pad.transpose(1, 2)), torch.bmm(pad_t, pad_t.transpose(1, 2)))  # noqa: E731
    else:
        from grace_kernels.reference.cka import rcka_loss_ref

        loss_fn = torch.compile(rcka_loss_ref) if backend == "compiled-reference" else None

        def fn():
            x = xs.detach().requires_grad_()
            if loss_fn is not None:
                loss = loss_fn(x, xt, cu_seqlens=cu)
            else:
                with gk.use_backend(backend):
                    loss = gk.rcka_loss(x, xt, cu_seqlens=cu)
            loss.backward()

    ms = time_ms(fn, warmup=2, reps=5 if ON_GPU else 2)
    n2 = float((lens.double() ** 2).sum())
    flops = n2 * (2 * 2 * (ds + dt) + 2 * ds) if backend != "gram-only" else n2 * 2 * (ds + dt)
    _, peak_tflops = hardware_limits()
    tflops = flops / (ms / 1e3) / 1e12
    report.add(b=b, n=n, ragged=ragged, ds=ds, dt=dt, backend=backend, ms=ms, tflops=tflops,
               pct_peak_bf16=(100 * tflops / peak_tflops) if peak_tflops else None, device=device_name())
