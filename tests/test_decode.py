"""The end-to-end decode benchmark (benchmarks/bench_decode.py) at toy size on CPU.

Its three paths (bf16 linears, W4A16Linear, torch's int4 GEMM) hold the same INT4 codes, so in float32
they must compute the same logits and greedy tokens; its hand-written decoder must be Llama (the same
logits and greedy generation as transformers' LlamaForCausalLM with the same weights). Speed is measured
only on a GPU (gpu_acceptance).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_decode as bd  # noqa: E402

SMALL = bd.LlamaShape(hidden=128, layers=2, heads=2, intermediate=256, vocab=320)


def test_three_paths_agree_at_toy_size(reference_backend):
    result = bd.run_decode(SMALL, batches=(1, 2), prompt_len=8, new_tokens=5, dtype=torch.float32, device="cpu",
                           reps=1)
    assert result["skipped"] == {}, result["skipped"]
    rows = {(r["batch"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {(b, p) for b in (1, 2) for p in bd.PATHS}
    for (b, path), r in rows.items():
        assert torch.tensor(r["tokens"]).shape == (b, 5)
        # the same float32 weights: only matmul rounding separates the paths
        assert r["logits_rel_err_vs_bf16"] < 1e-5, (b, path, r["logits_rel_err_vs_bf16"])
        assert r["tokens_equal_bf16"] == 1.0, (b, path)
    assert rows[(1, "int4")]["weights_gib"] < rows[(1, "bf16")]["weights_gib"] / 2
    assert "Decode" in bd.markdown(result)


def _hf_llama(model: bd.LlamaDecoder):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = model.shape
    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                         rms_norm_eps=s.eps, max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def test_decoder_and_static_cache_match_transformers_llama():
    model = bd.build_model(SMALL, "bf16", dtype=torch.float32, device="cpu", seed=3)
    hf = _hf_llama(model)
    prompt = torch.randint(0, SMALL.vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = bd.StaticCache.empty(SMALL, 2, 16, torch.float32, "cpu")
    with torch.no_grad():
        ours = model(prompt, torch.arange(7), cache, last_only=False)
        theirs = hf(prompt).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # greedy decoding through the static cache = transformers' own generate (its dynamic cache)
    engine = bd.DecodeEngine(model, 2, 7, 6, graph=False)
    engine.prefill(prompt)
    engine.decode()
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, 7:]
    assert torch.equal(engine.out, ref), (engine.out, ref)


def test_summary_ratios_and_targets():
    def row(b, path, tps, peak):
        return {"batch": b, "path": path, "decode_tokens_per_s": tps, "peak_mem_gib": peak}

    summary = bd.summarize([row(1, "bf16", 100.0, 14.0), row(1, "int4", 350.0, 5.0), row(8, "bf16", 700.0, 15.0),
                            row(8, "int4", 1400.0, 6.0)])
    assert summary["int4@batch1"]["speedup_vs_bf16"] == pytest.approx(3.5)
    assert summary["int4@batch1"]["meets_speedup_target"] and summary["int4@batch1"]["meets_memory_target"]
    assert summary["int4@batch1"]["memory_ratio_vs_bf16"] == pytest.approx(2.8)
    assert not summary["int4@batch8"]["meets_speedup_target"]
    assert summary["int4@batch8"]["meets_memory_target"] is None  # the memory target is stated at batch 1


def test_unknown_path_is_rejected():
    w = bd.gk.quantize_rtn(torch.randn(64, 128))
    with pytest.raises(ValueError, match="path must be one of"):
        bd._linear("fp8", w, torch.float32, "cpu", False)
