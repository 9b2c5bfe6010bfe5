"""Tiny local checkpoints: the fan-in initialisation the demo uses touches exactly the layers GRACE quantizes."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from grace.quantize import select_linears
from grace.tiny import build_tiny_vlm


def test_fan_in_init_redraws_only_the_backbone_linears(tmp_path):
    hf = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(str(tmp_path / "hf"), size="demo-student", seed=3))
    fan = AutoModelForImageTextToText.from_pretrained(
        build_tiny_vlm(str(tmp_path / "fan"), size="demo-student", seed=3, init="fan_in"))
    backbone = {n for n, _ in select_linears(fan, group_size=1)}
    assert backbone and not any("lm_head" in n or "vision" in n or "projector" in n for n in backbone)
    hf_params = dict(hf.named_parameters())
    for name, p in fan.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in backbone and name.endswith("weight"):
            in_features = p.shape[1]
            # 16k-65k draws: the sample std is within 2% of 1 / sqrt(in_features); transformers' is 0.02
            assert p.std().item() == pytest.approx(in_features ** -0.5, rel=0.02), name
            assert hf_params[name].std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert torch.equal(p, hf_params[name]), name   # everything else is the same draw


def test_unknown_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        build_tiny_vlm(str(tmp_path), init="xavier")
