"""W4A16Linear (canonical layout) and W4A16KernelLinear (the CUDA kernel's layout) on CPU: construction from
nn.Linear and QuantLinear, one layout per object, the compressed-tensors state dict both ways, conversion."""

import subprocess
import sys

import pytest
import torch

import grace_kernels as gk
from grace_kernels.nn import QuantLinear, W4A16KernelLinear, W4A16Linear, convert_to_kernel_layout
from grace_kernels.testing import sqnr


def test_gk_nn_is_an_attribute_without_importing_the_subpackage():
    code = "import grace_kernels as gk; print(gk.nn.W4A16Linear.__name__, gk.nn.W4A16KernelLinear.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["W4A16Linear", "W4A16KernelLinear"]


def test_from_linear_is_rtn_absmax():
    lin = torch.nn.Linear(256, 24)
    layer = W4A16Linear.from_linear(lin)
    codes, scales = gk.unpack_int4(layer.int4_weight)
    w = lin.weight.detach().view(24, 2, 128)
    torch.testing.assert_close(scales.float(), (w.abs().amax(-1) / 7).half().float())
    expect = torch.round(w / scales.float().unsqueeze(-1)).clamp(-8, 7).view(24, 256)
    assert torch.equal(codes.float(), expect)
    assert sqnr(layer.int4_weight.dequantize(), lin.weight.detach()) > 15  # INT4 keeps most of the signal


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_from_quant_linear_matches_the_trained_quant_linear(scale_dtype, reference_backend):
    q = QuantLinear.from_linear(torch.nn.Linear(256, 40), scale_dtype=scale_dtype)
    with torch.no_grad():
        q.log_scale.add_(0.05 * torch.randn_like(q.log_scale))  # as if trained
    layer = W4A16Linear.from_quant_linear(q)
    # The stored weights are exactly the fake-quantized ones.
    assert torch.equal(layer.int4_weight.dequantize(), q.fake_quant_weight().float())
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), q(x).detach(), rtol=1e-5, atol=1e-5)  # float32: matmul rounding only
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(layer(xb).float(), q(x).detach(), rtol=2e-2, atol=2e-2)


def test_state_dict_uses_compressed_tensors_names_and_round_trips():
    layer = W4A16Linear.from_linear(torch.nn.Linear(128, 16))
    sd = layer.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape", "bias"}
    assert sd["weight_packed"].dtype == torch.int32 and sd["weight_packed"].shape == (16, 16)
    assert sd["weight_scale"].shape == (16, 1) and sd["weight_shape"].tolist() == [16, 128]
    other = W4A16Linear(128, 16, bias_dtype=torch.float32)
    other.load_state_dict(sd)
    x = torch.randn(2, 128)
    assert torch.equal(other(x), layer(x))


def _pair(n=192, k=256, scale_dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    canonical = W4A16Linear.from_linear(torch.nn.Linear(k, n), scale_dtype=scale_dtype)
    return canonical, canonical.to_kernel_layout()


def test_kernel_linear_holds_only_the_kernel_layout():
    canonical, kernel = _pair()
    w = gk.repack_for_kernel(canonical.int4_weight)
    assert isinstance(kernel, W4A16KernelLinear) and kernel.layout == "kernel" and "layout=kernel" in repr(kernel)
    assert canonical.layout == "canonical" and not isinstance(canonical, W4A16KernelLinear)
    names = {name for name, _ in kernel.named_buffers()}
    assert names == {"kernel_packed", "kernel_scales", "weight_shape"}
    assert torch.equal(kernel.kernel_packed, w.kernel_packed) and torch.equal(kernel.kernel_scales, w.kernel_scales)
    # Converted once: the same number of bytes as the canonical buffers, no second copy.
    nbytes = lambda m: sum(b.numel() * b.element_size() for b in m.buffers())
    assert nbytes(kernel) == nbytes(canonical)
    assert kernel.to_kernel_layout() is kernel
    assert torch.equal(kernel.bias, canonical.bias) and kernel.bias.data_ptr() != canonical.bias.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_linear_forward_and_state_dict_equal_the_canonical_layer(dtype):
    canonical, kernel = _pair()
    x = torch.randn(3, 256).to(dtype)
    assert torch.equal(kernel(x), canonical(x))  # on CPU: the canonical weight rebuilt per call, the same math
    sd, ref = kernel.state_dict(), canonical.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["weight_scale"].dtype == ref["weight_scale"].dtype and sd["weight_packed"].shape == (192, 32)


def test_kernel_linear_loads_a_canonical_state_dict():
    _, kernel = _pair(seed=0)
    other, other_kernel = _pair(seed=1)
    assert not torch.equal(kernel.kernel_packed, other_kernel.kernel_packed)
    kernel.load_state_dict(other.state_dict())  # strict: the canonical names are exactly what it expects
    assert torch.equal(kernel.kernel_packed, other_kernel.kernel_packed)
    assert torch.equal(kernel.kernel_scales, other_kernel.kernel_scales)
    x = torch.randn(2, 256)
    assert torch.equal(kernel(x), other(x))
    # and the other way: a canonical layer loads what a kernel-layout layer writes
    fresh = W4A16Linear(256, 192, scale_dtype=torch.bfloat16, bias_dtype=torch.float32)
    fresh.load_state_dict(kernel.state_dict())
    assert torch.equal(fresh(x), other(x))


def test_kernel_linear_reports_missing_and_misfitting_tensors_by_checkpoint_name():
    canonical, kernel = _pair()
    sd = canonical.state_dict()
    result = kernel.load_state_dict({k: v for k, v in sd.items() if k != "weight_scale"}, strict=False)
    assert result.missing_keys == ["weight_scale"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="Missing key.*weight_packed"):
        kernel.load_state_dict({k: v for k, v in sd.items() if k != "weight_packed"})
    with pytest.raises(RuntimeError, match=r"weight_packed / weight_scale do not fit.*packed must have shape"):
        kernel.load_state_dict({**sd, "weight_packed": sd["weight_packed"][:64]})
    with pytest.raises(RuntimeError, match="Unexpected key.*kernel_packed"):
        kernel.load_state_dict({**sd, "kernel_packed": kernel.kernel_packed})


def test_kernel_linear_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="N % 64"):
        W4A16Linear.from_linear(torch.nn.Linear(128, 96)).to_kernel_layout()
    with pytest.raises(ValueError, match="group_size 128"):
        W4A16KernelLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)


def test_convert_to_kernel_layout_swaps_the_layers_the_kernel_takes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        W4A16Linear.from_linear(torch.nn.Linear(256, 128), scale_dtype=torch.bfloat16),
        torch.nn.Sequential(W4A16Linear.from_linear(torch.nn.Linear(128, 96), scale_dtype=torch.bfloat16)),
        torch.nn.ReLU(),
    )
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y, sd = model(x), model.state_dict()
    assert convert_to_kernel_layout(model, torch.float32) == 0  # float32 activations: no CUDA kernel
    assert convert_to_kernel_layout(model, torch.bfloat16) == 1
    assert type(model[0]) is W4A16KernelLinear and type(model[1][0]) is W4A16Linear  # N = 96: not taken
    assert torch.equal(model(x), y)
    out = model.state_dict()
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    assert convert_to_kernel_layout(model) == 0  # nothing left to convert


@pytest.mark.parametrize("call,match", [
    (lambda: W4A16Linear.from_linear(torch.nn.Linear(100, 4)), "multiple of 8"),
    (lambda: W4A16Linear(128, 4, scale_dtype=torch.float32), "scale_dtype"),
    (lambda: W4A16Linear.from_quant_linear(QuantLinear(128, 4, bits=8)), "bits=8"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
