"""Tiny local checkpoints: the initialisations the demo uses touch exactly the layers GRACE quantizes."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from grace.demo.tiny import build_tiny_vlm
from grace.quantize import select_linears
from grace_kernels.int4 import quantize_rtn, unpack_int4


def _build(tmp_path, name, **kw):
    return AutoModelForImageTextToText.from_pretrained(
        build_tiny_vlm(str(tmp_path / name), size="demo-student", seed=3, **kw))


def _rtn_zero_fraction(w: torch.Tensor) -> float:
    """The fraction of weights the demo's RTN baseline (absmax / 7 per group of 128) sets to code 0."""
    codes, _ = unpack_int4(quantize_rtn(w))
    return float((codes == 0).float().mean())


def _kurtosis(x: torch.Tensor) -> float:
    return float(((x - x.mean()) ** 4).mean() / x.var() ** 2)


@pytest.mark.parametrize("init", ["fan_in", "heavy_tailed"])
def test_fan_in_inits_redraw_only_the_backbone_linears(tmp_path, init):
    hf = _build(tmp_path, "hf")
    redrawn = _build(tmp_path, init, init=init)
    backbone = {n for n, _ in select_linears(redrawn, group_size=1)}
    assert backbone and not any("lm_head" in n or "vision" in n or "projector" in n for n in backbone)
    hf_params = dict(hf.named_parameters())
    for name, p in redrawn.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in backbone and name.endswith("weight"):
            in_features = p.shape[1]
            # fan_in: 16k-65k draws, the sample std is within 2% of 1 / sqrt(in_features); heavy_tailed is
            # rescaled to it exactly. transformers' is 0.02.
            assert p.std().item() == pytest.approx(in_features ** -0.5, rel=0.02 if init == "fan_in" else 1e-4), name
            assert hf_params[name].std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert torch.equal(p, hf_params[name]), name   # everything else is the same draw


def test_heavy_tailed_init_is_what_makes_round_to_nearest_int4_lossy(tmp_path):
    fan = dict(select_linears(_build(tmp_path, "fan", init="fan_in"), group_size=1))
    heavy = dict(select_linears(_build(tmp_path, "heavy", init="heavy_tailed"), group_size=1))
    again = dict(select_linears(_build(tmp_path, "again", init="heavy_tailed"), group_size=1))
    for name, lin in heavy.items():
        w, g = lin.weight.detach(), fan[name].weight.detach()
        assert torch.equal(w, again[name].weight), name   # seeded
        # A Gaussian's kurtosis is 3; Student-t with 2 degrees of freedom has none (infinite variance), and
        # 16k-65k draws of it come out far above.
        assert _kurtosis(g) == pytest.approx(3.0, abs=0.3), name
        assert _kurtosis(w) > 30, name
        # Each group's absmax sets its INT4 step. A Gaussian group's absmax is ~2.8 std, so round-to-nearest
        # zeroes the weights under 0.2 std, ~16% of them; the heavy-tailed groups' few large weights set a step
        # that zeroes over half (58% at this seed).
        assert _rtn_zero_fraction(g) == pytest.approx(0.16, abs=0.02), name
        assert _rtn_zero_fraction(w) > 0.45, name


def test_unknown_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        build_tiny_vlm(str(tmp_path), init="xavier")
