"""``grace plan`` (its options: :mod:`grace.cli.plan`): will a teacher -> student GRACE run fit on a GPU?
Parameter counts from the real architectures, a per-GPU memory estimate and a verdict.

The architectures are the published Hugging Face configs of LLaVA-1.5 (7B, 13B), Qwen2-VL (2B, 7B),
Qwen2.5-VL (3B, 7B) and Qwen3-VL (2B, 8B), written out below (no model hub is reachable here) and
instantiated on the meta device, so the counts are the modules' own, not a formula's. A local
checkpoint directory (or its config.json) works the same way.

Memory model, per GPU, for a run with W ranks (``torch.distributed`` FSDP2 as grace.train shards it:
one unit per decoder block, then the root; frozen vision tower replicated; teacher replicated):

    teacher            P_T * 2                          bf16 weights on every rank
    student params     P_train * p / W + P_vis * 2      trainable (sharded, p bytes each) + frozen vision (bf16)
    grads              P_train * p / W
    AdamW states       2 * P_train * p / W              exp_avg and exp_avg_sq, in the parameters' dtype
    LSQ scales         S * 16 / W                       float32 log-scale, its grad and two AdamW moments;
                                                        S = (quantized weights) / group_size
    FSDP gathers       (2 * max block + root) * p       the unsharded root (embeddings, LM head) during the
                                                        loss plus the current and the prefetched block
    activations        see :func:`activation_bytes`     bf16, flash/SDPA attention (no s x s matrix)
    teacher forward    see :func:`activation_bytes`     no grad: every hidden state kept for RCKA
    loss chunks        see :func:`loss_chunk_bytes`     the fused loss's float32 [rows, V] buffers

p is 4 for float32 master weights (today's trainer) and 2 for bf16 ones. A run fits when the total is at
most ``(1 - headroom)`` of the GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation
take the rest. Every number is an estimate for planning; nothing here was measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
from torch import nn

from grace.config import TrainConfig
from grace.families import check_pair

GiB = 2 ** 30


def _llava(text: dict) -> dict:
    """LLaVA-1.5 (llava-hf conversion): CLIP ViT-L/14 at 336 px, a two-layer GELU MLP projector, a Vicuna
    (Llama-2) language model whose vocabulary is padded from 32000 to 32064 rows."""
    return {
        "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, **text},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                          "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"},
    }


def _qwen2_vl(text: dict, merger_out: int, tie: bool) -> dict:
    """Qwen2-VL: a 32-block ViT (width 1280, patch 14, 2 x 2 merge) whose merger projects to the LM width."""
    return {
        "model_type": "qwen2_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": tie,
        "text_config": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": tie,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                        **text},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": merger_out, "mlp_ratio": 4,
                          "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def _qwen2_5_vl(text: dict, merger_out: int, tie: bool) -> dict:
    """Qwen2.5-VL: a 32-block windowed ViT (width 1280, SwiGLU 3420, full attention in blocks 7/15/23/31)."""
    return {
        "model_type": "qwen2_5_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": tie,
        "text_config": {"rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "tie_word_embeddings": tie,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                        **text},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": merger_out,
                          "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    }


def _qwen3_vl(text: dict, vision: dict, tie: bool) -> dict:
    """Qwen3-VL: a Qwen3 language model (QK-norm, head_dim 128) and a ViT with patch 16 and DeepStack mergers."""
    return {
        "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": tie,
        "text_config": {"vocab_size": 151936, "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                        "tie_word_embeddings": tie, "rope_parameters": {
                            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True}, **text},
        "vision_config": {"num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh", **vision},
    }


# The published config.json hyper-parameters of each checkpoint (llava-hf/llava-1.5-{7b,13b}-hf,
# Qwen/Qwen2-VL-{2B,7B}-Instruct, Qwen/Qwen2.5-VL-{3B,7B}-Instruct, Qwen/Qwen3-VL-{2B,8B}-Instruct).
ARCHITECTURES: dict[str, dict] = {
    "llava-1.5-7b": _llava({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32}),
    "llava-1.5-13b": _llava({"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                             "num_attention_heads": 40, "num_key_value_heads": 40}),
    "qwen2-vl-2b": _qwen2_vl({"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2},
                             merger_out=1536, tie=True),
    "qwen2-vl-7b": _qwen2_vl({"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4},
                             merger_out=3584, tie=False),
    "qwen2.5-vl-3b": _qwen2_5_vl({"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                                  "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2},
                                 merger_out=2048, tie=True),
    "qwen2.5-vl-7b": _qwen2_5_vl({"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                  "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4},
                                 merger_out=3584, tie=False),
    "qwen3-vl-2b": _qwen3_vl({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                              "num_attention_heads": 16, "num_key_value_heads": 8},
                             {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048,
                              "deepstack_visual_indexes": [5, 11, 17]}, tie=True),
    "qwen3-vl-8b": _qwen3_vl({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                              "num_attention_heads": 32, "num_key_value_heads": 8},
                             {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
                              "deepstack_visual_indexes": [8, 16, 24]}, tie=False),
}

# The pairs the paper and the authors' release train (teacher, student).
STANDARD_PAIRS = (("llava-1.5-13b", "llava-1.5-7b"), ("qwen2-vl-7b", "qwen2-vl-2b"), ("qwen3-vl-8b", "qwen3-vl-2b"))


def load_config(name_or_path: str):
    """A transformers config: a name from :data:`ARCHITECTURES`, a checkpoint directory or its config.json.

    Raises:
        ValueError: neither a known name nor an existing path.
    """
    from transformers import AutoConfig

    if name_or_path in ARCHITECTURES:
        spec = dict(ARCHITECTURES[name_or_path])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model {name_or_path!r} is neither one of {sorted(ARCHITECTURES)} nor a checkpoint "
                         f"directory or config.json")
    with open(path) as f:
        spec = json.load(f)
    if "model_type" not in spec:
        raise ValueError(f"{path} has no model_type")
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def meta_model(config) -> nn.Module:
    """The model of ``config`` with every tensor on the meta device (no memory, no initialisation cost)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of one VLM (tied embeddings counted once) and the shapes the memory model needs."""
    name: str
    total: int
    language: int             # decoder blocks, embeddings, final norm and LM head
    vision: int               # the vision tower (and its merger where the family keeps it inside)
    projector: int            # parameters in neither (LLaVA's multi_modal_projector)
    decoder_layers: int
    max_layer: int            # parameters of the largest decoder block
    root: int                 # parameters outside the decoder blocks and the vision tower (FSDP's root unit)
    quantized: int            # weights of the linear layers GRACE quantizes (the language backbone's)
    hidden: int
    intermediate: int
    q_dim: int                # num_attention_heads * head_dim
    kv_dim: int               # num_key_value_heads * head_dim
    vocab: int

    def lsq_scales(self, group_size: int) -> int:
        return self.quantized // group_size


def count_parameters(name_or_path: str, *, group_size: int = 128) -> ModelCounts:
    """Instantiate ``name_or_path`` on the meta device and count its parameters by part."""
    from grace.families import family_of
    from grace.quantize import select_linears

    config = load_config(name_or_path)
    model = meta_model(config)
    family = family_of(config)
    params = dict(model.named_parameters())      # deduplicated: a tied LM head appears once
    vision_ids = {id(p) for p in family.vision_tower(model).parameters()}
    layers = family.decoder_layers(model)
    layer_ids = {id(p) for p in layers.parameters()}
    lm_ids = {id(p) for p in model.model.language_model.parameters()} | {id(family.lm_head(model).weight)}
    total = sum(p.numel() for p in params.values())
    vision = sum(p.numel() for p in params.values() if id(p) in vision_ids)
    language = sum(p.numel() for p in params.values() if id(p) in lm_ids)
    max_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    quantized = sum(m.weight.numel() for _, m in select_linears(model, group_size=group_size))
    return ModelCounts(
        name=name_or_path, total=total, language=language, vision=vision, projector=total - language - vision,
        decoder_layers=len(layers), max_layer=max_layer,
        root=sum(p.numel() for p in params.values() if id(p) not in layer_ids and id(p) not in vision_ids),
        quantized=quantized, hidden=text.hidden_size, intermediate=text.intermediate_size,
        q_dim=text.num_attention_heads * head_dim, kv_dim=text.num_key_value_heads * head_dim,
        vocab=text.vocab_size)


def layer_activation_bytes_per_token(m: ModelCounts) -> int:
    """bf16 bytes one decoder block keeps for its backward, per token: both norms' inputs and outputs,
    q, k, v, the attention output, the residual, and gate, up, act(gate), act(gate) * up of the SwiGLU MLP."""
    return 2 * (5 * m.hidden + 2 * m.q_dim + 2 * m.kv_dim + 4 * m.intermediate)


def activation_bytes(m: ModelCounts, tokens: int, *, checkpointing: bool, training: bool = True) -> int:
    """Peak activation bytes of one forward over ``tokens`` tokens (batch x sequence) in bf16.

    Training (the student): every block keeps :func:`layer_activation_bytes_per_token` per token and the
    bf16 copy of its fake-quantized weights (autocast casts them for the matmul and autograd saves the
    cast); with gradient checkpointing only each block's input is kept, plus one block recomputed in full.
    No grad (the teacher): one block's transients plus every block's output, which ``output_hidden_states``
    holds until the forward returns (RCKA needs the penultimate one).
    """
    per_layer = tokens * layer_activation_bytes_per_token(m) + 2 * m.max_layer
    if not training:
        return tokens * layer_activation_bytes_per_token(m) + (m.decoder_layers + 1) * tokens * m.hidden * 2
    if checkpointing:
        return m.decoder_layers * tokens * m.hidden * 2 + per_layer
    return m.decoder_layers * per_layer


def loss_chunk_bytes(student: ModelCounts, teacher: ModelCounts, tokens: int) -> int:
    """Memory of grace_kernels.fused_linear_grace_loss over ``tokens`` rows on a GPU: per chunk of
    ``default_chunk_size`` rows, five float32 [rows, V] buffers (both models' logits, both
    probabilities, the gradient w.r.t. the student logits), the float32 dW accumulator of the student head
    and the float32 dX [tokens, H_S]. The [tokens, V] logits are never formed whole."""
    from grace_kernels import default_chunk_size

    vocab = max(student.vocab, teacher.vocab)
    rows = default_chunk_size(tokens, vocab, torch.device("cuda"))
    return 5 * rows * vocab * 4 + student.vocab * student.hidden * 4 + tokens * student.hidden * 4


def parse_memory(text: str) -> int:
    """Bytes of "80GiB", "80GB" (decimal), "81920MiB" or a bare number of GiB.

    Raises:
        ValueError: anything else, or a value that is not positive.
    """
    units = {"": GiB, "gib": GiB, "gb": 10 ** 9, "mib": 2 ** 20, "mb": 10 ** 6, "tib": 2 ** 40, "tb": 10 ** 12}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"gpu_memory must look like 80GiB, 80GB or 81920MiB, got {text!r}")
    value = float(match.group(1)) * units[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"gpu_memory must be positive, got {text!r}")
    return int(value)


@dataclasses.dataclass
class MemoryPlan:
    teacher: ModelCounts
    student: ModelCounts
    world_size: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    master_dtype: str
    gpu_memory: int
    headroom: float
    rows: dict[str, int]      # component -> bytes per GPU

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1.0 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def format(self) -> str:
        s, t = self.student, self.teacher
        lines = [
            f"GRACE plan: teacher {t.name} ({t.total / 1e9:.2f}B params) -> student {s.name} "
            f"({s.total / 1e9:.2f}B params)",
            f"  world size {self.world_size}, per-rank batch {self.batch_size}, sequence {self.seq_len}, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
            f"{self.master_dtype} master weights",
            f"  student: language {s.language / 1e9:.3f}B, vision {s.vision / 1e9:.3f}B, "
            f"projector {s.projector / 1e6:.1f}M, quantized weights {s.quantized / 1e9:.3f}B",
            f"  {'component':<18}{'GiB / GPU':>10}",
        ]
        lines += [f"  {name:<18}{b / GiB:>10.2f}" for name, b in self.rows.items()]
        lines.append(f"  {'total':<18}{self.total / GiB:>10.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {verdict} in {self.gpu_memory / GiB:.1f} GiB ({self.usable / GiB:.1f} GiB usable after "
                     f"{self.headroom:.0%} headroom)")
        return "\n".join(lines)


def plan(teacher: str | ModelCounts, student: str | ModelCounts, *, world_size: int = 8,
         batch_size: int = TrainConfig.batch_size, seq_len: int = TrainConfig.max_length,
         gradient_checkpointing: bool = TrainConfig.gradient_checkpointing, gpu_memory: int | str = 80 * GiB,
         master_dtype: str = "float32", group_size: int = TrainConfig.group_size, headroom: float = 0.1,
         freeze_vision: bool = TrainConfig.freeze_vision) -> MemoryPlan:
    """The per-GPU memory of one GRACE run (module docstring for the model). The defaults of the settings a
    run also has (per-rank batch, sequence length, gradient checkpointing, group size, frozen vision tower) are
    ``grace train``'s (:class:`grace.config.TrainConfig`).

    Raises:
        ValueError: a non-positive world size, batch or sequence length; an unknown ``master_dtype``;
            ``headroom`` outside [0, 1); an unknown model; a bad ``gpu_memory``; a teacher and student (names
            or checkpoints) that ``grace train`` refuses as a pair (:func:`grace.families.check_pair`).
    """
    for name, value in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("group_size", group_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if master_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"master_dtype must be 'float32' or 'bfloat16', got {master_dtype!r}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    gpu_bytes = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    if gpu_bytes <= 0:
        raise ValueError(f"gpu_memory must be positive, got {gpu_memory!r}")
    if not isinstance(teacher, ModelCounts) and not isinstance(student, ModelCounts):
        check_pair(load_config(teacher), load_config(student))
    t = teacher if isinstance(teacher, ModelCounts) else count_parameters(teacher, group_size=group_size)
    s = student if isinstance(student, ModelCounts) else count_parameters(student, group_size=group_size)
    p = 4 if master_dtype == "float32" else 2
    frozen = s.vision if freeze_vision else 0
    trainable = s.total - frozen
    tokens = batch_size * seq_len
    rows = {
        "teacher (bf16)": t.total * 2,
        "student params": trainable * p // world_size + frozen * 2,
        "grads": trainable * p // world_size,
        "AdamW states": 2 * trainable * p // world_size,
        "LSQ scales": s.lsq_scales(group_size) * 16 // world_size,
        "FSDP gathers": (2 * s.max_layer + s.root) * p,
        "activations": activation_bytes(s, tokens, checkpointing=gradient_checkpointing),
        "teacher forward": activation_bytes(t, tokens, checkpointing=False, training=False),
        "loss chunks": loss_chunk_bytes(s, t, tokens),
    }
    return MemoryPlan(t, s, world_size, batch_size, seq_len, gradient_checkpointing, master_dtype, gpu_bytes,
                      headroom, rows)
