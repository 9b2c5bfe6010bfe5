"""End-to-end decode: a language model with LLaVA-1.5-7B's backbone shapes, BF16 vs our INT4 vs torch's int4.

The model is a Llama decoder (hidden 4096, 32 layers of 32 heads, MLP 11008, vocab 32000, RMSNorm, RoPE,
SiLU-gated MLP, untied LM head: Vicuna-7B, the language backbone of LLaVA-1.5-7B) with random weights,
since decode speed and memory do not depend on the values. Three paths hold the same INT4 codes:

* ``bf16``     every backbone linear an ``nn.Linear`` whose weight is the dequantized INT4 weight in bf16;
* ``int4``     every backbone linear a ``grace_kernels.nn.W4A16Linear``, served as ``W4A16KernelLinear`` (the
               weight held once, in the CUDA kernel's layout) where the extension runs;
* ``int4pack`` every backbone linear torch's own int4 GEMM (``aten._weight_int4pack_mm``, bf16 only on CUDA),
               where it runs.

Embeddings, norms and the LM head stay in bf16 on every path (as in the paper's W4A16 setting).

Served as gpt-fast serves: a static KV cache sized for prompt + generated tokens, the prompt prefilled in
one eager forward, then each decode step compiled (torch.compile with inductor: RMSNorm, rotary, residuals
and the argmax fuse; our ops are traced through their fake implementations) and replayed as one CUDA graph
(captured once per batch size; the graph reads the current token and position from device buffers and
advances them itself, so no host work sits between steps). Why a hand-written decoder rather than
transformers' LlamaForCausalLM: a graph must see the same shapes and addresses on every replay, and
transformers' cache and mask bookkeeping differs between releases; this file's decoder has nothing
dynamic, and tests/test_decode.py checks that it computes what LlamaForCausalLM computes (and generates
what its generate does) with the same weights.

Reported per (batch, path): decode tokens/s (batch x steps over the graph-replay time, CUDA events;
prefill is not in it), prefill time, the bytes a step reads (decode_report.py) and the achieved bandwidth
against the data-sheet peak and the ~4.3 TB/s copy rate, the fixed per-step cost (the same step with every
backbone linear replaced by a weight-free broadcast, NoLinear) and the linears' own bandwidth (their bytes
over the step time minus that fixed cost), peak memory allocated and reserved (CUDA allocator peaks over
prefill + decode, the model resident) and the resident weight memory; the ratios against bf16 and the
targets (decode_report.py), each met / NOT met from the measurements. Agreement: relative error of each
path's prefill logits against bf16's and the fraction of generated tokens equal to bf16's (with random
weights greedy decoding drifts after the first difference).

On a CPU machine the same code runs a toy decoder in float32 (our reference path, torch's CPU int4
GEMM), the graph through its eager stand-in (EagerGraphs) and, from the command line, the step compiled
with the aot_eager backend; only the agreement is checked (tests/test_decode.py); no speed is claimed.

Usage: ``pytest benchmarks/bench_decode.py`` or ``python benchmarks/bench_decode.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_report  # noqa: E402
from graphs import CudaGraphs, EagerGraphs, graphs_for  # noqa: E402,F401  (EagerGraphs: tests name it here)
from graphs import sync as _sync  # noqa: E402
from graphs import timed as _timed  # noqa: E402
from harness import Report, device_name, hardware_limits  # noqa: E402
from peers import int4pack_mm, int4pack_weight  # noqa: E402
from shapes import LLAVA_7B  # noqa: E402

import grace_kernels as gk  # noqa: E402
from grace.io import write_json  # noqa: E402  (the project's one atomic write)
from grace_kernels.nn import W4A16KernelLinear, W4A16Linear  # noqa: E402

PATHS = ("bf16", "int4", "int4pack")
NO_LINEARS = "no-linears"  # the fixed-cost model: every backbone linear a NoLinear
GROUP = decode_report.GROUP


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAVA_7B_LM = LlamaShape(hidden=LLAVA_7B["hidden"], layers=32, heads=32,
                         intermediate=LLAVA_7B["linears"]["gate_up"][0], vocab=LLAVA_7B["vocab"])
# The CPU stand-in: every K a multiple of the group size (128), every N of 64.
TOY = LlamaShape(hidden=256, layers=2, heads=4, intermediate=512, vocab=512)


# ----------------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight: torch.Tensor):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, linears: dict[str, nn.Module]):
        super().__init__()
        self.heads, self.head_dim = shape.heads, shape.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (linears[n] for n in ("q", "k", "v", "o"))

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        # The static cache [B, H, T_max, D]: write this step's keys/values at their positions, attend over
        # the whole buffer with a mask (entries past the current position are stale or empty).
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, linears: dict[str, nn.Module]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linears["gate"], linears["up"], linears["down"]

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, linears: dict[str, nn.Module], norm_weights):
        super().__init__()
        self.self_attn, self.mlp = Attention(shape, linears), MLP(linears)
        self.input_layernorm = RMSNorm(shape.hidden, shape.eps, norm_weights[0])
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps, norm_weights[1])

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers, self.norm = nn.ModuleList(layers), norm


class LlamaDecoder(nn.Module):
    """Llama's forward with a static KV cache; module names follow transformers' LlamaForCausalLM."""

    def __init__(self, shape: LlamaShape, backbone: Backbone, lm_head: torch.Tensor):
        super().__init__()
        self.shape, self.model = shape, backbone
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)
        d = shape.head_dim
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=lm_head.device) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache):
        """tokens int64 [B, T] at positions int64 [T] -> (x [B, T, H], cos and sin [T, D], mask bool [T, T_max])."""
        x = self.model.embed_tokens(tokens)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        mask = cache.key_positions[None, :] <= positions[:, None]  # True = attend
        return x, emb.cos().to(x.dtype), emb.sin().to(x.dtype), mask

    def head(self, x: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """The final norm and the LM head: x [B, T, H] -> float32 logits [B, V] (last position) or [B, T, V]."""
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1]
        return self.lm_head(x).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache,
                last_only: bool = True) -> torch.Tensor:
        """tokens int64 [B, T] at positions int64 [T] -> logits float32 [B, V] (last position) or [B, T, V]."""
        x, cos, sin, mask = self.embed(tokens, positions, cache)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, positions, mask, cache.k[i], cache.v[i])
        return self.head(x, last_only)


@dataclasses.dataclass
class StaticCache:
    k: torch.Tensor  # [layers, B, H, T_max, D]
    v: torch.Tensor
    key_positions: torch.Tensor  # int64 [T_max]

    @classmethod
    def empty(cls, shape: LlamaShape, batch: int, max_len: int, dtype, device) -> StaticCache:
        size = (shape.layers, batch, shape.heads, max_len, shape.head_dim)
        return cls(torch.zeros(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device),
                   torch.arange(max_len, device=device))


# ----------------------------------------------------------------------------------------- the three paths


class Int4PackLinear(nn.Module):
    """A linear layer on torch's int4 GEMM (tinygemm): y = x @ W^T, W the same INT4 codes and scales."""

    def __init__(self, weight: gk.Int4Weight, device):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        packed, sz = int4pack_weight(weight, device)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)

    def forward(self, x):
        y = int4pack_mm(x.reshape(-1, self.in_features), (self.packed, self.scales_and_zeros), self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features)


class NoLinear(nn.Module):
    """A stand-in for a linear layer that reads no weight: y[..., n] = x[..., 0] (a broadcast), so that
    the step keeps every other operation (norms, rotary, attention, cache writes, residuals, LM head,
    sampling) and none of it can be folded away. Times the step's fixed cost."""

    def __init__(self, out_features: int, dtype, device):
        super().__init__()
        self.register_buffer("zero", torch.zeros(out_features, dtype=dtype, device=device))

    def forward(self, x):
        return x[..., :1] + self.zero


def _linear(path: str, weight: gk.Int4Weight, dtype, device, kernel_layout: bool) -> nn.Module:
    if path == "bf16":
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.dequantize().to(dtype), requires_grad=False)
        return layer
    if path == "int4":
        return (W4A16KernelLinear if kernel_layout else W4A16Linear).from_int4_weight(weight)
    if path == "int4pack":
        return Int4PackLinear(weight, device)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def build_model(shape: LlamaShape, path: str, *, dtype: torch.dtype, device, seed: int = 0) -> LlamaDecoder:
    """The decoder for ``path`` with seeded random weights: every path gets the same INT4 codes and scales
    (RTN of the same random weights, scales in bf16 on GPUs) and the same bf16 embeddings, norms and head.
    Built layer by layer so that only one float32 weight is alive at a time."""
    device = torch.device(device)
    scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    kernel_layout = (path == "int4" and device.type == "cuda"
                     and gk.select_backend("w4a16_matmul", device, has_cuda_impl=True) == "cuda")
    gen = torch.Generator(device=device)

    def randn(*size, std, seed_offset):
        gen.manual_seed(seed * 100_003 + seed_offset)
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std

    h, m = shape.hidden, shape.intermediate
    dims = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (m, h), "up": (m, h), "down": (h, m)}
    layers = []
    for i in range(shape.layers):
        linears = {}
        for j, (name, (n, k)) in enumerate(dims.items()):
            if path == NO_LINEARS:
                linears[name] = NoLinear(n, dtype, device)
                continue
            w4 = gk.quantize_rtn(randn(n, k, std=1 / math.sqrt(k), seed_offset=10 * i + j + 1), GROUP, scale_dtype)
            linears[name] = _linear(path, w4, dtype, device, kernel_layout)
        norms = [1 + 0.1 * randn(h, std=1.0, seed_offset=-(10 + 2 * i + r)).to(dtype) for r in (1, 2)]
        layers.append(DecoderLayer(shape, linears, norms))
    embed = randn(shape.vocab, h, std=1.0, seed_offset=-1).to(dtype)
    norm = RMSNorm(h, shape.eps, 1 + 0.1 * randn(h, std=1.0, seed_offset=-2).to(dtype))
    lm_head = randn(shape.vocab, h, std=1 / math.sqrt(h), seed_offset=-3).to(dtype)
    return LlamaDecoder(shape, Backbone(embed, layers, norm), lm_head).eval()


# ------------------------------------------------------------------------------------------------ engine


def _layer_step(layer, x, cos, sin, positions, mask, k_cache, v_cache):
    return layer(x, cos, sin, positions, mask, k_cache, v_cache)


class DecodeEngine:
    """Greedy generation with a static KV cache; each decode step replayed as one graph.

    ``graph``: False (eager steps), True (a CUDA graph on CUDA, :class:`EagerGraphs` elsewhere) or an
    object with the :class:`CudaGraphs` interface. ``compile``: None, or a torch.compile backend
    ("inductor" on GPUs; "eager"/"aot_eager" trace on CPU): the step is compiled as three functions, the
    embedding and rotary tables, one decoder layer (compiled once and reused by every layer, so that
    tracing costs one layer, not 32) and the final norm, LM head, argmax and bookkeeping. RMSNorm, rotary,
    residuals and sampling fuse; the project's ops are traced through their fake implementations.

    Raises ValueError for batch, prompt_len < 1, or new_tokens < 2 (the decode steps start at the second).
    """

    def __init__(self, model: LlamaDecoder, batch: int, prompt_len: int, new_tokens: int, *, graph=False,
                 compile: str | None = None):
        if batch < 1 or prompt_len < 1 or new_tokens < 2:
            raise ValueError(f"need batch >= 1, prompt_len >= 1, new_tokens >= 2; got {batch}, {prompt_len}, "
                             f"{new_tokens}")
        p = next(model.model.embed_tokens.parameters())
        self.model, self.prompt_len, self.new_tokens = model, prompt_len, new_tokens
        self.cache = StaticCache.empty(model.shape, batch, prompt_len + new_tokens, p.dtype, p.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.position = torch.zeros(1, dtype=torch.long, device=p.device)
        self.out = torch.zeros(batch, new_tokens, dtype=torch.long, device=p.device)
        self.compile = compile
        if compile is None:
            self._pre, self._layer, self._post = self._embed, _layer_step, self._finish
        else:
            self._pre, self._layer, self._post = (torch.compile(f, backend=compile, fullgraph=True, dynamic=False)
                                                  for f in (self._embed, _layer_step, self._finish))
        self.graph = None
        if graph is True:
            graph = graphs_for(p.device)
        self.graphs = graph or None
        if self.graphs is not None:
            self._capture()

    def _embed(self):
        return self.model.embed(self.token, self.position, self.cache)

    def _finish(self, x):
        nxt = self.model.head(x).argmax(-1, keepdim=True)
        # out[:, i + 1] for the token read at position prompt_len + i: the graph indexes by device values only
        self.out.index_copy_(1, self.position - (self.prompt_len - 1), nxt)
        self.token.copy_(nxt)
        self.position.add_(1)

    def _step(self) -> None:
        x, cos, sin, mask = self._pre()
        for i, layer in enumerate(self.model.model.layers):
            x = self._layer(layer, x, cos, sin, self.position, mask, self.cache.k[i], self.cache.v[i])
        self._post(x)

    @torch.no_grad()  # as decode() replays it: a compiled step guards on grad mode
    def _capture(self) -> None:
        # Warm-up (compilation, cuBLAS handles, Triton JIT) at the first decode position, so that its writes
        # land in bounds (out[:, 1], cache position prompt_len); prefill rewrites all of that state.
        with self.graphs.warmup():
            for _ in range(2):
                self.position.fill_(self.prompt_len)
                self._step()
        self.position.fill_(self.prompt_len)
        self.graph = self.graphs.capture(self._step)
        self.out.zero_()
        self.token.zero_()

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompt [B, P] (eager); returns its last-position logits [B, V] float32."""
        positions = torch.arange(self.prompt_len, device=prompt.device)
        logits = self.model(prompt, positions, self.cache)
        first = logits.argmax(-1, keepdim=True)
        self.out[:, :1].copy_(first)
        self.token.copy_(first)
        self.position.fill_(self.prompt_len)
        return logits

    @torch.no_grad()
    def decode(self) -> None:
        """The remaining new_tokens - 1 greedy steps."""
        for _ in range(self.new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()


def path_unavailable(path: str, dtype: torch.dtype, device) -> str | None:
    """Why a path cannot run here, or None: torch's int4 GEMM takes bf16 on CUDA, and may be missing."""
    device = torch.device(device)
    if path not in (*PATHS, NO_LINEARS):
        raise ValueError(f"path must be one of {PATHS} or {NO_LINEARS!r}, got {path!r}")
    if path != "int4pack":
        return None
    if device.type == "cuda" and dtype != torch.bfloat16:
        return "aten._weight_int4pack_mm takes bfloat16 activations on CUDA"
    try:
        w = gk.quantize_rtn(torch.randn(64, 256, device=device), GROUP,
                            torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
        x = torch.randn(3, 256, device=device, dtype=dtype)
        y = Int4PackLinear(w, device)(x).float()
        gold = x.float() @ w.dequantize().t()
        err = ((y - gold).norm() / gold.norm()).item()
    except (RuntimeError, NotImplementedError) as e:
        return f"torch's int4 GEMM does not run here: {type(e).__name__}: {str(e)[:200]}"
    return None if err < 2e-2 else f"torch's int4 GEMM disagrees with x @ dequant(W) (relative error {err:.2e})"


def _measure(model: LlamaDecoder, path: str, prompt: torch.Tensor, new_tokens: int, reps: int, *, graph, compile,
             before_measure) -> tuple[dict, torch.Tensor]:
    """One (path, batch): build the engine, warm up, time ``reps`` prefills and decodes. Returns the row and
    the last prefill's logits. Everything it allocates dies when it returns (nothing outlives the call but
    the row and the logits on the host), so the next measurement's peak memory counts only its own."""
    device = prompt.device
    on_gpu = device.type == "cuda"
    b, prompt_len = prompt.shape
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    compile_error = None
    try:
        engine = DecodeEngine(model, b, prompt_len, new_tokens, graph=graph, compile=compile)
    except Exception as e:  # a decode number from the eager step beats none; the row says why
        if compile is None:
            raise
        compile_error = f"{type(e).__name__}: {str(e)[:300]}"
        torch._dynamo.reset()
        engine = DecodeEngine(model, b, prompt_len, new_tokens, graph=graph, compile=None)
    engine.prefill(prompt)  # warm-up: lazy init and W4A16's crossover measurement at prefill's M
    engine.decode()
    if before_measure is not None:
        before_measure(path=path, batch=b, model=model, engine=engine)
    prefill_s, decode_s = [], []
    logits = None
    for _ in range(reps):
        t0 = time.perf_counter()
        logits = engine.prefill(prompt)
        _sync(device)
        prefill_s.append(time.perf_counter() - t0)
        decode_s.append(_timed(engine.decode, device))
    _sync(device)
    decode = statistics.median(decode_s)
    row = {"batch": b, "path": path, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "decode_tokens_per_s": b * (new_tokens - 1) / decode, "decode_ms_per_step": 1e3 * decode / (new_tokens - 1),
           "prefill_ms": 1e3 * statistics.median(prefill_s),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if on_gpu else None,
           "graph": engine.graphs.name if engine.graphs is not None else None,
           "compile": engine.compile, "compile_error": compile_error, "tokens": engine.out.cpu()}
    return row, logits.cpu()


def _rates(row: dict, shape: LlamaShape, fixed_ms: float | None, peak_gbps: float | None, copy_gbps) -> None:
    """Bytes per step, achieved bandwidth (all bytes, and the linears' alone over the step time minus the
    fixed cost) against the peak and the copy rate."""
    parts = decode_report.bytes_per_step(dataclasses.asdict(shape), row["path"], row["batch"],
                                         row["prompt_len"] + row["new_tokens"])
    step_s = row["decode_ms_per_step"] / 1e3
    row["gb_per_step"] = parts["total"] / 1e9
    row["gb_per_s"] = parts["total"] / 1e9 / step_s
    row["peak_gbps"] = peak_gbps
    row["pct_peak_bw"] = 100 * row["gb_per_s"] / peak_gbps if peak_gbps else None
    row["pct_copy_bw"] = 100 * row["gb_per_s"] / copy_gbps if copy_gbps else None
    row["fixed_ms_per_step"] = fixed_ms
    linear_s = step_s - fixed_ms / 1e3 if fixed_ms is not None else None
    row["linear_gb_per_s"] = parts["linears"] / 1e9 / linear_s if linear_s and linear_s > 0 else None


def run_decode(shape: LlamaShape = LLAVA_7B_LM, *, batches=(1, 8), prompt_len: int = 128, new_tokens: int = 256,
               dtype: torch.dtype = torch.bfloat16, device=None, reps: int = 3, paths=PATHS, seed: int = 0,
               graph=True, compile: str | None = "auto", fixed_cost: bool = True, before_measure=None,
               progress=None) -> dict:
    """Run every path at every batch size; returns {"rows": [...], "skipped": {path: why}, "summary": {...},
    "step": {...}, "fixed_ms_per_step": {batch: ms}}.

    ``graph``/``compile`` as :class:`DecodeEngine` (compile "auto": inductor on CUDA, none elsewhere; a
    compile that fails falls back to the eager step, and the row says why). ``fixed_cost``: also time the
    step with every backbone linear replaced by :class:`NoLinear` (the per-step cost that is not weight
    streaming). ``before_measure(path=, batch=, model=, engine=)`` is called before each timing (tests).
    ``progress(result)`` is called with the result so far after each measured row (so that a run stopped
    at a budget keeps what it measured). The order is the order of value for such a run: bf16 and int4
    (the targets' comparison), then the fixed cost, then torch's int4 (a peer); the rates that need the
    fixed cost are filled in once it is measured.

    Each row: batch, path, decode_tokens_per_s (prefill excluded), decode_ms_per_step, prefill_ms,
    peak_mem_gib / peak_reserved_gib (CUDA allocator peaks over prefill + decode, model resident),
    weights_gib, gb_per_step, gb_per_s, pct_peak_bw, pct_copy_bw, fixed_ms_per_step, linear_gb_per_s,
    logits_rel_err_vs_bf16, tokens_equal_bf16 (fraction), tokens (the generated ids, [B, new_tokens]).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if compile == "auto":
        compile = "inductor" if on_gpu else None
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = {b: torch.randint(0, shape.vocab, (b, prompt_len), generator=gen).to(device) for b in batches}
    peak_gbps = hardware_limits()[0] if on_gpu else None
    # the copy rate the acceptance run's preflight measured on this machine, else the table's
    copy_gbps = (float(os.environ["GRACE_COPY_GBPS"]) if os.environ.get("GRACE_COPY_GBPS") else
                 decode_report.device_limit(decode_report.COPY_GBPS, device_name())) if on_gpu else None
    rows, skipped, reference, fixed = [], {}, {}, {}
    opts = {"graph": graph, "compile": compile, "before_measure": before_measure}
    peers = [p for p in paths if p == "int4pack"]
    order = [p for p in paths if p not in peers] + ([NO_LINEARS] if fixed_cost else []) + peers

    def rates(row: dict) -> None:
        _rates(row, shape, fixed.get(row["batch"]), peak_gbps, copy_gbps)

    for path in order:
        why = path_unavailable(path, dtype, device)
        if why is not None:
            skipped[path] = why
            continue
        _release(device)
        base = torch.cuda.memory_allocated() if on_gpu else 0
        model = build_model(shape, path, dtype=dtype, device=device, seed=seed)
        weights = (torch.cuda.memory_allocated() - base) if on_gpu else sum(
            t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        for b in batches:
            row, logits = _measure(model, path, prompts[b], new_tokens, reps, **opts)
            if path == NO_LINEARS:
                fixed[b] = row["decode_ms_per_step"]
                continue
            row.update(dtype=str(dtype).removeprefix("torch."), weights_gib=weights / 2 ** 30)
            tokens = row.pop("tokens")
            if path == PATHS[0]:
                reference[b] = (logits, tokens)
            if b in reference:
                ref_logits, ref_tokens = reference[b]
                row["logits_rel_err_vs_bf16"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                row["tokens_equal_bf16"] = (tokens == ref_tokens).float().mean().item()
            row["tokens"] = tokens.tolist()
            rows.append(row)
            if progress is not None:
                progress(_result(shape, device, rows, skipped, compile, fixed, rates))
        del model
        if compile is not None:
            torch._dynamo.reset()  # its caches hold the compiled step's module, hence the model
    _release(device)
    return _result(shape, device, rows, skipped, compile, fixed, rates)


def _result(shape, device, rows, skipped, compile, fixed, rates) -> dict:
    for row in rows:  # again each time: rows measured before the fixed cost get the rates that need it
        rates(row)
    on_gpu = device.type == "cuda"
    name = device_name() if on_gpu else str(device)
    step = {"graph": rows[0]["graph"] if rows else None, "compile": compile}
    # CPU: agreement only, no speed claimed
    summary = decode_report.summarize(rows, name, dataclasses.asdict(shape)) if on_gpu else {}
    return {"shape": dataclasses.asdict(shape), "device": name, "rows": list(rows), "skipped": dict(skipped),
            "step": step, "fixed_ms_per_step": dict(fixed),
            "summary": summary}


def _release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> dict:
    """See :func:`decode_report.summarize`."""
    return decode_report.summarize(rows)


markdown = decode_report.markdown


def _report(result: dict) -> None:
    report = Report("decode")
    for r in result["rows"]:
        report.add(**{k: v for k, v in r.items() if k != "tokens"}, device=result["device"])
    report.finish()
    print(markdown(result))


def test_decode():
    """GPU: the full LLaVA-1.5-7B backbone; CPU: the toy decoder (agreement only, see tests/test_decode.py)."""
    if torch.cuda.is_available():
        result = run_decode()
    else:
        result = run_decode(TOY, batches=(1, 2), prompt_len=16, new_tokens=8, dtype=torch.float32, reps=1)
    _report(result)
    for r in result["rows"]:
        # Loose on purpose: the paths round differently, and 32 random layers amplify that; a broken GEMM
        # gives errors of order 1.
        assert r["logits_rel_err_vs_bf16"] < 0.1, r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the result here")
    p.add_argument("--toy", action="store_true", help="the small CPU-sized decoder (the default without a GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--compile", default="auto",
                   help="torch.compile backend of the step: auto (inductor on CUDA; on CPU aot_eager, which "
                        "traces the step as inductor would), none, or a backend name")
    p.add_argument("--no-graph", action="store_true", help="eager steps, no graph capture")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1:
        p.error("--batches must be positive")
    gpu = torch.cuda.is_available()
    compile = {"none": None, "auto": "auto" if gpu else "aot_eager"}.get(args.compile, args.compile)
    opts = {"reps": args.reps, "batches": batches, "compile": compile, "graph": not args.no_graph}
    if args.json:
        opts["progress"] = lambda result: write_json(result, args.json)
    if args.toy or not gpu:
        result = run_decode(TOY, prompt_len=16, new_tokens=8, dtype=torch.bfloat16 if gpu else torch.float32, **opts)
    else:
        result = run_decode(**opts)
    _report(result)
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
