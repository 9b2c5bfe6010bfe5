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
