"""The fused loss against the unfused eager composition (GEMMs + gated DKD + cross-entropy)."""

import pytest
import torch

import grace_kernels as gk
from grace_kernels.reference.fused_linear_grace_loss import fused_linear_grace_loss_ref
from grace_kernels.testing import assert_close_to_gold

FIELDS = ("loss", "ce", "gdkd", "tckd", "nckd", "teacher_entropy", "gate_mean", "gate_sum", "num_valid")


def _problem(n=11, hs=32, ht=48, vs=53, vt=57, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    p = {
        "student_hidden": torch.randn(n, hs, generator=g), "student_weight": torch.randn(vs, hs, generator=g) / 3,
        "teacher_hidden": torch.randn(n, ht, generator=g), "teacher_weight": torch.randn(vt, ht, generator=g) / 3,
    }
    tgt = torch.randint(0, min(vs, vt), (n,), generator=g)
    tgt[2] = -100
    if bias:
        p["student_bias"] = torch.randn(vs, generator=g)
    return p, tgt


def _grads(fn, p, tgt, dtype, **kw):
    leaves = {k: v.to(dtype).clone().requires_grad_(k.startswith("student")) for k, v in p.items()}
    out = fn(target=tgt, **leaves, **kw)
    out[0].backward()
    return out, {k: v.grad for k, v in leaves.items() if k.startswith("student")}


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"kd_type": "kl", "gate": False}, {"ce_weight": 0.5, "kd_weight": 2.5},
                                {"chunk_size": 4}, {"kd_weight": 0.0}])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_equals_unfused_composition(backend, kw, dtype):
    p, tgt = _problem(bias=True)
    with gk.use_backend(backend):
        out, grads = _grads(gk.fused_linear_grace_loss, p, tgt, dtype, **kw)
    ref32, g32 = _grads(fused_linear_grace_loss_ref, p, tgt, dtype, **kw)   # eager, same input dtype
    gold, g64 = _grads(fused_linear_grace_loss_ref, p, tgt, torch.float64, **kw)
    for name, a, b, c in zip(FIELDS, out, ref32, gold, strict=True):
        c = torch.as_tensor(c).double()
        assert_close_to_gold(a.reshape(1).double(), torch.as_tensor(b).reshape(1).double(), c.reshape(1),
                             atol=2e-6 * max(1.0, abs(float(c))), name=name)
    for k, g in grads.items():
        # dX is formed in the inputs' dtype, like the eager composition's autograd.
        atol = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * g64[k].abs().max().item()
        assert g.dtype == dtype
        assert_close_to_gold(g.double(), g32[k].double(), g64[k], atol=atol, name=k)


def test_precomputed_teacher_logits_match_teacher_head():
    p, tgt = _problem()
    with gk.use_backend("reference"):
        a = gk.fused_linear_grace_loss(target=tgt, **p)
        logits = p["teacher_hidden"] @ p["teacher_weight"].t()
        b = gk.fused_linear_grace_loss(p["student_hidden"], p["student_weight"], target=tgt, teacher_logits=logits)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_kd_off_needs_no_teacher_and_equals_cross_entropy():
    p, tgt = _problem()
    x = p["student_hidden"].clone().requires_grad_()
    out = gk.fused_linear_grace_loss(x, p["student_weight"], target=tgt, kd_weight=0.0)
    ce = torch.nn.functional.cross_entropy(p["student_hidden"] @ p["student_weight"].t(), tgt)
    torch.testing.assert_close(out.loss, ce, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_all_ignored_is_zero_with_zero_gradients():
    p, tgt = _problem()
    out, grads = _grads(gk.fused_linear_grace_loss, p, torch.full_like(tgt, -100), torch.float32)
    assert out.loss.item() == 0.0 and out.num_valid.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_no_grad_mode_computes_no_gradient_buffers():
    p, tgt = _problem()
    with torch.no_grad():
        out = gk.fused_linear_grace_loss(target=tgt, **p)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mutate,exc,match", [
    (lambda p: p.update(student_weight=p["student_weight"][:, :5]), ValueError, "does not match hidden size"),
    (lambda p: p.update(teacher_hidden=p["teacher_hidden"][:4]), ValueError, "teacher_hidden has 4 tokens"),
    (lambda p: p.update(teacher_logits=torch.zeros(11, 57)), ValueError, "exactly one"),
    (lambda p: p.pop("teacher_weight"), ValueError, "together"),
    (lambda p: p.update(student_bias=torch.zeros(3)), ValueError, "student_bias"),
    (lambda p: p.update(chunk_size=0), ValueError, "chunk_size"),
    (lambda p: p.update(student_hidden=p["student_hidden"].long()), TypeError, "student_hidden must be a floating"),
    (lambda p: p.update(target=p["target"] > 5), TypeError, "target must be an integer"),
    (lambda p: p.update(target=p["target"].float()), TypeError, "target must be an integer"),
    (lambda p: p.update(teacher_weight=p["teacher_weight"].to("meta")), ValueError, "teacher_weight is on meta"),
    (lambda p: p.update(target=p["target"].to("meta")), ValueError, "target is on meta"),
    (lambda p: p.update(temperature=float("nan")), ValueError, "temperature must be"),
    (lambda p: p.update(kd_weight=float("nan")), ValueError, "kd_weight"),
    (lambda p: p.update(ce_weight=float("inf")), ValueError, "ce_weight"),
])
def test_bad_input_raises_naming_the_argument(backend, mutate, exc, match):
    p, tgt = _problem()
    p["target"] = tgt
    mutate(p)
    with gk.use_backend(backend), pytest.raises(exc, match=match):
        gk.fused_linear_grace_loss(**p)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_target_must_lie_in_the_common_vocabulary(backend):
    p, tgt = _problem(vs=64, vt=57)   # a student vocabulary larger than the teacher's
    bad = tgt.clone()
    bad[4] = 60
    with gk.use_backend(backend):
        with pytest.raises(ValueError, match=r"target values must be in \[0, 57\)"):
            gk.fused_linear_grace_loss(target=bad, **p)
        # Without the teacher the CE alone needs targets < Vs only.
        out = gk.fused_linear_grace_loss(p["student_hidden"], p["student_weight"], target=bad, kd_weight=0.0)
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kw", [{}, {"kd_type": "kl", "gate": False}, {"chunk_size": 4}])
def test_minus_inf_vocabulary_padding_equals_the_unpadded_loss(backend, kw):
    # Both heads padded with 6 rows whose logits are -inf: through a -inf student bias, and through
    # precomputed teacher logits (or a -inf teacher bias).
    p, tgt = _problem(vs=53, vt=53, bias=True)
    pad, inf = 6, float("-inf")
    teacher_logits = p["teacher_hidden"] @ p["teacher_weight"].t()
    padded = {"student_hidden": p["student_hidden"],
              "student_weight": torch.cat([p["student_weight"], torch.randn(pad, 32)]),
              "student_bias": torch.cat([p["student_bias"], torch.full((pad,), inf)])}
    plain = {k: p[k] for k in padded}

    def run(inputs, **teacher):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        with gk.use_backend(backend):
            out = gk.fused_linear_grace_loss(target=tgt, **leaves, **teacher, **kw)
        out.loss.backward()
        return out, {k: v.grad for k, v in leaves.items()}

    out, grads = run(plain, teacher_logits=teacher_logits)
    for teacher in ({"teacher_logits": torch.cat([teacher_logits, torch.full((11, pad), inf)], 1)},
                    {"teacher_hidden": p["teacher_hidden"],
                     "teacher_weight": torch.cat([p["teacher_weight"], torch.randn(pad, 48)]),
                     "teacher_bias": torch.full((53 + pad,), 0.0).index_fill_(0, torch.arange(53, 53 + pad), inf)}):
        out_p, grads_p = run(padded, **teacher)
        for name, a, b in zip(FIELDS, out, out_p, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(grads_p["student_hidden"], grads["student_hidden"], rtol=1e-5, atol=1e-7)
        for k in ("student_weight", "student_bias"):
            torch.testing.assert_close(grads_p[k][:53], grads[k], rtol=1e-5, atol=1e-7)
            assert torch.equal(grads_p[k][53:], torch.zeros_like(grads_p[k][53:]))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("key", ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"])
def test_nan_inputs_propagate_to_the_loss(backend, key):
    p, tgt = _problem()
    p[key][3, 5] = float("nan")
    with gk.use_backend(backend):
        assert not torch.isfinite(gk.fused_linear_grace_loss(target=tgt, **p).loss)


@pytest.mark.gpu
@pytest.mark.parametrize("v", [32000, 151936])
def test_gpu_full_vocabulary(v):
    p, tgt = _problem(n=512, hs=1536, ht=3584, vs=v, vt=v + 128)
    p = {k: t.cuda().bfloat16() for k, t in p.items()}
    out, grads = _grads(gk.fused_linear_grace_loss, p, tgt.cuda(), torch.bfloat16)
    gold, g64 = _grads(fused_linear_grace_loss_ref, {k: t.float() for k, t in p.items()}, tgt.cuda(), torch.float32)
    torch.testing.assert_close(out.loss.double(), gold[0].double(), rtol=1e-4, atol=1e-4)
    for k, g in grads.items():
        torch.testing.assert_close(g.double(), g64[k].double(), rtol=5e-2, atol=1e-2 * g64[k].abs().max().item())


def test_second_backward_is_refused_rather_than_double_scaled():
    p, tgt = _problem()
    x = p["student_hidden"].clone().requires_grad_()
    out = gk.fused_linear_grace_loss(x, p["student_weight"], p["teacher_hidden"], p["teacher_weight"], tgt)
    (2.0 * out.loss).backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    # grad_output is honoured: 2 * loss gives twice the gradient of loss.
    x2 = p["student_hidden"].clone().requires_grad_()
    gk.fused_linear_grace_loss(x2, p["student_weight"], p["teacher_hidden"], p["teacher_weight"], tgt).loss.backward()
    torch.testing.assert_close(first, 2.0 * x2.grad)
