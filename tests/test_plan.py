"""``grace plan``: parameter counts of the real architectures (meta device) against hand-derived formulas,
the memory model's arithmetic, and the CLI."""

import json

import pytest

from grace.cli import main
from grace.plan import ARCHITECTURES, GiB, count_parameters, parse_memory, plan


def llama_language(v, h, inter, layers, heads, kv, head_dim=None, qkv_bias=False, qk_norm=False, tied=False):
    """Embeddings + blocks + final norm + LM head of a Llama / Qwen2 / Qwen3 decoder, by hand."""
    d = head_dim or h // heads
    q, k = heads * d, kv * d
    attn = h * q + 2 * h * k + q * h + (q + 2 * k if qkv_bias else 0) + (2 * d if qk_norm else 0)
    block = attn + 3 * h * inter + 2 * h
    return v * h * (1 if tied else 2) + layers * block + h


LANGUAGE = {
    "llava-1.5-7b": llama_language(32064, 4096, 11008, 32, 32, 32),
    "llava-1.5-13b": llama_language(32064, 5120, 13824, 40, 40, 40),
    "qwen2-vl-2b": llama_language(151936, 1536, 8960, 28, 12, 2, qkv_bias=True, tied=True),
    "qwen2-vl-7b": llama_language(152064, 3584, 18944, 28, 28, 4, qkv_bias=True),
    "qwen2.5-vl-3b": llama_language(151936, 2048, 11008, 36, 16, 2, qkv_bias=True, tied=True),
    "qwen2.5-vl-7b": llama_language(152064, 3584, 18944, 28, 28, 4, qkv_bias=True),
    "qwen3-vl-2b": llama_language(151936, 2048, 6144, 28, 16, 8, head_dim=128, qk_norm=True, tied=True),
    "qwen3-vl-8b": llama_language(151936, 4096, 12288, 36, 32, 8, head_dim=128, qk_norm=True),
}


def clip_vit_l_336():
    """CLIP ViT-L/14 at 336 px as HF's CLIPVisionModel holds it (post-layernorm included)."""
    h, inter, layers, patches = 1024, 4096, 24, (336 // 14) ** 2
    embeddings = 3 * 14 * 14 * h + h + (patches + 1) * h           # patch conv (no bias), class token, positions
    block = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    return embeddings + 2 * h + layers * block + 2 * h             # pre- and post-layernorm


def qwen2_vl_vision(out):
    e, layers, merged = 1280, 32, 1280 * 4
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
    merger = 2 * e + (merged * merged + merged) + (merged * out + out)
    return 3 * 2 * 14 * 14 * e + layers * block + merger


@pytest.fixture(scope="module")
def counts():
    return {name: count_parameters(name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", sorted(LANGUAGE))
def test_language_model_matches_hand_count(counts, name):
    assert counts[name].language == LANGUAGE[name]


def test_published_sizes(counts):
    # The sizes the model names advertise, from the hand-derived language models.
    assert round(LANGUAGE["llava-1.5-7b"] / 1e9, 2) == 6.74
    assert round(LANGUAGE["llava-1.5-13b"] / 1e9, 2) == 13.02
    assert round(counts["qwen2-vl-2b"].total / 1e9, 2) == 2.21
    assert round(counts["qwen2-vl-7b"].total / 1e9, 2) == 8.29


def test_vision_towers_match_hand_count(counts):
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    for name in ("llava-1.5-7b", "llava-1.5-13b"):
        c = counts[name]
        assert c.vision == clip_vit_l_336()
        assert c.total == c.language + c.vision + c.projector
    assert counts["llava-1.5-7b"].projector == projector
    assert counts["llava-1.5-13b"].projector == (1024 * 5120 + 5120) + (5120 * 5120 + 5120)
    assert counts["qwen2-vl-2b"].vision == qwen2_vl_vision(1536)
    assert counts["qwen2-vl-7b"].vision == qwen2_vl_vision(3584)


def test_quantized_weights_are_the_backbone_linears(counts):
    c = counts["llava-1.5-7b"]
    per_block = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert c.quantized == 32 * per_block
    assert c.lsq_scales(128) == 32 * per_block // 128


def test_memory_rows_follow_the_model(counts):
    t, s = counts["llava-1.5-13b"], counts["llava-1.5-7b"]
    r = plan(t, s, world_size=8, batch_size=4, seq_len=2048, gradient_checkpointing=True)
    trainable = s.total - s.vision
    assert r.rows["teacher (bf16)"] == 2 * t.total
    assert r.rows["grads"] == trainable * 4 // 8
    assert r.rows["AdamW states"] == 2 * r.rows["grads"]
    assert r.rows["student params"] == trainable * 4 // 8 + 2 * s.vision
    assert r.total == sum(r.rows.values())
    # bf16 masters halve the sharded state; more ranks shrink it; checkpointing shrinks activations.
    half = plan(t, s, master_dtype="bfloat16")
    assert half.rows["grads"] == trainable * 2 // 8
    assert plan(t, s, world_size=16).rows["AdamW states"] < r.rows["AdamW states"]
    assert plan(t, s, gradient_checkpointing=False).rows["activations"] > 4 * r.rows["activations"]
    # The fused loss holds chunks of float32 logits: with Qwen's 152k vocabulary, less in all than the
    # student's [tokens, vocab] float32 logits alone would take.
    q = plan(counts["qwen2-vl-7b"], counts["qwen2-vl-2b"], batch_size=4, seq_len=2048)
    assert q.rows["loss chunks"] < 4 * 2048 * 4 * counts["qwen2-vl-2b"].vocab


def test_fit_verdict(counts):
    t, s = counts["qwen2-vl-7b"], counts["qwen2-vl-2b"]
    r = plan(t, s, gpu_memory="80GiB")
    assert r.fits and r.usable == int(80 * GiB * 0.9)
    small = plan(t, s, gpu_memory=r.total / 0.9 - GiB)
    assert not small.fits and "does NOT fit" in small.format()


def test_bad_arguments_are_named(counts):
    t, s = counts["qwen2-vl-7b"], counts["qwen2-vl-2b"]
    for kw, word in (({"world_size": 0}, "world_size"), ({"seq_len": -1}, "seq_len"),
                     ({"master_dtype": "fp8"}, "master_dtype"), ({"headroom": 1.0}, "headroom"),
                     ({"gpu_memory": "lots"}, "gpu_memory")):
        with pytest.raises(ValueError, match=word):
            plan(t, s, **kw)
    with pytest.raises(ValueError, match="neither one of"):
        count_parameters("llava-1.5-70b")


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("80GB") == 80 * 10 ** 9
    assert parse_memory("40") == 40 * GiB
    assert parse_memory("81920MiB") == 80 * GiB


def test_local_config_json_counts_like_the_name(tmp_path, counts):
    (tmp_path / "config.json").write_text(json.dumps(ARCHITECTURES["qwen2-vl-2b"]))
    assert count_parameters(str(tmp_path)).total == counts["qwen2-vl-2b"].total


def test_cli_prints_the_standard_tables(capsys):
    # With gradient checkpointing (off by default, as in grace train) every standard pair fits one 80 GiB GPU.
    assert main(["plan", "--gpu-memory", "80GiB", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "teacher llava-1.5-13b" in out and "student llava-1.5-7b" in out
    assert "teacher qwen2-vl-7b" in out and "student qwen2-vl-2b" in out
    assert out.count("fits in 80.0 GiB") == 3


def test_cli_rejects_half_a_pair(capsys):
    assert main(["plan", "--teacher", "qwen2-vl-7b"]) == 2
    assert "both --teacher and --student" in capsys.readouterr().err
