"""Family adapters: how many visual tokens each image of a batch holds (RCKA's per-image segments)."""

from types import SimpleNamespace

import pytest
import torch

from grace.families import FAMILIES, family_of

LLAVA = SimpleNamespace(model_type="llava", image_token_index=7)
QWEN = {t: SimpleNamespace(model_type=t, image_token_id=5, vision_config=SimpleNamespace(spatial_merge_size=2))
        for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}


def test_llava_images_share_their_tokens_evenly():
    ids = torch.tensor([[1, 7, 7, 7, 7, 2, 7, 7, 7, 7], [7, 7, 7, 7, 3, 3, 3, 3, 3, 0]])
    batch = {"input_ids": ids, "pixel_values": torch.zeros(3, 3, 28, 28)}
    assert family_of(LLAVA).image_token_counts(LLAVA, batch).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="12 image tokens cannot be split evenly over 5 images"):
        family_of(LLAVA).image_token_counts(LLAVA, {"input_ids": ids, "pixel_values": torch.zeros(5, 3, 28, 28)})
    with pytest.raises(ValueError, match="over 0 images"):
        family_of(LLAVA).image_token_counts(LLAVA, {"input_ids": ids})


@pytest.mark.parametrize("model_type", sorted(QWEN))
def test_qwen_images_follow_their_grids(model_type):
    config = QWEN[model_type]
    grid = torch.tensor([[1, 4, 4], [1, 6, 8], [2, 4, 4]])    # t x h x w patches, merged 2 x 2
    counts = family_of(config).image_token_counts(config, {"image_grid_thw": grid})
    assert counts.dtype == torch.int64 and counts.tolist() == [4, 12, 8]


def test_every_family_is_listed_once():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types)) and "qwen3_vl" in types


NAMES = ["model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1", "lm_head",
         "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
         "model.visual.deepstack_merger_list.0.linear_fc1",
         "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.3.mlp.down_proj",
         "language_model.lm_head", "vision_tower.vision_model.encoder.layers.0.self_attn.k_proj"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_full_precision_patterns_have_one_home(family):
    """Training's fnmatch patterns and the export's ``ignore`` entries are one list in two syntaxes: they
    keep the same modules in full precision, under in-memory and on-disk names alike."""
    from grace.naming import matches_ignore

    ignore = list(family.ignore_patterns())
    assert all(p.startswith("re:") for p in ignore)
    for name in NAMES:
        assert family.is_full_precision(name) == matches_ignore(name, ignore), name
    assert not family.is_full_precision("model.language_model.layers.0.self_attn.q_proj")
    assert family.is_full_precision("lm_head") and family.is_full_precision("language_model.lm_head")
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1" if family.name == "llava" else "model.visual.merger.mlp.0"
    assert family.is_full_precision(tower)


def test_hub_layout_of_llava_names():
    llava, qwen = family_of(LLAVA), family_of(QWEN["qwen2_vl"])
    keys = ["vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.vision_model.post_layernorm.bias",
            "language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.weight"]
    assert llava.hub_checkpoint_keys(keys) == ["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                                               "vision_tower.vision_model.post_layernorm.bias"] + keys[2:]
    unchanged = ["model.visual.blocks.0.attn.qkv.weight"]
    assert qwen.hub_checkpoint_keys(unchanged) == unchanged
