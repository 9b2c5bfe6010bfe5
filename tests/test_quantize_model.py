"""Model surgery on tiny LLaVA and Qwen2-VL models built from configs (no download)."""

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import grace
from grace_kernels.nn import QuantLinear

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320)


def tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=319))


def tiny_qwen2vl():
    torch.manual_seed(0)
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, bos_token_id=0, eos_token_id=1)
    vision = dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, in_chans=3, spatial_merge_size=2,
                  patch_size=14, temporal_patch_size=2)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))


def _linears(model, cls):
    return {n for n, m in model.named_modules() if type(m) is cls}


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl])
def test_swaps_exactly_the_language_backbone(build, capsys):
    model = build()
    before = _linears(model, nn.Linear)
    grace.quantize_model(model, bits=4, group_size=64)
    swapped = set(model.grace_quantized_modules)
    assert swapped == _linears(model, QuantLinear)
    # 2 layers x (q, k, v, o, gate, up, down)
    assert len(swapped) == 14 and all(".language_model." in n for n in swapped)
    kept = _linears(model, nn.Linear)
    assert kept == before - swapped
    assert "lm_head" in kept
    assert any("vision_tower" in n or "visual" in n for n in kept)
    assert any("multi_modal_projector" in n or "merger" in n for n in kept)
    assert "14 linear layers" in capsys.readouterr().out


def test_quantized_llava_runs_forward_and_backward(reference_backend):
    model = tiny_llava()
    grace.quantize_model(model, bits=4, group_size=64, verbose=False)
    ids = torch.randint(0, 300, (2, 9))
    out = model.model.language_model(input_ids=ids)
    out.last_hidden_state.sum().backward()
    q = model.get_submodule(model.grace_quantized_modules[0])
    assert q.log_scale.grad is not None and torch.isfinite(q.log_scale.grad).all()


def test_include_exclude_patterns_and_errors():
    model = tiny_llava()
    grace.quantize_model(model, group_size=64, include=["*.mlp.*"], verbose=False)
    assert all(".mlp." in n for n in model.grace_quantized_modules) and len(model.grace_quantized_modules) == 6
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        grace.quantize_model(tiny_llava(), include=["nothing.*"], verbose=False)
    # intermediate 256 divides, hidden 128 does not divide by 256: named in the message, nothing swapped.
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"q_proj \(in_features=128\)"):
        grace.quantize_model(model, group_size=256, verbose=False)
    assert not _linears(model, QuantLinear)
