"""The ops' input rules hold the same under torch.compile as in eager mode (the value checks run inside the ops'
implementations, which compiled graphs call with real tensors), and every dtype an op's checks accept either
works (a finite result) or is refused by those checks, never by torch deep inside."""

import pytest
import torch

import grace_kernels as gk


def _dkd(s, t, y):
    return gk.gated_dkd_loss(s, t, y).loss


def _fused(h, w, y):
    return gk.fused_linear_grace_loss(h, w, h, w, y).loss


def _fused_logits(h, w, y):
    return gk.fused_linear_grace_loss(h, w, teacher_logits=torch.zeros(h.shape[0], 12), target=y).loss


def _lsq(w, log_scale):
    return gk.lsq_fake_quant(w, log_scale)


def _rcka(x, y, cu):
    return gk.rcka_loss(x, y, cu_seqlens=cu)


def _nan_weight():
    w = torch.randn(8, 128)
    w[3, 5] = float("nan")
    return w


CASES = {
    "gated_dkd target past the vocabulary": (_dkd, lambda: (torch.randn(4, 10), torch.randn(4, 10),
                                                           torch.tensor([1, 2, 3, 12])), "target values must be in"),
    "gated_dkd negative target": (_dkd, lambda: (torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, -3, 0, 2])),
                                  "target values must be in"),
    "fused target past the vocabulary": (_fused, lambda: (torch.randn(4, 16), torch.randn(10, 16),
                                                          torch.tensor([0, 10, 1, 2])), "target values must be in"),
    # teacher_logits [N, 12] on a 10-row student head: the common vocabulary is the student's
    "fused teacher logits, target past the common vocabulary": (
        _fused_logits, lambda: (torch.randn(4, 16), torch.randn(10, 16), torch.tensor([0, 11, 1, 2])),
        "target values must be in"),
    "lsq NaN weight": (_lsq, lambda: (_nan_weight(), torch.zeros(8, 1)), "weight contains NaN or Inf"),
    "lsq log-scale out of range": (_lsq, lambda: (torch.randn(8, 128), torch.full((8, 1), 100.0)),
                                   "log_scale must be finite"),
    "lsq NaN log-scale": (_lsq, lambda: (torch.randn(8, 128), torch.full((8, 1), float("nan"))),
                          "log_scale must be finite"),
    "rcka decreasing cu_seqlens": (_rcka, lambda: (torch.randn(6, 8), torch.randn(6, 8), torch.tensor([0, 4, 3, 6])),
                                   "cu_seqlens must start at 0"),
    "rcka cu_seqlens short of the tokens": (_rcka, lambda: (torch.randn(6, 8), torch.randn(6, 8),
                                                            torch.tensor([0, 2, 5])), "cu_seqlens"),
}


@pytest.mark.usefixtures("reference_backend")   # the checks do not depend on the backend; the compile is quicker
@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_are_refused_the_same_in_eager_and_under_torch_compile(case):
    fn, make, says = CASES[case]
    with pytest.raises(ValueError, match=says):
        fn(*make())
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager")   # dynamo + AOT tracing with fake tensors, as inductor
    with pytest.raises(ValueError, match=says):
        compiled(*make())


@pytest.mark.usefixtures("reference_backend")
def test_good_values_under_torch_compile_match_eager():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.tensor([0, 3, 9, -100, 2])
    w, log_scale = torch.randn(8, 128), torch.full((8, 1), -3.0)
    for fn, args in ((_dkd, (s, t, y)), (_lsq, (w, log_scale))):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(*args), fn(*args), rtol=0, atol=0)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _sweep(dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    y = torch.randint(0, 16, (6,), generator=g)
    w = r(8, 128)
    return {
        "gated_dkd_loss": lambda: gk.gated_dkd_loss(r(6, 16).requires_grad_(), r(6, 16), y).loss,
        "fused_linear_grace_loss": lambda: gk.fused_linear_grace_loss(r(6, 32), r(16, 32), r(6, 32), r(16, 32), y).loss,
        "lsq_fake_quant": lambda: gk.lsq_fake_quant(w, gk.lsq_init_log_scale(w.float())),
        "rcka_loss": lambda: gk.rcka_loss(r(2, 5, 8), r(2, 5, 8)),
        "w4a16_matmul": lambda: gk.w4a16_matmul(r(3, 128), gk.quantize_rtn(torch.randn(64, 128, generator=g))),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_works_or_is_refused_by_the_ops_checks(dtype, backend):
    outcomes = {}
    with gk.use_backend(backend):
        for name, call in _sweep(dtype).items():
            try:
                out = call()
            except (TypeError, ValueError) as e:   # the checks' own refusals name the argument
                assert "dtype" in str(e) or "must" in str(e), (name, str(e))
                outcomes[name] = "refused"
                continue
            assert torch.isfinite(out).all(), f"{name} on {dtype} ({backend}): not finite"
            outcomes[name] = "ok"
    # what is refused is refused on purpose: LSQ trains float32/float16/bfloat16 weights only
    assert {k for k, v in outcomes.items() if v == "refused"} == ({"lsq_fake_quant"} if dtype == torch.float64
                                                                  else set()), outcomes
