"""LSQ fake quantization: the Triton kernels against the reference, the reference against an
independent float64 autograd formulation and a hand-derived case, and the error contract."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.reference import lsq as ref
from grace_kernels.testing import assert_close_to_gold, make_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out, in, group_size): odd row counts crossed with input sizes and every group size dividing them.
IN_GROUPS = [(128, 32), (128, 64), (128, 128), (384, 32), (384, 64), (384, 128), (4096, 128), (4096, 256)]
SHAPES = [pytest.param(out, inp, gs, marks=[pytest.mark.slow] if out * inp > 2**19 else [])
          for out in (1, 3, 257) for inp, gs in IN_GROUPS]


def _inputs(out, inp, gs, dtype, bits=4, seed=0, device="cpu"):
    w = make_weight(out, inp, dtype=dtype, seed=seed, device=device)
    log_s = gk.lsq_init_log_scale(w, bits=bits, group_size=gs)
    # Move the scales off their init so some weights clip and some do not, per group.
    log_s = log_s + 0.3 * torch.randn(log_s.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return w, log_s


def lsq_oracle_f64(w, log_s, bits, gs, grad_scale):
    """Independent float64 formulation through autograd: STE round via detach, LSQ gradient
    scaling via the x*g + (x - x*g).detach() trick, clipping through clamp's own gradient."""
    qn, qp = ref.qrange(bits)
    w = w.detach().double().requires_grad_()
    ls0 = log_s.detach().double().requires_grad_()
    ls = ls0 * grad_scale + (ls0 - ls0 * grad_scale).detach()
    s = torch.exp(ls).unsqueeze(-1)
    v = w.view(w.shape[0], -1, gs) / s
    vc = v.clamp(-qn, qp)
    q = vc + (torch.round(vc) - vc).detach()
    out = (q * s).reshape(w.shape)
    return out, w, ls0


def _run(backend, w, log_s, dout, **kw):
    with gk.use_backend(backend):
        x = w.clone().requires_grad_()
        ls = log_s.clone().requires_grad_()
        y = gk.lsq_fake_quant(x, ls, **kw)
        y.backward(dout)
    return y.detach(), x.grad, ls.grad


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out,inp,gs", SHAPES)
def test_triton_matches_reference(out, inp, gs, dtype, device):
    w, log_s = _inputs(out, inp, gs, dtype, device=device)
    dout = torch.randn(out, inp, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    y_t, dw_t, dls_t = _run("triton", w, log_s, dout, group_size=gs)
    y_r, dw_r, dls_r = _run("reference", w, log_s, dout, group_size=gs)
    # Same float32 division, rounding and product, one cast: exact in every dtype.
    assert torch.equal(y_t, y_r)
    assert torch.equal(dw_t, dw_r)  # a mask of dout: exact
    # The scale gradient is a float32 sum over the group in another order: 2x the reference's own error.
    y_o, w_o, ls_o = lsq_oracle_f64(w, log_s, 4, gs, ref.default_grad_scale(gs, 4))
    y_o.backward(dout.double())
    assert_close_to_gold(dls_t, dls_r, ls_o.grad, atol=1e-6 * dls_r.abs().max().item(), name="d log_scale")


@pytest.mark.triton
@pytest.mark.parametrize("bits", range(2, 9))
def test_triton_matches_reference_all_bit_widths(bits, device):
    w, log_s = _inputs(9, 256, 64, torch.float32, bits=bits, device=device)
    dout = torch.randn(9, 256).to(device)
    y_t, dw_t, dls_t = _run("triton", w, log_s, dout, bits=bits, group_size=64)
    y_r, dw_r, dls_r = _run("reference", w, log_s, dout, bits=bits, group_size=64)
    assert torch.equal(y_t, y_r) and torch.equal(dw_t, dw_r)
    torch.testing.assert_close(dls_t, dls_r, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_ties_round_half_to_even(device):
    # v = w / s lands exactly on .5: RNE gives the even neighbour, for both backends.
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 6.5] * 4], device=device)
    log_s = torch.zeros(1, 1, device=device)
    expected = torch.tensor([[0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0, 6.0] * 4], device=device)
    for backend in ("triton", "reference"):
        with gk.use_backend(backend):
            assert torch.equal(gk.lsq_fake_quant(w, log_s, group_size=32), expected), backend


@pytest.mark.parametrize("bits,gs", [(4, 128), (2, 32), (8, 64), (3, 256)])
def test_reference_gradient_matches_float64_autograd_oracle(bits, gs):
    w, log_s = _inputs(6, 2 * gs, gs, torch.float32, bits=bits)
    w = w.double()
    dout = torch.randn(6, 2 * gs).double()  # representable in float32, the reference's precision
    g = ref.default_grad_scale(gs, bits)
    y_o, w_o, ls_o = lsq_oracle_f64(w, log_s, bits, gs, g)
    y_o.backward(dout)
    # The reference works in float32; compare in float32 precision.
    dw, dls = ref.lsq_fake_quant_backward_ref(dout.float(), w.float(), log_s, bits=bits, group_size=gs)
    torch.testing.assert_close(ref.lsq_fake_quant_ref(w.float(), log_s, bits=bits, group_size=gs).double(), y_o,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw.double(), w_o.grad, rtol=1e-12, atol=0)  # autograd's dout / s * s
    torch.testing.assert_close(dls.double(), ls_o.grad, rtol=1e-5, atol=1e-6)


def test_hand_derived_case():
    # bits=2: codes in [-2, 1]; s = 0.5; v = [0.6, -2.4, 10, 0.1] -> q = [1, -2, 1, 0];
    # inside = [T, F, F, T]; out = q * s; with dout = 1: dW = [1, 0, 0, 1],
    # sum = (1 - 0.6) + (-2) + 1 + (0 - 0.1) = -0.7; d log_s = g * s * sum = 1 * 0.5 * -0.7.
    w = torch.tensor([[0.3, -1.2, 5.0, 0.05] * 8])  # group 32 = 8 copies: the sum is 8x
    log_s = torch.log(torch.tensor([[0.5]]))
    for backend in ("reference", "triton"):
        y, dw, dls = _run(backend, w, log_s, torch.ones_like(w), bits=2, group_size=32, grad_scale=1.0)
        assert torch.equal(y, torch.tensor([[0.5, -1.0, 0.5, 0.0] * 8])), backend
        assert torch.equal(dw, torch.tensor([[1.0, 0.0, 0.0, 1.0] * 8])), backend
        torch.testing.assert_close(dls, torch.tensor([[0.5 * -0.7 * 8]]), rtol=1e-6, atol=1e-6)


def test_finite_difference_through_unrounded_path():
    # The STE differentiates out(s) = (q + (v(s) - v0)) * s with the integer q held fixed inside
    # the clipping range, and q * s outside it; a central difference of that float64 function
    # must match the reference's d log_s.
    gs, bits = 32, 4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, gs, dtype=torch.float64, generator=g) * 0.25
    log_s = torch.tensor([[-3.3]], dtype=torch.float64)
    dout = torch.randn(1, gs, dtype=torch.float64, generator=g)
    qn, qp = ref.qrange(bits)
    v0 = w / torch.exp(log_s)
    q = torch.round(v0.clamp(-qn, qp))
    inside = (v0 >= -qn) & (v0 <= qp)
    assert inside.any() and (~inside).any()  # both branches of the formula are exercised

    def f(ls):
        s = torch.exp(ls)
        return (torch.where(inside, q + (w / s - v0), q) * s * dout).sum()

    eps = 1e-6
    fd = (f(log_s + eps) - f(log_s - eps)) / (2 * eps)
    _, dls = ref.lsq_fake_quant_backward_ref(dout.float(), w.float(), log_s.float(), bits=bits, group_size=gs,
                                             grad_scale=1.0)
    torch.testing.assert_close(dls.double(), fd.reshape(1, 1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_codes_times_scales_is_fake_quant_bit_for_bit(dtype, scale_dtype):
    w, log_s = _inputs(5, 256, 128, dtype)
    for sd in (None, scale_dtype):
        codes, scales = gk.lsq_quantize(w, log_s, group_size=128, scale_dtype=sd)
        assert codes.dtype == torch.int8 and scales.dtype == (sd or torch.float32)
        assert codes.min() >= -8 and codes.max() <= 7
        deq = (codes.float() * scales.float().repeat_interleave(128, dim=1)).to(dtype)
        assert torch.equal(deq, gk.lsq_fake_quant(w, log_s, group_size=128, scale_dtype=sd))


@pytest.mark.triton
def test_scale_dtype_rounds_forward_and_passes_gradient_straight_through(device):
    w, log_s = _inputs(3, 128, 128, torch.float32, device=device)
    log_s = log_s + 0.0123  # a scale that bf16 cannot hold exactly
    for backend in ("triton", "reference"):
        y, _, dls = _run(backend, w, log_s, torch.ones_like(w), scale_dtype=torch.bfloat16)
        s_bf16 = torch.exp(log_s).to(torch.bfloat16).float()
        # Every output is an integer multiple of the bf16 scale.
        ratio = y / s_bf16
        assert torch.equal(ratio, torch.round(ratio)), backend
        assert not torch.equal(s_bf16, torch.exp(log_s))
        # Straight through: the gradient is g * s_float32 * sum(...) with v taken against s_bf16.
        v = w / s_bf16
        q = torch.round(v.clamp(-8, 7))
        inside = (v >= -8) & (v <= 7)
        expect = ref.default_grad_scale(128, 4) * torch.exp(log_s) * torch.where(inside, q - v, q).sum(-1, keepdim=True)
        torch.testing.assert_close(dls, expect, rtol=1e-5, atol=1e-6)


def test_init_percentile_matches_torch_quantile_and_handles_zero_groups():
    w = make_weight(4, 256, seed=3)
    w[1, 128:] = 0.0
    ls = gk.lsq_init_log_scale(w, group_size=128)
    assert ls.shape == (4, 2) and ls.dtype == torch.float32 and torch.isfinite(ls).all()
    expect = torch.quantile(w.abs().view(4, 2, 128), 0.99, dim=-1) / 7
    torch.testing.assert_close(torch.exp(ls), expect.clamp_min(ref.MIN_SCALE), rtol=1e-6, atol=0)
    assert torch.exp(ls[1, 1]).item() == pytest.approx(ref.MIN_SCALE)


def test_init_mse_beats_absmax_and_differs_from_percentile():
    w = make_weight(16, 256, seed=4)
    ls_mse = gk.lsq_init_log_scale(w, group_size=128, method="mse")
    ls_pct = gk.lsq_init_log_scale(w, group_size=128)
    ls_max = torch.log(w.abs().view(16, 2, 128).amax(-1) / 7)

    def err(ls):
        return (gk.lsq_fake_quant(w, ls, group_size=128) - w).pow(2).view(16, 2, 128).sum(-1)

    assert (err(ls_mse) <= err(ls_max) + 1e-9).all()
    assert err(ls_mse).sum() < err(ls_pct).sum()
    assert not torch.equal(ls_mse, ls_pct)


@pytest.mark.parametrize("call,exc,match", [
    (lambda w, s: gk.lsq_fake_quant(w.long(), s), TypeError, "weight must be a floating-point"),
    (lambda w, s: gk.lsq_fake_quant(w.double(), s), TypeError, "weight dtype"),
    (lambda w, s: gk.lsq_fake_quant(w[:, :100], s), ValueError, "not a multiple of group_size"),
    (lambda w, s: gk.lsq_fake_quant(w, s[:, :1]), ValueError, "log_scale must have shape"),
    (lambda w, s: gk.lsq_fake_quant(w, s.double()), TypeError, "log_scale must be a float32"),
    (lambda w, s: gk.lsq_fake_quant(w, s.to("meta")), ValueError, "log_scale is on meta"),
    (lambda w, s: gk.lsq_fake_quant(w, s, bits=9), ValueError, "bits must be"),
    (lambda w, s: gk.lsq_fake_quant(w, s, bits=1), ValueError, "bits must be"),
    (lambda w, s: gk.lsq_fake_quant(w, s, group_size=96), ValueError, "group_size must be one of"),
    (lambda w, s: gk.lsq_fake_quant(w[0], s), ValueError, "2-D"),
    (lambda w, s: gk.lsq_fake_quant(w, s, scale_dtype=torch.float32), ValueError, "scale_dtype"),
    (lambda w, s: gk.lsq_init_log_scale(w, method="minmax"), ValueError, "method"),
    (lambda w, s: gk.lsq_init_log_scale(w, percentile=1.5), ValueError, "percentile"),
    (lambda w, s: gk.lsq_quantize(w, s[:1]), ValueError, "log_scale must have shape"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_input_raises_naming_it(call, exc, match, backend):
    w = make_weight(4, 256)
    s = gk.lsq_init_log_scale(w)
    with gk.use_backend(backend), pytest.raises(exc, match=match):
        call(w, s)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad, backend):
    w = make_weight(4, 256)
    s = gk.lsq_init_log_scale(w)
    w[2, 7] = bad
    for fn in (lambda: gk.lsq_fake_quant(w, s), lambda: gk.lsq_init_log_scale(w), lambda: gk.lsq_quantize(w, s)):
        with gk.use_backend(backend), pytest.raises(ValueError, match="weight contains NaN or Inf"):
            fn()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 100.0, -100.0])
def test_log_scale_outside_the_float32_range_raises(backend, bad):
    # NaN used to give code 0 and a NaN scale, -inf a row of zeros: rejected where it enters.
    w = make_weight(4, 256)
    s = gk.lsq_init_log_scale(w)
    s[1, 1] = bad
    with gk.use_backend(backend):
        for fn in (lambda: gk.lsq_fake_quant(w, s), lambda: gk.lsq_quantize(w, s),
                   lambda: gk.lsq_fake_quant(w, s, scale_dtype=torch.bfloat16)):
            with pytest.raises(ValueError, match=r"log_scale must be finite and in \[-87, 88\]"):
                fn()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_log_scale_at_the_ends_of_the_range_stays_finite(backend):
    lo, hi = ref.LOG_SCALE_RANGE
    w = make_weight(2, 128)
    s = torch.tensor([[lo], [hi]])
    with gk.use_backend(backend):
        y = gk.lsq_fake_quant(w, s)
        codes, scales = gk.lsq_quantize(w, s)
    assert torch.isfinite(y).all() and torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(y[1], torch.zeros(128))        # a huge step: every weight rounds to 0
    assert set(codes[0].unique().tolist()) <= {-8, 7}  # a tiny step: every weight clips


@pytest.mark.parametrize("method", ["percentile", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_init_on_all_zero_groups_is_finite_and_keeps_them_zero(method, dtype):
    w = make_weight(3, 256, dtype=dtype, seed=5)
    w[0] = 0.0            # a whole row
    w[2, :128] = 0.0      # one group
    ls = gk.lsq_init_log_scale(w, group_size=128, method=method)
    assert torch.isfinite(ls).all()
    for zero in (ls[0, 0], ls[0, 1], ls[2, 0]):
        assert torch.exp(zero).item() == pytest.approx(ref.MIN_SCALE)
    assert torch.isfinite(ls[1]).all() and (torch.exp(ls[1]) > 1e-4).all()
    y = gk.lsq_fake_quant(w, ls, group_size=128)
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.equal(y[2, :128], torch.zeros(128, dtype=dtype))
    assert torch.isfinite(y).all()


def test_triton_launchers_refuse_mismatched_shapes():
    from grace_kernels.triton import lsq as tri

    w = make_weight(4, 256)
    with pytest.raises(ValueError, match="scales"):
        tri.lsq_fake_quant_fwd(w, torch.ones(3, 2), 4, 128)
    with pytest.raises(ValueError, match="grad_out"):
        tri.lsq_fake_quant_bwd(torch.ones(4, 128), w, torch.ones(4, 2), 4, 128)


def test_opcheck_schema_fake_and_autograd():
    w = make_weight(3, 256).requires_grad_()
    s = gk.lsq_init_log_scale(w.detach()).requires_grad_()
    torch.library.opcheck(torch.ops.grace_kernels.lsq_fake_quant.default, (w, s, 4, 128, 0.1, None))
    torch.library.opcheck(torch.ops.grace_kernels.lsq_fake_quant.default, (w, s, 4, 128, 0.1, torch.bfloat16))
    g = torch.randn(3, 256)
    torch.library.opcheck(torch.ops.grace_kernels.lsq_fake_quant_backward.default,
                          (g, w.detach(), s.detach(), 4, 128, 0.1, None))


def test_torch_compile_traces_through_fake_and_autograd():
    w = make_weight(3, 256).requires_grad_()
    s = gk.lsq_init_log_scale(w.detach()).requires_grad_()
    x = torch.randn(2, 256)

    def f(x, w, s):
        return (x @ gk.lsq_fake_quant(w, s).t()).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x, w, s)
    gw_c, gs_c = torch.autograd.grad(loss_c, (w, s))
    loss = f(x, w, s)
    gw, gs = torch.autograd.grad(loss, (w, s))
    assert torch.equal(loss_c, loss) and torch.equal(gw_c, gw) and torch.equal(gs_c, gs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out,inp", [(4096, 4096), (11008, 4096), (4096, 11008), (8960, 1536), (257, 1536)])
def test_gpu_full_shapes(out, inp, dtype):
    w, log_s = _inputs(out, inp, 128, dtype, device="cuda")
    dout = torch.randn(out, inp, device="cuda", dtype=dtype)
    y_t, dw_t, dls_t = _run("triton", w, log_s, dout)
    y_r, dw_r, dls_r = _run("reference", w, log_s, dout)
    assert torch.equal(y_t, y_r) and torch.equal(dw_t, dw_r)
    torch.testing.assert_close(dls_t, dls_r, rtol=1e-4, atol=1e-5)
