"""Family adapters: where a VLM keeps its language backbone, vision tower, LM head and image tokens.

Everything family-specific in the trainer goes through :func:`family_of`. LLaVA-1.5, Qwen2-VL, Qwen2.5-VL
and Qwen3-VL (the authors' released family) are each trained, exported, loaded and run on tiny models
built from their configs (grace.demo.tiny); the three Qwen families share one layout in transformers 5.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: where its parts live and which of its linears stay in full precision.

    Attributes:
        name: the family's name (``llava``, ``qwen2_vl`` ...).
        model_types: the ``config.model_type`` values it covers.
        vision_attr: the attribute of ``model.model`` holding the vision encoder.
        full_precision: fnmatch patterns over in-memory module names kept in full precision (the paper
            quantizes the language model's linears only): training never quantizes them and an export's
            ``ignore`` list is written from them (:meth:`ignore_patterns`).
        language_model: the qualified name of the language model (the decoder stack and its norms), the
            default set of modules a scheme quantizes.
        vision_checkpoint_prefix: for families whose vision tower transformers saves under two layouts, the
            on-disk prefix of the Hub layout (llava-hf's ``vision_tower.vision_model.``), which vLLM's weight
            mapper expects; an export writes it (:meth:`hub_checkpoint_keys`). None: one layout only.
    """

    name: str
    model_types: tuple[str, ...]
    vision_attr: str
    full_precision: tuple[str, ...]
    language_model: str = "model.language_model"
    vision_checkpoint_prefix: str | None = None

    def is_full_precision(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.full_precision)

    def ignore_patterns(self) -> tuple[str, ...]:
        """:attr:`full_precision` as compressed-tensors / vLLM ``ignore`` entries (``re:`` + ``re.match``
        pattern): ``*vision_tower*`` -> ``re:.*vision_tower.*``, ``*lm_head`` -> ``re:.*lm_head$``."""
        out = []
        for glob in self.full_precision:
            body = ".*".join(re.escape(part) for part in glob.split("*"))
            out.append("re:" + body + ("" if glob.endswith("*") else "$"))
        return tuple(out)

    def hub_checkpoint_keys(self, keys: list[str]) -> list[str]:
        """``keys`` (on-disk tensor names) renamed to the family's Hub layout: a vision-tower tensor
        ``vision_tower.<rest>`` becomes ``<vision_checkpoint_prefix><rest>`` (names already in that layout,
        and every other name, unchanged)."""
        if self.vision_checkpoint_prefix is None:
            return list(keys)
        tower = self.vision_attr + "."
        return [self.vision_checkpoint_prefix + k.removeprefix(tower)
                if k.startswith(tower) and not k.startswith(self.vision_checkpoint_prefix) else k for k in keys]

    def backbone(self, model: nn.Module) -> nn.Module:
        """The module whose forward returns hidden states (never logits)."""
        return model.model

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_output_embeddings()

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return getattr(model.model, self.vision_attr)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's transformer blocks: the units FSDP shards one by one."""
        return model.get_submodule(self.language_model).layers

    def image_token_id(self, config) -> int:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{config.model_type} config names no image token id")

    def image_token_counts(self, config, batch: dict) -> torch.Tensor:
        """Visual tokens of each image of ``batch``, int64 [num_images], in the order of ``pixel_values``
        (sample by sample, the order in which the images' tokens appear in ``input_ids``).

        Qwen families: ``image_grid_thw`` [num_images, 3] patches, merged ``spatial_merge_size``^2 to one
        token. LLaVA-1.5: every image becomes the same number of tokens (576 at 336 px), so the image
        tokens are split evenly over ``pixel_values`` [num_images, 3, H, W]. A text-only batch (no image, no image
        token) gives an empty tensor.

        Raises:
            ValueError: LLaVA image tokens that do not divide evenly among the images (or image tokens and no
                image).
        """
        grid = batch.get("image_grid_thw")
        if grid is not None:
            merge = int(config.vision_config.spatial_merge_size)
            return grid.to(torch.int64).prod(-1) // (merge * merge)
        pixels = batch.get("pixel_values")
        images = 0 if pixels is None else int(pixels.shape[0])
        tokens = int((batch["input_ids"] == self.image_token_id(config)).sum())
        if images == 0 and tokens == 0:
            return torch.zeros(0, dtype=torch.int64)
        if images == 0 or tokens % images:
            raise ValueError(f"{tokens} image tokens cannot be split evenly over {images} images")
        return torch.full((images,), tokens // images, dtype=torch.int64)

    def vocab_size(self, config) -> int:
        return int(getattr(config, "text_config", config).vocab_size)


# Qwen's patch merger (and Qwen3-VL's deepstack mergers) sit inside ``visual``; LLaVA's projector does not.
_QWEN_FULL_PRECISION = ("*visual*", "*lm_head")
FAMILIES = (
    Family("llava", ("llava",), "vision_tower", ("*vision_tower*", "*multi_modal_projector*", "*lm_head"),
           vision_checkpoint_prefix="vision_tower.vision_model."),
    Family("qwen2_vl", ("qwen2_vl",), "visual", _QWEN_FULL_PRECISION),
    Family("qwen2_5_vl", ("qwen2_5_vl",), "visual", _QWEN_FULL_PRECISION),
    Family("qwen3_vl", ("qwen3_vl",), "visual", _QWEN_FULL_PRECISION),
)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"unsupported model type {model_type!r}; supported: "
                     f"{', '.join(t for f in FAMILIES for t in f.model_types)}")


def check_pair(teacher_config, student_config, *, max_padding: int = 1024) -> Family:
    """Teacher and student must be one family with vocabularies that differ only by padding rows."""
    ft, fs = family_of(teacher_config), family_of(student_config)
    if ft.name != fs.name:
        raise ValueError(f"teacher ({ft.name}) and student ({fs.name}) must be of the same family")
    vt, vs = ft.vocab_size(teacher_config), fs.vocab_size(student_config)
    if abs(vt - vs) > max_padding:
        raise ValueError(f"teacher vocabulary {vt} and student vocabulary {vs} differ by more than padding "
                         f"({max_padding} rows): they cannot share a tokenizer")
    if ft.image_token_id(teacher_config) != fs.image_token_id(student_config):
        raise ValueError("teacher and student use different image token ids: they cannot share a processor")
    return fs


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_same_tokenizer(teacher_tok, student_tok, *, teacher_rows: int, student_rows: int,
                         teacher_image_token: str | None = None, student_image_token: str | None = None) -> None:
    """Refuse a teacher whose tokenizer does not encode text exactly as the student's.

    Distillation compares the two models' logits row by row over the common rows [0, min(rows)), and the
    teacher reads the ids the student's tokenizer produced, so over those rows both tokenizers must map
    every id to the same token (both vocabularies, added tokens included); rows neither tokenizer uses
    (the padding real checkpoints carry, e.g. LLaVA-1.5's 32064 rows for 32002 tokens) may differ. The
    named special tokens (bos, eos, unk, pad) and the image placeholder must be the same token with the
    same id, and no id of the student's tokenizer may lie beyond the teacher's embedding rows.

    Args:
        teacher_tok, student_tok: Hugging Face tokenizers (``get_vocab()``, ``convert_tokens_to_ids``).
        teacher_rows, student_rows: the models' vocabulary rows (LM head / embedding size).
        teacher_image_token, student_image_token: the processors' image placeholder strings (None: none, as
            for a bare tokenizer; then only the configs' image token ids, see :func:`check_pair`, are compared).

    Raises:
        ValueError: naming the first differing id and token (or special token) of each side.
    """
    common = min(teacher_rows, student_rows)
    by_id = []
    for tok in (teacher_tok, student_tok):
        table = {}
        for token, i in tok.get_vocab().items():
            table.setdefault(int(i), token)
        by_id.append(table)
    t_ids, s_ids = by_id
    for i in sorted((set(t_ids) | set(s_ids)) & set(range(common))):
        if t_ids.get(i) != s_ids.get(i):
            raise ValueError(f"teacher and student tokenizers differ: id {i} is {t_ids.get(i)!r} for the teacher "
                             f"and {s_ids.get(i)!r} for the student (over the {common} rows both models have); "
                             "distillation would compare unrelated rows: use a teacher with the student's tokenizer")
    beyond = sorted(i for i in s_ids if i >= teacher_rows)
    if beyond:
        raise ValueError(f"the student's tokenizer has id {beyond[0]} ({s_ids[beyond[0]]!r}) but the teacher has "
                         f"only {teacher_rows} vocabulary rows")
    pairs = [(name, getattr(teacher_tok, name, None), getattr(student_tok, name, None))
             for name in SPECIAL_TOKEN_NAMES]
    if teacher_image_token is not None and student_image_token is not None:
        # a bare tokenizer names no image token; the configs' image token ids are compared by check_pair
        pairs.append(("image token", teacher_image_token, student_image_token))
    for name, t, s in pairs:
        t_id = None if t is None else teacher_tok.convert_tokens_to_ids(t)
        s_id = None if s is None else student_tok.convert_tokens_to_ids(s)
        if (t, t_id) != (s, s_id):
            raise ValueError(f"teacher and student tokenizers differ: the {name} is {t!r} (id {t_id}) for the "
                             f"teacher and {s!r} (id {s_id}) for the student")
