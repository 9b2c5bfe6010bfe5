"""The end-to-end decode benchmark (benchmarks/bench_decode.py) at toy size on CPU.

Its three paths (bf16 linears, W4A16Linear, torch's int4 GEMM) hold the same INT4 codes, so in float32
they must compute the same logits and greedy tokens; its hand-written decoder must be Llama (the same
logits and greedy generation as transformers' LlamaForCausalLM with the same weights). Speed is measured
only on a GPU (gpu_acceptance).
"""

import dataclasses
import gc
import os
import sys
import weakref

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_decode as bd  # noqa: E402

SMALL = bd.LlamaShape(hidden=128, layers=2, heads=2, intermediate=256, vocab=320)


def test_three_paths_agree_at_toy_size(reference_backend):
    partial = []  # what a run stopped at its budget would have written: every row so far
    result = bd.run_decode(SMALL, batches=(1, 2), prompt_len=8, new_tokens=5, dtype=torch.float32, device="cpu",
                           reps=1, progress=partial.append)
    assert [len(p["rows"]) for p in partial] == list(range(1, len(result["rows"]) + 1))
    assert partial[-1]["rows"] == result["rows"] and partial[0]["rows"] == result["rows"][:1]
    # the order of value for a run stopped at its budget: the targets' comparison first, the peer last;
    # rows measured before the fixed cost still get it
    assert [(r["path"], r["batch"]) for r in result["rows"]] == [(p, b) for p in bd.PATHS for b in (1, 2)]
    assert all(r["fixed_ms_per_step"] == result["fixed_ms_per_step"][r["batch"]] for r in result["rows"])
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


def test_capture_path_runs_through_the_graph_stand_in_and_matches_eager_steps():
    """graph=True on CPU takes the same _capture path as on CUDA (warm-up, capture, replays), with the
    eager stand-in: its warm-up must write in bounds and leave the engine as prefill expects it."""
    model = bd.build_model(SMALL, "int4", dtype=torch.float32, device="cpu", seed=1)
    prompt = torch.randint(0, SMALL.vocab, (2, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for graph in (False, True):
        engine = bd.DecodeEngine(model, 2, 7, 6, graph=graph)
        if graph:
            assert isinstance(engine.graphs, bd.EagerGraphs) and engine.graph.replays == 0
            assert not engine.out.any() and not engine.token.any()  # the warm-up's writes are undone
        engine.prefill(prompt)
        engine.decode()
        outs[graph] = engine.out.clone()
    assert engine.graph.replays == 5  # new_tokens - 1 steps, all by replay
    assert torch.equal(outs[True], outs[False])
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        bd.DecodeEngine(model, 1, 7, 1, graph=True)


def test_compiled_step_traces_each_layer_once_through_the_ops_fakes_and_matches_eager():
    """The serving step under torch.compile (aot_eager: dynamo + AOT tracing with fake tensors, the path
    inductor takes): three graphs for any depth (embedding, one decoder layer reused by every layer, the
    head with sampling), the INT4 GEMM traced as the project's op, and the same tokens as eager steps."""
    from torch._dynamo import lookup_backend

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    model = bd.build_model(SMALL, "int4", dtype=torch.float32, device="cpu", seed=1)
    prompt = torch.randint(0, SMALL.vocab, (1, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for compile in (None, counting_backend):
        engine = bd.DecodeEngine(model, 1, 7, 6, graph=True, compile=compile)
        engine.prefill(prompt)
        engine.decode()
        outs[compile is None] = engine.out.clone()
    torch._dynamo.reset()
    assert torch.equal(outs[True], outs[False])
    assert len(graphs) == 3, [str(g.graph)[:200] for g in graphs]
    assert sum("grace_kernels.w4a16_matmul" in str(g.graph) for g in graphs) == 1  # the layer graph


def test_no_previous_model_or_cache_is_alive_while_the_next_path_is_measured():
    """Peak memory of a path must not count the previous path's model or any earlier engine's KV cache:
    at each measurement, weak references to everything measured before are dead."""
    earlier, seen = [], []

    def before_measure(path, batch, model, engine):
        gc.collect()
        alive = [name for name, ref in earlier if ref() is not None]
        assert not alive, f"alive while measuring {path}@{batch}: {alive}"
        seen.append((path, batch))
        # the previous path's model may not live on; this path's model serves its next batch
        earlier.extend([(f"{path}@{batch} cache", weakref.ref(engine.cache.k)),
                        (f"{path}@{batch} engine", weakref.ref(engine))])
        if batch == 2:
            earlier.append((f"{path} model", weakref.ref(model)))

    bd.run_decode(SMALL, batches=(1, 2), prompt_len=6, new_tokens=3, dtype=torch.float32, device="cpu", reps=1,
                  paths=("bf16", "int4"), compile="eager", before_measure=before_measure)
    assert seen == [(p, b) for p in ("bf16", "int4", bd.NO_LINEARS) for b in (1, 2)]  # the order of value


def test_rates_use_the_bytes_per_step_and_the_fixed_cost():
    shape = bd.LLAVA_7B_LM
    row = {"path": "int4", "batch": 1, "prompt_len": 128, "new_tokens": 256, "decode_ms_per_step": 4.0}
    bd._rates(row, shape, fixed_ms=1.0, peak_gbps=4800.0, copy_gbps=4300.0)
    assert row["gb_per_step"] == pytest.approx(3.8032, abs=1e-4)
    assert row["gb_per_s"] == pytest.approx(3.8032 / 4e-3, rel=1e-4)
    assert row["pct_peak_bw"] == pytest.approx(100 * row["gb_per_s"] / 4800)
    assert row["linear_gb_per_s"] == pytest.approx(3.33919 / 3e-3, rel=1e-4)  # linears over 4 - 1 ms
    bd._rates(row, shape, fixed_ms=5.0, peak_gbps=None, copy_gbps=None)  # fixed cost above the step: no rate
    assert row["linear_gb_per_s"] is None and row["pct_peak_bw"] is None


def test_summary_ratios_and_targets():
    def row(b, path, tps, peak):
        return {"batch": b, "path": path, "decode_tokens_per_s": tps, "peak_mem_gib": peak}

    summary = bd.summarize([row(1, "bf16", 100.0, 14.0), row(1, "int4", 350.0, 5.0), row(8, "bf16", 700.0, 15.0),
                            row(8, "int4", 1400.0, 6.0)])
    assert summary["int4@batch1"]["speedup_vs_bf16"] == pytest.approx(3.5)
    assert summary["int4@batch1"]["meets_speedup_target"] and summary["int4@batch1"]["meets_memory_target"]
    assert summary["int4@batch1"]["memory_ratio_vs_bf16"] == pytest.approx(2.8)
    assert not bd.decode_report.summarize([row(1, "bf16", 100.0, 14.0), row(1, "int4", 300.0, 5.0)])[
        "int4@batch1"]["meets_speedup_target"]
    # both targets are stated at batch 1: at batch 8 the bf16 KV cache, read whole by both paths, leaves an
    # ideal ratio of 2.84x, under the 3.3x target
    assert summary["int4@batch8"]["meets_speedup_target"] is None and summary["int4@batch8"]["target_speedup"] is None
    assert summary["int4@batch8"]["meets_memory_target"] is None


def test_summary_states_the_ratio_the_bytes_allow_per_batch():
    shape = dataclasses.asdict(bd.LLAVA_7B_LM)
    rows = [{"batch": b, "path": p, "decode_tokens_per_s": tps, "prompt_len": 128, "new_tokens": 256}
            for b, p, tps in [(1, "bf16", 300.0), (1, "int4", 900.0), (8, "bf16", 2000.0), (8, "int4", 5000.0)]]
    summary = bd.decode_report.summarize(rows, "NVIDIA H200", shape)
    assert summary["int4@batch1"]["ideal_speedup"] == pytest.approx(3.528, abs=1e-3)
    assert summary["int4@batch8"]["ideal_speedup"] == pytest.approx(2.844, abs=1e-3)
    assert summary["int4@batch8"]["fraction_of_ideal"] == pytest.approx(2.5 / 2.844, abs=1e-3)
    text = bd.decode_report.markdown({"shape": shape, "device": "NVIDIA H200", "rows": rows, "summary": summary})
    assert "of the 3.53x the bytes allow" in text and "of the 2.84x the bytes allow" in text


def test_unknown_path_is_rejected():
    w = bd.gk.quantize_rtn(torch.randn(64, 128))
    with pytest.raises(ValueError, match="path must be one of"):
        bd._linear("fp8", w, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="path must be one of"):
        bd.path_unavailable("fp8", torch.float32, "cpu")
