"""Gated DKD on given logits: kernels vs reference vs a float64 oracle, identities, extremes, errors."""

import math

import pytest
import torch

import grace_kernels as gk
from grace_kernels.reference.gated_dkd import gated_dkd_loss_ref
from grace_kernels.testing import assert_close_to_gold


def _logits(n, vs, vt, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, vt, generator=g) * scale
    zs = 0.6 * zt[:, :vs] + torch.randn(n, vs, generator=g) * scale if vs <= vt else torch.randn(n, vs, generator=g)
    tgt = torch.randint(0, min(vs, vt), (n,), generator=g)
    tgt[1] = -100
    return zs, zt, tgt


def _run(backend, zs, zt, tgt, **kw):
    with gk.use_backend(backend):
        x = zs.clone().requires_grad_()
        out = gk.gated_dkd_loss(x, zt, tgt, **kw)
        out.loss.backward()
    return out, x.grad


def _oracle(zs, zt, tgt, **kw):
    x = zs.double().requires_grad_()
    out = gated_dkd_loss_ref(x, zt.double(), tgt, **kw)
    out[0].backward()
    return out, x.grad


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vs,vt", [(7, 37, 37), (5, 1031, 1029), (4, 32000, 32000)])
@pytest.mark.parametrize("kw", [{}, {"gate": False}, {"kd_type": "kl"}, {"temperature": 1.0, "gate_temperature": 2.0}])
def test_kernels_match_reference_and_oracle(n, vs, vt, dtype, kw):
    if vs == 32000 and (dtype != torch.float32 or kw):
        pytest.skip("one full-vocabulary case (float32, default keywords) keeps the interpreter run short")
    zs, zt, tgt = _logits(n, vs, vt)
    zs, zt = zs.to(dtype), zt.to(dtype)
    out_t, g_t = _run("triton", zs, zt, tgt, **kw)
    out_r, g_r = _run("reference", zs, zt, tgt, **kw)
    out_o, g_o = _oracle(zs, zt, tgt, **kw)
    assert out_t.loss.dtype == torch.float32 and g_t.dtype == dtype
    for name, a, b, c in zip(("loss", "tckd", "nckd", "teacher_entropy", "gate_mean", "gate_sum", "num_valid"),
                             out_t, out_r, out_o, strict=True):
        assert_close_to_gold(a.reshape(1), b.reshape(1), c.reshape(1), atol=2e-6 * max(1.0, abs(float(c))), name=name)
    atol = 1e-7 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * g_o.abs().max().item()
    assert_close_to_gold(g_t.float(), g_r.float(), g_o, atol=atol, name="grad")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_identities(backend):
    zs, zt, tgt = _logits(9, 50, 50, seed=2)
    t = 2.0
    with gk.use_backend(backend):
        w = 3.0
        same_w = gk.gated_dkd_loss(zs, zt, tgt, gate=False, tckd_weight=w, nckd_weight=w)
        torch.testing.assert_close(same_w.loss, w * t * t * (same_w.tckd + same_w.nckd), rtol=1e-5, atol=1e-6)
        # KL(p_T || p_S) = TCKD + (1 - p_T(y)) NCKD, per token.
        for i in (0, 2, 5):
            one = (zs[i:i + 1], zt[i:i + 1], tgt[i:i + 1])
            dkd = gk.gated_dkd_loss(*one, gate=False)
            kl = gk.gated_dkd_loss(*one, gate=False, kd_type="kl")
            pt_y = torch.softmax(zt[i] / t, -1)[tgt[i]]
            torch.testing.assert_close(kl.loss / t ** 2, dkd.tckd + (1 - pt_y) * dkd.nckd, rtol=1e-5, atol=1e-6)
        # The gate is exp(-H / log V): a uniform teacher has gate exp(-1), a one-hot teacher ~1.
        uni = gk.gated_dkd_loss(zs[:2], torch.zeros(2, 50), torch.tensor([3, 4]))
        torch.testing.assert_close(uni.gate_mean, torch.tensor(math.exp(-1.0)), rtol=1e-5, atol=0)
        torch.testing.assert_close(uni.teacher_entropy, torch.tensor(math.log(50)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gate_weights_confident_tokens(backend):
    zs, zt, tgt = _logits(2, 40, 40, seed=4)
    zt[0] = 0.0
    zt[0, tgt[0]] = 30.0   # confident teacher on token 0
    zt[1] = 0.01 * zt[1]   # nearly uniform teacher on token 1
    tgt[1] = 5
    with gk.use_backend(backend):
        gated = gk.gated_dkd_loss(zs, zt, tgt)
        per = [gk.gated_dkd_loss(zs[i:i + 1], zt[i:i + 1], tgt[i:i + 1], gate=False).loss for i in (0, 1)]
    g0, g1 = (torch.exp(-torch.special.entr(torch.softmax(zt[i], -1)).sum() / math.log(40)) for i in (0, 1))
    torch.testing.assert_close(gated.loss, (g0 * per[0] + g1 * per[1]) / (g0 + g1), rtol=1e-5, atol=1e-6)
    assert g0 > 0.9 and g1 < 0.4


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_all_ignored_gives_zero_and_zero_grad(backend):
    zs, zt, _ = _logits(4, 30, 30)
    out, grad = _run(backend, zs, zt, torch.full((4,), -100))
    assert out.loss.item() == 0.0 and out.num_valid.item() == 0 and out.gate_sum.item() == 0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_extreme_logits_stay_finite_and_accurate(backend):
    # p_T(y) -> 1, p_S(y) -> 0, magnitudes 100+: the naive 1 - p(y) would be 0 and its log -inf.
    zs = torch.zeros(3, 64)
    zt = torch.zeros(3, 64)
    tgt = torch.tensor([1, 2, 3])
    zt[0, 1], zs[0, 1] = 200.0, -150.0
    zt[1, 2], zs[1, 5] = 120.0, 130.0
    zs[2] = torch.linspace(-300, 300, 64)
    zt[2] = torch.linspace(300, -300, 64)
    out, grad = _run(backend, zs, zt, tgt, temperature=1.0)
    gold, g_gold = _oracle(zs, zt, tgt, temperature=1.0)
    x = zs.clone().requires_grad_()
    eager32 = gated_dkd_loss_ref(x, zt, tgt, temperature=1.0)  # the same math in float32, eagerly
    eager32[0].backward()
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    # Logits of +-300 leave float32 about 1e-5 relative: measure against what eager float32 achieves.
    assert_close_to_gold(out.loss.reshape(1), eager32[0].detach().reshape(1), gold[0].detach().reshape(1),
                         atol=1e-6 * abs(float(gold[0])), name="loss")
    assert_close_to_gold(grad, x.grad, g_gold, atol=1e-7, name="grad")


def test_vocab_padding_never_enters_the_softmax():
    zs, zt, tgt = _logits(6, 40, 40)
    base = gk.gated_dkd_loss(zs, zt, tgt)
    padded_t = torch.cat([zt, torch.full((6, 9), 50.0)], 1)      # teacher padding rows (Vt > Vs)
    padded_s = torch.cat([zs, torch.full((6, 3), -7.0)], 1)      # student padding (Vs > Vt)
    for out in (gk.gated_dkd_loss(zs, padded_t, tgt), gk.gated_dkd_loss(padded_s, zt, tgt)):
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-7)
    x = padded_s.clone().requires_grad_()
    gk.gated_dkd_loss(x, zt, tgt).loss.backward()
    assert torch.equal(x.grad[:, 40:], torch.zeros(6, 3))


def test_teacher_gets_no_gradient_and_opcheck():
    zs, zt, tgt = _logits(5, 20, 20)
    t = zt.clone().requires_grad_()
    gk.gated_dkd_loss(zs.clone().requires_grad_(), t, tgt).loss.backward()
    assert t.grad is None
    with gk.use_backend("reference"):
        torch.library.opcheck(torch.ops.grace_kernels.gated_dkd_loss.default,
                              (zs.requires_grad_(), zt, tgt, 2.0, 1.0, 4.0, True, 1.0, "dkd", -100, True),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda s, t, y: gk.gated_dkd_loss(s, t[:3], y), ValueError, "teacher_logits"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y[:3]), ValueError, "target has 3 tokens"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y.float()), TypeError, "target must be an integer"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y > 3), TypeError, "target must be an integer"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, torch.full_like(y, 20)), ValueError, r"target values .* \[0, 20\)"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, torch.full_like(y, -3)), ValueError, "target values .*ignore_index"),
    (lambda s, t, y: gk.gated_dkd_loss(s[:0], t[:0], y[:0]), ValueError, "N = 0"),
    (lambda s, t, y: gk.gated_dkd_loss(s.long(), t, y), TypeError, "student_logits must be a floating-point"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t.int(), y), TypeError, "teacher_logits must be a floating-point"),
    (lambda s, t, y: gk.gated_dkd_loss(s[0], t, y), ValueError, "student_logits must be 2-D"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, kd_type="js"), ValueError, "kd_type"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, temperature=0.0), ValueError, "temperature must be"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, temperature=float("nan")), ValueError, "temperature must be"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, temperature=float("inf")), ValueError, "temperature must be"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, gate_temperature=float("nan")), ValueError, "gate_temperature"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, nckd_weight=float("nan")), ValueError, "nckd_weight"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y, tckd_weight=float("inf")), ValueError, "tckd_weight"),
    (lambda s, t, y: gk.gated_dkd_loss(s[:, :1], t[:, :1], y * 0), ValueError, "at least 2"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t.to("meta"), y), ValueError, "teacher_logits is on meta"),
    (lambda s, t, y: gk.gated_dkd_loss(s, t, y.to("meta")), ValueError, "target is on meta"),
])
def test_bad_input_raises_naming_the_argument(backend, call, exc, match):
    zs, zt, tgt = _logits(5, 20, 20)
    with gk.use_backend(backend), pytest.raises(exc, match=match):
        call(zs, zt, tgt)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_target_must_lie_in_the_common_vocabulary(backend):
    # A student vocabulary larger than the teacher's: past Vt there is no teacher logit to read.
    zs, zt, tgt = _logits(5, 30, 30)
    zs_wide = torch.cat([zs, torch.randn(5, 8)], 1)
    with gk.use_backend(backend):
        bad = tgt.clone()
        bad[3] = 33
        with pytest.raises(ValueError, match=r"target values must be in \[0, 30\) \(the common vocabulary"):
            gk.gated_dkd_loss(zs_wide, zt, bad)
        bad[3] = 30
        with pytest.raises(ValueError, match="target"):
            gk.gated_dkd_loss(zs_wide, zt, bad)
        # ignore_index stays valid, and so do targets just below Vt.
        ok = tgt.clone()
        ok[3] = 29
        assert ok[1] == -100
        assert torch.isfinite(gk.gated_dkd_loss(zs_wide, zt, ok).loss)


def test_triton_target_load_is_masked():
    # Past the wrapper (the kernel called directly), a target beyond the teacher's vocabulary
    # reads the masked value NaN, never memory after the row.
    from grace_kernels._kd_layout import Row
    from grace_kernels.triton import gated_dkd as tri

    zs, zt, tgt = _logits(3, 48, 40)
    tgt = torch.tensor([5, 44, 47])
    rows = tri.kd_rows(zs, zt, tgt, vc=40, temperature=2.0, gate_temperature=1.0, ignore_index=-100)
    assert torch.isfinite(rows[0]).all()
    for i in (1, 2):
        assert torch.isnan(rows[i, Row.TCKD]) and torch.isnan(rows[i, Row.KL])
        assert torch.isfinite(rows[i, Row.CE])  # the student row is Vs = 48 wide: its load is in bounds


def _padded(z, p):
    return torch.cat([z, torch.full((z.shape[0], p), float("-inf"))], 1)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kw", [{}, {"kd_type": "kl"}, {"gate": False}, {"temperature": 1.0, "gate_temperature": 3.0}])
def test_minus_inf_vocabulary_padding_equals_the_unpadded_loss(backend, kw):
    zs, zt, tgt = _logits(7, 40, 40, seed=6)
    out, grad = _run(backend, zs, zt, tgt, **kw)
    out_p, grad_p = _run(backend, _padded(zs, 9), _padded(zt, 9), tgt, **kw)
    for name, a, b in zip(out._fields, out, out_p, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(grad_p[:, :40], grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(grad_p[:, 40:], torch.zeros(7, 9))
    # Teacher padded, student not (Vs < Vt): the padding is never read.
    out_t, grad_t = _run(backend, zs, _padded(zt, 9), tgt, **kw)
    torch.testing.assert_close(out_t.loss, out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_t, grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kd_type", ["dkd", "kl"])
def test_minus_inf_teacher_logits_are_probability_zero(backend, kd_type):
    zs, zt, tgt = _logits(6, 50, 50, seed=7)
    g = torch.Generator().manual_seed(8)
    zt[torch.rand(zt.shape, generator=g) < 0.3] = float("-inf")   # holes anywhere
    zt[0] = float("-inf")
    zt[0, tgt[0]] = 1.5                                           # one-hot teacher: NCKD 0, gate 1
    zt[2, tgt[2]] = float("-inf")                                  # p_T(y) = 0
    out, grad = _run(backend, zs, zt, tgt, kd_type=kd_type)
    gold, g_gold = _oracle(zs, zt, tgt, kd_type=kd_type)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    for name, a, c in zip(out._fields, out, gold, strict=True):
        torch.testing.assert_close(a.double(), c.double(), rtol=2e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(grad.double(), g_gold, rtol=1e-4, atol=1e-6)
    one_hot = _run(backend, zs[:1], zt[:1], tgt[:1], kd_type=kd_type)[0]
    assert one_hot.gate_mean.item() == 1.0 and one_hot.teacher_entropy.item() == 0.0
    if kd_type == "dkd":
        assert one_hot.nckd.item() == 0.0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("row", [0, 1])   # row 1 is ignored: it still poisons the loss, never silently
def test_nan_and_plus_inf_logits_propagate_to_the_loss(backend, which, value, row):
    zs, zt, tgt = _logits(5, 30, 30, seed=9)
    assert tgt[1] == -100
    (zs if which == "student" else zt)[row, 7] = value
    with gk.use_backend(backend):
        for gate in (True, False):
            assert not torch.isfinite(gk.gated_dkd_loss(zs, zt, tgt, gate=gate).loss), gate


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_minus_inf_student_logit_where_the_teacher_has_mass_gives_infinite_loss(backend):
    zs, zt, tgt = _logits(4, 30, 30, seed=10)
    zs[0, (tgt[0] + 1) % 30] = float("-inf")
    with gk.use_backend(backend):
        assert gk.gated_dkd_loss(zs, zt, tgt).loss.item() == float("inf")


def test_triton_launchers_refuse_inconsistent_chunks():
    from grace_kernels.triton import gated_dkd as tri

    zs, zt, tgt = _logits(4, 30, 30)
    kw = {"temperature": 2.0, "gate_temperature": 1.0, "ignore_index": -100}
    with pytest.raises(ValueError, match="inconsistent chunk"):
        tri.kd_rows(zs, zt, tgt[:3], vc=30, **kw)
    with pytest.raises(ValueError, match="inconsistent chunk"):
        tri.kd_rows(zs, zt[:, :20], tgt, vc=30, **kw)
    rows = tri.kd_rows(zs, zt, tgt, vc=30, **kw)
    with pytest.raises(ValueError, match="per-row input"):
        tri.kd_rows_grad(zs, zt, tgt, rows, torch.ones(3), torch.ones(4), vc=30, temperature=2.0, tckd_weight=1.0,
                         nckd_weight=4.0, kd_type="dkd", ignore_index=-100)
