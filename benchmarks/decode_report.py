"""The decode benchmark's arithmetic and its report: bytes read per token, ceilings, targets, Markdown.

Pure Python on purpose (no torch, no grace_kernels): gpu_acceptance.py writes its summary from the JSON
files with this module, in a process that never imports the package (which it could not: on the GPU day
the package is installed by one of its own steps, after it started).

Bytes read per decode step of a Llama decoder with L layers, hidden H, MLP width I, vocabulary V, batch B,
and a static KV cache of T positions (the engine attends over the whole buffer, masked):

    linears   L * (4 H^2 + 3 H I) * w      w = 2 bytes (bf16), or 1/2 + s/g for INT4 codes with one
                                           s = 2-byte scale per g = 128 weights (0.515625 bytes)
    LM head   V * H * 2                    bf16 on every path
    norms     (2 L + 1) * H * 2
    KV cache  B * L * 2 * H * T * 2        keys and values, bf16, every position of the buffer
    (the B embedding rows, B * H * 2, are negligible and not counted)

LLaVA-1.5-7B's language model (L 32, H 4096, I 11008, V 32000), batch 1, T = 128 + 256 = 384:
linears 12.952 GB (bf16) / 3.339 GB (INT4), LM head 0.262 GB, KV cache 0.201 GB: 13.42 GB and 3.80 GB per
token, ceilings 358 and 1,262 tokens/s at 4.8 TB/s, an ideal ratio of 3.53x (:func:`ceilings`).
"""

from __future__ import annotations

PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "A100-SXM4-80GB": 2039.0}  # data sheets
COPY_GBPS = {"H200": 4300.0}  # device-to-device copy rate measured on such machines (the preflight remeasures)
TARGET_SPEEDUP = 3.3        # INT4 decode tokens/s over bf16, batch 1 (the bytes allow 3.53x; at batch 8, 2.84x:
                            # the bf16 KV cache, read whole by both paths, is 11% of bf16's bytes and 31% of INT4's)
TARGET_MEMORY_RATIO = 2.2   # bf16 peak memory over INT4's, batch 1
TARGET_LINEAR_BW = 0.8      # INT4 linears' achieved bandwidth over the data-sheet peak
TARGET_GEMM_SPEEDUP = 3.0   # W4A16 GEMM over cuBLAS on the dequantized weight, M <= 16, LLaVA-7B layers
GROUP = 128
INT4_BYTES_PER_WEIGHT = 0.5 + 2 / GROUP


def linear_params(shape: dict) -> int:
    """Weights of the backbone linears (q, k, v, o, gate, up, down of every layer)."""
    h, i = shape["hidden"], shape["intermediate"]
    return shape["layers"] * (4 * h * h + 3 * h * i)


def bytes_per_step(shape: dict, path: str, batch: int, cache_len: int) -> dict:
    """Bytes a decode step reads, by part (module docstring): {"linears", "lm_head", "norms", "kv", "total"}."""
    if batch < 1 or cache_len < 1:
        raise ValueError(f"batch and cache_len must be positive, got {batch}, {cache_len}")
    h, layers = shape["hidden"], shape["layers"]
    w = 2.0 if path == "bf16" else INT4_BYTES_PER_WEIGHT
    parts = {"linears": linear_params(shape) * w, "lm_head": shape["vocab"] * h * 2.0,
             "norms": (2 * layers + 1) * h * 2.0, "kv": batch * layers * 2 * h * cache_len * 2.0}
    parts["total"] = sum(parts.values())
    return parts


def ceilings(shape: dict, batch: int = 1, cache_len: int = 384, gbps: float = 4800.0) -> dict:
    """{path: (GB per step, tokens/s at ``gbps``)} for bf16 and INT4, and their ratio."""
    out = {}
    for path in ("bf16", "int4"):
        gb = bytes_per_step(shape, path, batch, cache_len)["total"] / 1e9
        out[path] = (gb, batch * gbps / gb)
    out["ratio"] = out["int4"][1] / out["bf16"][1]
    return out


def device_limit(table: dict, device: str) -> float | None:
    return next((v for k, v in table.items() if k in device), None)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def summarize(rows: list[dict], device: str = "", shape: dict | None = None) -> dict:
    """Each INT4 path against bf16 per batch: tokens/s ratio, peak-memory ratio (allocated and reserved),
    the linears' bandwidth against the peak, each with its target (speed and memory: batch 1) and whether
    the measurement meets it; with ``shape``, the ideal ratio at that batch (bf16's bytes per step over
    INT4's, :func:`bytes_per_step`) and the fraction of it reached."""
    by = {(r["batch"], r["path"]): r for r in rows}
    peak = device_limit(PEAK_GBPS, device)
    out = {}
    for (b, path), r in by.items():
        base = by.get((b, "bf16"))
        if path == "bf16" or base is None:
            continue
        speedup = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        entry = {"speedup_vs_bf16": speedup, "target_speedup": TARGET_SPEEDUP if b == 1 else None,
                 "meets_speedup_target": (speedup >= TARGET_SPEEDUP) if b == 1 else None}
        if shape is not None and r.get("prompt_len") and r.get("new_tokens"):
            cache_len = r["prompt_len"] + r["new_tokens"]
            ideal = (bytes_per_step(shape, "bf16", b, cache_len)["total"]
                     / bytes_per_step(shape, path, b, cache_len)["total"])
            entry.update(ideal_speedup=ideal, fraction_of_ideal=speedup / ideal)
        if r.get("peak_mem_gib") and base.get("peak_mem_gib"):
            ratio = base["peak_mem_gib"] / r["peak_mem_gib"]
            entry.update(memory_ratio_vs_bf16=ratio, target_memory_ratio=TARGET_MEMORY_RATIO if b == 1 else None,
                         meets_memory_target=(ratio >= TARGET_MEMORY_RATIO) if b == 1 else None)
            if r.get("peak_reserved_gib") and base.get("peak_reserved_gib"):
                entry["reserved_ratio_vs_bf16"] = base["peak_reserved_gib"] / r["peak_reserved_gib"]
        bw = r.get("linear_gb_per_s")
        if bw and peak:
            entry.update(linear_bw_fraction=bw / peak, target_linear_bw=TARGET_LINEAR_BW,
                         meets_linear_bw_target=bw / peak >= TARGET_LINEAR_BW)
        out[f"{path}@batch{b}"] = entry
    return out


def gemm_targets(bench: list[dict]) -> list[dict]:
    """The W4A16 GEMM target per (layer, M <= 16, dtype) of the LLaVA-7B shapes, from benchmark reports:
    our fused kernel's speedup over cuBLAS on the dequantized weight, against TARGET_GEMM_SPEEDUP."""
    out = []
    for report in bench:
        if report.get("op") != "w4a16_matmul":
            continue
        for row in report.get("rows", []):
            if row.get("backend") == "cuda" and str(row.get("layer", "")).startswith("llava7b.") \
                    and row.get("m", 99) <= 16 and row.get("speedup_vs_cublas") is not None:
                out.append({"layer": row["layer"], "m": row["m"], "dtype": row.get("dtype"),
                            "speedup_vs_cublas": row["speedup_vs_cublas"],
                            "meets": row["speedup_vs_cublas"] >= TARGET_GEMM_SPEEDUP})
    return out


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


COLUMNS = [("batch", "batch"), ("path", "path"), ("decode_tokens_per_s", "decode tok/s"),
           ("decode_ms_per_step", "ms/step"), ("fixed_ms_per_step", "fixed ms/step"),
           ("gb_per_s", "GB/s (all bytes)"), ("pct_peak_bw", "% of peak"), ("pct_copy_bw", "% of copy rate"),
           ("linear_gb_per_s", "linears GB/s"), ("prefill_ms", "prefill ms"), ("peak_mem_gib", "peak alloc GiB"),
           ("peak_reserved_gib", "peak reserved GiB"), ("weights_gib", "weights GiB"),
           ("logits_rel_err_vs_bf16", "logits rel err vs bf16"), ("tokens_equal_bf16", "tokens = bf16")]


def markdown(result: dict) -> str:
    """The decode table, the ratios with met / NOT met from the measurements, and skipped paths."""
    shape = result["shape"]
    step = result.get("step", {})
    lines = [f"Decode, {result['device']}: Llama {shape['hidden']} x {shape['layers']} layers; decode tokens/s "
             f"exclude prefill (batch x steps / replay time); step: {step.get('compile') or 'eager'}, "
             f"{step.get('graph') or 'no graph'}.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(_cell(r.get(key)) for key, _ in COLUMNS) + " |")
    for key, s in result.get("summary", {}).items():
        parts = [f"{s['speedup_vs_bf16']:.2f}x bf16 tokens/s" + (
            f" (target {s['target_speedup']}x: {_met(s['meets_speedup_target'])})" if s.get("target_speedup") else "")]
        if "ideal_speedup" in s:
            parts.append(f"{100 * s['fraction_of_ideal']:.0f}% of the {s['ideal_speedup']:.2f}x the bytes allow")
        if "memory_ratio_vs_bf16" in s:
            parts.append(f"peak allocated {s['memory_ratio_vs_bf16']:.2f}x less" + (
                f" (target {s['target_memory_ratio']}x: {_met(s['meets_memory_target'])})"
                if s.get("target_memory_ratio") else ""))
        if "reserved_ratio_vs_bf16" in s:
            parts.append(f"peak reserved {s['reserved_ratio_vs_bf16']:.2f}x less")
        if "linear_bw_fraction" in s:
            parts.append(f"linears at {100 * s['linear_bw_fraction']:.0f}% of peak bandwidth (target "
                         f"{100 * s['target_linear_bw']:.0f}%: {_met(s['meets_linear_bw_target'])})")
        lines.append(f"- {key}: " + "; ".join(parts))
    for path, why in result.get("skipped", {}).items():
        lines.append(f"- {path} skipped: {why}")
    return "\n".join(lines)
