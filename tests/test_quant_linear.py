import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grace_kernels as gk
from grace_kernels.nn import QuantLinear


def _linear(inp=256, out=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_forward_is_linear_of_fake_quant_weight(bias, reference_backend):
    lin = _linear(bias=bias)
    q = QuantLinear.from_linear(lin, bits=4, group_size=128)
    assert q.log_scale.shape == (24, 2) and q.log_scale.dtype == torch.float32
    x = torch.randn(5, 256)
    w_fq = gk.lsq_fake_quant(lin.weight, q.log_scale, group_size=128)
    torch.testing.assert_close(q(x), F.linear(x, w_fq, lin.bias), rtol=0, atol=0)
    # The copy is independent of the original layer.
    assert q.weight.data_ptr() != lin.weight.data_ptr()
    assert not torch.equal(q(x), lin(x))  # INT4 changes the output


def test_backward_reaches_weight_scales_and_bias(reference_backend):
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=64)
    q(torch.randn(3, 256)).square().sum().backward()
    for p in (q.weight, q.log_scale, q.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_to_linear_holds_the_fake_quantized_weight(reference_backend):
    q = QuantLinear.from_linear(_linear(), scale_dtype=torch.bfloat16)
    lin = q.to_linear()
    assert type(lin) is nn.Linear
    assert torch.equal(lin.weight, q.fake_quant_weight()) and torch.equal(lin.bias, q.bias)
    codes, scales = q.quantize()
    assert scales.dtype == torch.bfloat16
    assert torch.equal((codes.float() * scales.float().repeat_interleave(128, 1)), lin.weight)


def test_constructor_state_dict_and_repr():
    q = QuantLinear(256, 8, bits=8, group_size=32)
    sd = q.state_dict()
    assert set(sd) == {"weight", "bias", "log_scale"} and sd["log_scale"].shape == (8, 8)
    assert "bits=8, group_size=32" in repr(q)
    q2 = QuantLinear(256, 8, bits=8, group_size=32)
    q2.load_state_dict(sd)
    assert torch.equal(q2.log_scale, q.log_scale)


def test_mse_init_option(reference_backend):
    lin = _linear()
    q_pct = QuantLinear.from_linear(lin)
    q_mse = QuantLinear.from_linear(lin, method="mse")
    assert not torch.equal(q_pct.log_scale, q_mse.log_scale)
    err = lambda q: (q.fake_quant_weight() - lin.weight).pow(2).sum().item()
    assert err(q_mse) < err(q_pct)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        QuantLinear.from_linear(nn.Linear(200, 4), group_size=128)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        QuantLinear(200, 4, group_size=128)
