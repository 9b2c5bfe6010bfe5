"""Real model shapes, in one place, for every benchmark.

Linear layers are (out_features, in_features) as stored in nn.Linear.weight.
"""

# LLaVA-1.5-7B language backbone (Vicuna-7B / Llama-2-7B): hidden 4096, MLP 11008, vocab 32000.
LLAVA_7B = {
    "hidden": 4096, "vocab": 32000, "visual_tokens": 576,
    "linears": {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)},
}
# LLaVA-1.5-13B (the teacher): hidden 5120, MLP 13824.
LLAVA_13B = {
    "hidden": 5120, "vocab": 32000, "visual_tokens": 576,
    "linears": {"qkvo": (5120, 5120), "gate_up": (13824, 5120), "down": (5120, 13824)},
}
# Qwen2-VL-2B language backbone: hidden 1536, MLP 8960, kv heads 2 x 128, vocab 151936.
QWEN2VL_2B = {
    "hidden": 1536, "vocab": 151936,
    "linears": {"q_o": (1536, 1536), "k_v": (256, 1536), "gate_up": (8960, 1536), "down": (1536, 8960)},
}
# Qwen2-VL-7B (the teacher): hidden 3584, MLP 18944, vocab 152064 (padding rows beyond 151936).
QWEN2VL_7B = {
    "hidden": 3584, "vocab": 152064,
    "linears": {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (18944, 3584), "down": (3584, 18944)},
}

# (name, out_features, in_features) for weight benchmarks (LSQ, W4A16).
LINEAR_SHAPES = [
    ("llava7b.qkvo", 4096, 4096),
    ("llava7b.gate_up", 11008, 4096),
    ("llava7b.down", 4096, 11008),
    ("qwen2vl2b.q_o", 1536, 1536),
    ("qwen2vl2b.gate_up", 8960, 1536),
    ("qwen2vl2b.down", 1536, 8960),
]
# Small stand-ins of the same aspect ratios for CPU runs (what CI has).
CPU_LINEAR_SHAPES = [("small.square", 512, 512), ("small.up", 1024, 256), ("small.down", 256, 1024)]
