"""Relational CKA: kernels vs the reference vs a float64 oracle, properties, degenerate samples, errors."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.reference import cka as ref
from grace_kernels.testing import assert_close_to_gold


def _related(n_total, ds, dt, seed=0, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_total, ds, generator=g)
    xt = xs @ torch.randn(ds, dt, generator=g) / ds ** 0.5 + noise * torch.randn(n_total, dt, generator=g)
    return xs, xt


def _run(backend, xs, xt, cu=None):
    with gk.use_backend(backend):
        x = xs.clone().requires_grad_()
        vals = gk.cka(x, xt, cu_seqlens=cu)
        (vals * torch.arange(1, vals.numel() + 1, device=vals.device)).sum().backward()  # distinct weights per sample
    return vals.detach(), x.grad


def _oracle(xs, xt, cu=None):
    x = xs.detach().double().requires_grad_()
    vals = ref.cka_ref(x, xt.double(), cu_seqlens=cu)
    (vals * torch.arange(1, vals.numel() + 1, device=vals.device)).sum().backward()
    return vals.detach(), x.grad


CASES = [  # (cu_seqlens or padded shape, dS, dT)
    ([0, 5, 5, 75, 76, 146], 48, 80),   # ragged: an empty and a single-token sample, tiles across 64
    ([0, 37, 100], 16, 16),
    ((3, 20), 40, 24),                   # padded [B, n, d]
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout,ds,dt", CASES)
def test_triton_matches_reference_and_oracle(layout, ds, dt, dtype):
    if isinstance(layout, tuple):
        b, n = layout
        xs, xt = _related(b * n, ds, dt)
        xs, xt, cu = xs.view(b, n, ds), xt.view(b, n, dt), None
    else:
        cu = torch.tensor(layout, dtype=torch.int32)
        xs, xt = _related(layout[-1], ds, dt)
    xs, xt = xs.to(dtype), xt.to(dtype)
    v_t, g_t = _run("triton", xs, xt, cu)
    v_r, g_r = _run("reference", xs, xt, cu)
    v_o, g_o = _oracle(xs, xt, cu)
    assert v_t.dtype == torch.float32 and g_t.dtype == dtype
    # Inputs are rounded once to dtype; both implementations then compute in float32.
    assert_close_to_gold(v_t, v_r, v_o, atol=1e-6, name="cka")
    atol = 1e-6 if dtype == torch.float32 else 2e-3 * g_o.abs().max().item()
    assert_close_to_gold(g_t.float(), g_r.float(), g_o, atol=atol, name="grad")


def test_reference_gradcheck_float64():
    xs, xt = _related(14, 6, 5)
    cu = torch.tensor([0, 6, 6, 7, 14])
    x = xs.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ref.cka_ref(x, xt.double(), cu_seqlens=cu), (x,))


def test_reference_matches_hand_formula_and_feature_route():
    # Independent float64 computation straight from the definition: H K H with an explicit H.
    xs, xt = _related(9, 7, 11, seed=3)
    xs, xt = xs.double(), xt.double()
    n = 9
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    def centered_gram(x):
        x = x / x.norm(dim=1, keepdim=True)
        return h @ (x @ x.t()) @ h
    ks, kt = centered_gram(xs), centered_gram(xt)
    hsic = lambda a, b: torch.trace(a @ b) / (n - 1) ** 2
    expect = hsic(kt, ks) / torch.sqrt(hsic(kt, kt) * hsic(ks, ks))
    got = ref.cka_ref(xs.unsqueeze(0), xt.unsqueeze(0))
    torch.testing.assert_close(got, expect.reshape(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.hsic_feature_space_ref(xs, xt), torch.trace(kt @ ks), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_properties(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 24, generator=g)
    y = torch.randn(2, 30, 40, generator=g)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    with gk.use_backend(backend):
        torch.testing.assert_close(gk.cka(x, x), torch.ones(2), rtol=0, atol=1e-5)         # CKA(X, X) = 1
        base = gk.cka(x, y)
        assert ((base >= 0) & (base <= 1 + 1e-6)).all()
        torch.testing.assert_close(gk.cka(3.7 * x, y), base, rtol=1e-5, atol=1e-6)         # isotropic scaling
        torch.testing.assert_close(gk.cka(x, 0.01 * y), base, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gk.cka(x @ q, y), base, rtol=1e-4, atol=1e-5)           # orthogonal transform
        torch.testing.assert_close(gk.cka(y, x), base, rtol=1e-5, atol=1e-6)               # symmetric


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_degenerate_samples_give_loss_one_zero_grad_and_are_counted(backend):
    g = torch.Generator().manual_seed(1)
    good_s, good_t = torch.randn(6, 8, generator=g), torch.randn(6, 12, generator=g)
    same = torch.randn(1, 8, generator=g).repeat(5, 1) * torch.arange(1.0, 6.0).unsqueeze(1)  # identical after l2
    xs = torch.cat([good_s, torch.randn(1, 8, generator=g), same, torch.zeros(3, 8)])
    xt = torch.cat([good_t, torch.randn(1, 12, generator=g), torch.randn(5, 12, generator=g),
                    torch.randn(3, 12, generator=g)])
    cu = torch.tensor([0, 6, 7, 12, 15])  # good, n=1, identical tokens, all-zero tokens
    with gk.use_backend(backend):
        x = xs.clone().requires_grad_()
        out = gk.rcka_loss(x, xt, cu_seqlens=cu, return_stats=True)
        out.loss.backward()
    assert int(out.num_degenerate) == 3
    assert torch.equal(out.cka[1:], torch.zeros(3))
    assert 0 < out.cka[0] < 1
    torch.testing.assert_close(out.loss, (1 - out.cka).mean())
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[6:], torch.zeros(9, 8)) and x.grad[:6].abs().sum() > 0


def test_teacher_gets_no_gradient():
    xs, xt = _related(20, 8, 8)
    t = xt.clone().requires_grad_()
    gk.rcka_loss(xs.view(2, 10, 8).requires_grad_(), t.view(2, 10, 8)).backward()
    assert t.grad is None


def _packed(s, t, cu):
    return gk.cka(s.reshape(20, 8), t.reshape(20, 6), cu_seqlens=cu)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda s, t: gk.cka(s, t[:, :9]), ValueError, "token counts differ"),
    (lambda s, t: gk.cka(s[0], t[0]), ValueError, "padded"),
    (lambda s, t: _packed(s, t, torch.tensor([0, 12, 9, 20])), ValueError, "cu_seqlens must .*non-decreasing"),
    (lambda s, t: _packed(s, t, torch.tensor([0, 12, 19])), ValueError, "cu_seqlens ends at 19"),
    (lambda s, t: _packed(s, t, torch.tensor([0, 12, 21])), ValueError, "cu_seqlens ends at 21"),
    (lambda s, t: _packed(s, t, torch.tensor([1, 12, 20])), ValueError, "cu_seqlens must start at 0"),
    (lambda s, t: _packed(s, t, torch.tensor([0.0, 20.0])), TypeError, "cu_seqlens must be an int32 or int64"),
    (lambda s, t: _packed(s, t, torch.tensor([False, True])), TypeError, "cu_seqlens must be an int32 or int64"),
    (lambda s, t: _packed(s, t, torch.tensor([0, 20], dtype=torch.int16)), TypeError, "cu_seqlens must be an int32"),
    (lambda s, t: _packed(s, t, [0, 20]), TypeError, "cu_seqlens must be an int32/int64 tensor"),
    (lambda s, t: _packed(s, t, torch.tensor([[0, 20]])), ValueError, "cu_seqlens must be 1-D"),
    (lambda s, t: _packed(s, t, torch.tensor([0, 20], device="meta")), ValueError, "cu_seqlens is on meta"),
    (lambda s, t: _packed(s, t, torch.tensor([20])), ValueError, "cu_seqlens has 1 entries: no sample"),
    (lambda s, t: gk.cka(s, t, cu_seqlens=torch.tensor([0, 20])), ValueError, "packed"),
    (lambda s, t: gk.cka(s.long(), t), TypeError, "student_feats must be a floating-point"),
    (lambda s, t: gk.cka(s, t.int()), TypeError, "teacher_feats must be a floating-point"),
    (lambda s, t: gk.rcka_loss(s, t.to("meta")), ValueError, "teacher_feats is on meta"),
    (lambda s, t: gk.rcka_loss(s[:0], t[:0]), ValueError, r"student_feats has no sample \(B = 0\)"),
    (lambda s, t: gk.rcka_loss(s[:, :0], t[:, :0]), ValueError, r"student_feats has no token \(n = 0\)"),
    (lambda s, t: gk.cka(s[..., :0], t), ValueError, "student_feats has feature dimension 0"),
    (lambda s, t: gk.rcka_loss(s.reshape(20, 8)[:0], t.reshape(20, 6)[:0], cu_seqlens=torch.tensor([0, 0, 0])),
     ValueError, r"no token \(total_tokens = 0\)"),
])
def test_bad_input_raises_naming_the_argument(backend, call, exc, match):
    s, t = torch.randn(2, 10, 8), torch.randn(2, 10, 6)
    with gk.use_backend(backend), pytest.raises(exc, match=match):
        call(s, t)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_token_samples_are_degenerate_and_cpu_cu_seqlens_is_accepted(backend):
    xs, xt = _related(12, 8, 6)
    cu = torch.tensor([0, 0, 5, 5, 12], dtype=torch.int32)
    with gk.use_backend(backend):
        out = gk.rcka_loss(xs, xt, cu_seqlens=cu, return_stats=True)
        alone = gk.cka(xs[:5].unsqueeze(0), xt[:5].unsqueeze(0))
    assert int(out.num_degenerate) == 2 and out.cka[0] == 0 and out.cka[2] == 0
    torch.testing.assert_close(out.cka[1], alone[0])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_non_finite_features_propagate_to_the_loss(backend, bad, which):
    xs, xt = _related(12, 8, 6)
    (xs if which == "student" else xt)[7, 2] = bad
    with gk.use_backend(backend):
        vals = gk.cka(xs, xt, cu_seqlens=torch.tensor([0, 5, 12]))
    assert torch.isfinite(vals[0]) and torch.isnan(vals[1])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_entry_point_checks_cu_seqlens_itself(backend):
    # torch.ops skips the wrapper: the op still refuses a cu_seqlens that would address rows past the end.
    xs, xt = _related(12, 8, 6)
    with gk.use_backend(backend), pytest.raises(ValueError, match="cu_seqlens"):
        torch.ops.grace_kernels.cka(xs, xt, torch.tensor([0, 9, 30]))


def test_opcheck():
    xs, xt = _related(12, 8, 6)
    cu = torch.tensor([0, 5, 12])
    x = xs.clone().requires_grad_()
    with gk.use_backend("reference"):
        torch.library.opcheck(torch.ops.grace_kernels.cka.default, (x, xt, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("ds,dt", [(4096, 5120), (1536, 3584)])
def test_gpu_full_shapes(ds, dt):
    lens = torch.tensor([576, 1024, 700, 1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).cuda()
    xs, xt = _related(int(lens.sum()), ds, dt)
    xs, xt = xs.cuda().bfloat16(), xt.cuda().bfloat16()
    v_t, g_t = _run("triton", xs, xt, cu)
    v_o, g_o = _oracle(xs, xt, cu)
    torch.testing.assert_close(v_t.double(), v_o, rtol=0, atol=1e-4)
    torch.testing.assert_close(g_t.double(), g_o, rtol=2e-2, atol=1e-3 * g_o.abs().max().item())
