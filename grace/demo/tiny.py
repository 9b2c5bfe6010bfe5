"""Tiny local VLM checkpoints (LLaVA-1.5, Qwen2-VL and Qwen2.5-VL families) with a locally built tokenizer, chat
template and processor: what tests and the CPU demo train, since no model hub is reachable.

A teacher is larger than a student; both share one tokenizer and processor. Hidden sizes are
multiples of 128 so group-128 INT4 applies to every linear layer of the language backbone.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"]
QWEN_SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
DEFAULT_WORDS = ("what is the color shape of this object in image how many are there where red green blue yellow "
                 "circle square triangle top bottom left right middle center one two three four five six yes no "
                 "? . , objects").split()
CHAT_TEMPLATE = (   # a system turn's text comes first, unprefixed, as in LLaVA-1.5's own prompt format
    "{% for m in messages %}{% if m['role'] == 'system' %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}"
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }} {% endfor %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
SIZES = {  # (hidden, intermediate, layers, heads)
    "student": (128, 256, 2, 4),
    "teacher": (256, 512, 3, 4),
    # The demo's pair (grace.demo.run): same width, the teacher twice as deep (as LLaVA-1.5 13B has 40 layers to 7B's
    # 32); on the demo's task the 4-layer model learns what the 2-layer one cannot in the same steps.
    "demo-student": (128, 256, 2, 4),
    "demo-teacher": (128, 256, 4, 4),
}
IMAGE_SIZE, PATCH = 28, 14   # LLaVA: 2 x 2 patches, 4 image tokens per image
QWEN_IMAGE_SIZE = 56          # Qwen2-VL: 4 x 4 patches of 14, merged 2 x 2: 4 image tokens per image
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<|vision_start|> <|image_pad|> <|vision_end|> ")
QWEN3_PATCH = 16              # Qwen3-VL: 4 x 4 patches of 16 (64 px), merged 2 x 2: 4 image tokens per image
QWEN3_IMAGE_SIZE = 64
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
INITS = ("hf", "fan_in", "heavy_tailed")
HEAVY_TAILED_DOF = 2   # Student-t degrees of freedom of init="heavy_tailed"


def _tokenizer(vocab_words, extra_special: list[str]) -> PreTrainedTokenizerFast:
    words = list(dict.fromkeys(SPECIAL + extra_special + list(vocab_words or DEFAULT_WORDS)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"] + extra_special})
    return fast


def build_processor(vocab_words=None, family: str = "llava", image_size: int = IMAGE_SIZE):
    """A processor for the tiny checkpoints: a word-level tokenizer over ``vocab_words``. ``image_size``
    (LLaVA only; a multiple of the 14 px patch) is the side images are resized to: (image_size / 14)^2 image
    tokens per image. Raises ValueError for a size that is not a positive multiple of the patch."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < PATCH or image_size % PATCH:
        raise ValueError(f"image_size must be a positive multiple of {PATCH}, got {image_size!r}")
    if family == "qwen3_vl":
        return _qwen3_vl_processor(vocab_words)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        fast = _tokenizer(vocab_words, QWEN_SPECIAL)
        fast.image_token, fast.video_token = "<|image_pad|>", "<|video_pad|>"
        pixels = QWEN_IMAGE_SIZE * QWEN_IMAGE_SIZE   # min = max: every image becomes 4 x 4 patches
        image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH,
                                                temporal_patch_size=2, merge_size=2)
        # The video processor is unused (image data only) but the processor class requires one.
        cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
        return cls(image_processor=image_processor, tokenizer=fast, chat_template=QWEN_CHAT_TEMPLATE,
                   video_processor=Qwen2VLVideoProcessor())
    fast = _tokenizer(vocab_words, [])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_tiny_vlm(out_dir: str, *, family: str = "llava", size: str = "student", vocab_words=None,
                   seed: int = 0, image_size: int = IMAGE_SIZE, init: str = "hf") -> str:
    """Write a complete local checkpoint (config, random weights, tokenizer, processor) to ``out_dir``.

    size: a key of ``SIZES``; image_size: LLaVA's input side (see :func:`build_processor`), ignored for
    the Qwen families. init: "hf" keeps transformers' initialisation (normal, std 0.02, everywhere);
    "fan_in" redraws the language backbone's linear layers (not the LM head) with std 1 / sqrt(in_features),
    which at these toy widths (std 0.06-0.09 instead of 0.02) trains several times faster; "heavy_tailed"
    redraws the same layers from a Student-t distribution with ``HEAVY_TAILED_DOF`` degrees of freedom, each
    matrix rescaled to that same sample std. Trained LLMs' weights are heavy-tailed: a few large weights set
    each quantization group's absmax and so the INT4 grid everything else is rounded to, which is what makes
    round-to-nearest INT4 lossy; a toy model trained for minutes from a Gaussian keeps its Gaussian shape and
    loses almost nothing to it. Raises ValueError for an unknown family, size or init or a bad image_size."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if family not in FAMILIES:
        raise ValueError(f"tiny checkpoints exist for {FAMILIES}, not {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    processor = build_processor(vocab_words, family, image_size)
    tok = processor.tokenizer
    hidden, inter, layers, heads = SIZES[size]
    vocab = -(-len(tok) // 64) * 64   # padded like real checkpoints: rows past the tokenizer are never targets
    torch.manual_seed(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        model = _tiny_qwen2_vl(tok, hidden, inter, layers, heads, vocab, v2_5=family == "qwen2_5_vl")
    elif family == "qwen3_vl":
        model = _tiny_qwen3_vl(tok, hidden, inter, layers, heads, vocab)
    else:
        model = _tiny_llava(tok, hidden, inter, layers, heads, vocab, image_size)
    if init != "hf":
        _fan_in_init(model, heavy_tailed=init == "heavy_tailed")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _fan_in_init(model, heavy_tailed: bool = False) -> None:
    # The layers GRACE quantizes: the language backbone's, not the LM head.
    from grace.quantize import select_linears

    with torch.no_grad():
        for _, lin in select_linears(model, group_size=1):
            w = lin.weight
            if heavy_tailed:   # t = z / sqrt(chi2_k / k), chi2_k a sum of k squared normals: seeded like the rest
                chi2 = torch.randn((HEAVY_TAILED_DOF, *w.shape)).square().sum(0)
                t = torch.randn(w.shape) / (chi2 / HEAVY_TAILED_DOF).sqrt()
                w.copy_(t / t.std() * lin.in_features ** -0.5)
            else:
                w.normal_(0.0, lin.in_features ** -0.5)


def _tiny_qwen2_vl(tok, hidden, inter, layers, heads, vocab, v2_5: bool = False):
    half_head = hidden // heads // 2
    # M-RoPE splits each head's rotary frequencies between time, height and width positions.
    section = [half_head - 2 * (half_head * 3 // 8), half_head * 3 // 8, half_head * 3 // 8]
    text = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
            "max_position_embeddings": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": section},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"depth": 1, "embed_dim": 64, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2, "patch_size": PATCH,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if v2_5:   # Qwen2.5-VL names the encoder width hidden_size and the merger's output out_hidden_size
        vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "out_hidden_size": hidden, "num_heads": 2,
                  "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1]}
    ids = tok.convert_tokens_to_ids
    config_cls, model_cls = ((Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration) if v2_5
                             else (Qwen2VLConfig, Qwen2VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    return model_cls(config)


def _tiny_llava(tok, hidden, inter, layers, heads, vocab, image_size=IMAGE_SIZE):
    text = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=PATCH)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    return LlavaForConditionalGeneration(config)


def _qwen3_vl_processor(vocab_words):
    """Qwen3-VL's processor over the word-level tokenizer: Qwen2-VL's image processor with 16-pixel patches
    (Qwen3-VL's), every image resized to 64 x 64 px, so 4 x 4 patches merged into 4 image tokens."""
    fast = _tokenizer(vocab_words, QWEN_SPECIAL)
    fast.image_token, fast.video_token = "<|image_pad|>", "<|video_pad|>"
    pixels = QWEN3_IMAGE_SIZE * QWEN3_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=QWEN3_PATCH,
                                            temporal_patch_size=2, merge_size=2)
    # The video processor is unused (image data only) but the processor class requires one.
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=fast, chat_template=QWEN_CHAT_TEMPLATE,
                            video_processor=Qwen3VLVideoProcessor(patch_size=QWEN3_PATCH))


def _tiny_qwen3_vl(tok, hidden, inter, layers, heads, vocab):
    """Qwen3-VL at toy width: a Qwen3 text model (QK-norm, interleaved M-RoPE) and a 2-block ViT with
    learned position embeddings on a 4 x 4 grid and one DeepStack merger (block 0 feeds decoder layer 0)."""
    head_dim = hidden // heads
    half_head = head_dim // 2
    section = [half_head - 2 * (half_head * 3 // 8), half_head * 3 // 8, half_head * 3 // 8]
    text = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim, "vocab_size": vocab,
            "max_position_embeddings": 256, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                "mrope_interleaved": True},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": hidden,
              "patch_size": QWEN3_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    return Qwen3VLForConditionalGeneration(config)
