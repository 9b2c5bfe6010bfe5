"""Greedy generation and exact-match evaluation of a VLM on LLaVA-format records, with the serving
figures that matter for an INT4 model: weight bytes, peak memory and decode throughput.

The prompt of a record is its conversation up to the first assistant turn, rendered with the
processor's chat template and a generation prompt exactly as :mod:`grace.data` renders it for
training; the reference answer is that assistant turn. Works for any model with a Hugging Face
``generate`` (BF16, fake-quantized or W4A16 INT4) and its processor.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys
import time

import torch
from PIL import Image
from tqdm.auto import tqdm

from grace.data import SkipSample, load_image, parse_record, to_messages

_TRAILING_PUNCTUATION = ".,;:!?"


@dataclasses.dataclass
class EvalResult:
    """Accuracy and cost of one evaluation.

    accuracy, correct, total    exact match after :func:`normalize_answer`, over the records evaluated
    per_type                    {question_type: {"accuracy", "correct", "total"}} ("other" when a record has none)
    skipped                     {reason: count} of records not evaluated (missing or unreadable image, ...)
    weight_bytes                bytes of the model's parameters and buffers (INT4 packed buffers at real size)
    peak_memory_bytes / _kind   "cuda_max_memory_allocated" over the evaluation on a GPU, else
                                "process_peak_rss": the process's peak resident set since it started
                                (not resettable, so it includes everything the process did before)
    generated_tokens            tokens generated up to and including each row's end-of-sequence token
    generate_seconds            wall time inside ``model.generate`` (prefill included), synchronised on GPU
    tokens_per_s                generated_tokens / generate_seconds
    predictions                 one {"id", "question_type", "answer", "prediction", "correct"} per record evaluated
    """
    accuracy: float
    correct: int
    total: int
    per_type: dict
    skipped: dict
    weight_bytes: int
    peak_memory_bytes: int | None
    peak_memory_kind: str
    generated_tokens: int
    generate_seconds: float
    tokens_per_s: float
    device: str
    predictions: list = dataclasses.field(default_factory=list)

    def to_dict(self, predictions: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not predictions:
            d.pop("predictions")
        return d


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, trailing punctuation removed: ``" Red ."`` -> ``"red"``."""
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.rstrip(_TRAILING_PUNCTUATION + " ")


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each counted once (tied weights are one tensor)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:   # not on Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024   # Linux reports KiB, macOS bytes


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def max_positions(model) -> int | None:
    """The language model's ``max_position_embeddings`` (None when its config records none)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def _generate_batch(model, processor, messages: list[list[dict]], images: list | None, max_new_tokens: int,
                    device: torch.device, check_positions: bool = False) -> tuple[list[str], int, float]:
    """Greedy answers for a batch of chat messages (images: one per prompt, or None for text only).
    Returns (texts, generated tokens up to each row's EOS, seconds in generate). ``check_positions``: raise
    ValueError, with the numbers, when the prompt tokens (image tokens included) plus ``max_new_tokens``
    exceed the model's :func:`max_positions` (positions past it were never trained: the answer would be
    empty or garbage)."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    side = tok.padding_side
    tok.padding_side = "left"   # decoder-only batches: every row's last prompt token at the same position
    try:
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    enc = enc.to(device)
    prompt_len = enc["input_ids"].shape[1]
    limit = max_positions(model) if check_positions else None
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"the prompt is {prompt_len} tokens (image tokens included) and max_new_tokens is "
                         f"{max_new_tokens}: {prompt_len + max_new_tokens} positions, but the model has "
                         f"max_position_embeddings {limit}; shorten the prompt or lower --max-new-tokens")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new = out[:, prompt_len:].tolist()
    eos = _eos_ids(model, tok)
    n_tokens = 0
    for row in new:
        # Rows that finished early are padded until the whole batch finishes: count up to the EOS only.
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        n_tokens += end
    answers = tok.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers], n_tokens, seconds


def _prepare(rec, image_folder: str) -> tuple[list[dict], Image.Image | None, str]:
    """(prompt messages, image or None, reference answer) of a record; raises SkipSample with a reason."""
    msgs, image_name = parse_record(rec)
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if image_name and not any(c["type"] == "image" for m in msgs[:k] for c in m["content"]):
        raise SkipSample("<image> token after the first assistant turn")
    image = load_image(os.path.join(image_folder, image_name)) if image_name else None
    return msgs[:k], image, rec["conversations"][k]["value"]


def evaluate(model, processor, records: list[dict], image_folder: str, *, max_new_tokens: int = 8,
             batch_size: int = 16, device=None, progress: bool = True) -> EvalResult:
    """Greedy-decode an answer to each record and score it by exact match against the record's first
    assistant turn (both through :func:`normalize_answer`), overall and per ``question_type``.

    records: LLaVA conversation records (see :mod:`grace.data`); ``image`` paths are relative to
    image_folder. Records that cannot be evaluated (missing or unreadable image, malformed
    conversation) are counted in ``skipped`` by reason, never raised, as long as at least one record
    can be evaluated. device: where to run; None keeps the model where it is, otherwise the model is
    moved there.

    Raises:
        ValueError: a non-list or empty ``records``; max_new_tokens / batch_size below 1; no record
            can be evaluated (the message gives the skip reasons and ``image_folder``, the usual
            culprit: an accuracy over zero records would be meaningless).
    """
    if not isinstance(records, list):
        raise ValueError(f"records must be a list of conversation records, got {type(records).__name__}")
    if not records:
        raise ValueError("records is empty: nothing to evaluate")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    skipped: collections.Counter = collections.Counter()
    items = []   # (record index, messages, image, reference)
    for i, rec in enumerate(records):
        try:
            items.append((i, *_prepare(rec, image_folder)))
        except SkipSample as s:
            skipped[s.reason] += 1
    if not items:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        raise ValueError(f"none of the {len(records)} records could be evaluated ({reasons}); images are looked "
                         f"up under {os.path.abspath(image_folder)!r}: check --image-folder / image_folder")
    # A batch is all text-only or all with an image: processors take images for every prompt or none.
    items.sort(key=lambda it: (it[2] is None, it[0]))

    was_training = model.training
    model.eval()
    predictions: dict[int, str] = {}
    tokens, seconds = 0, 0.0
    bar = tqdm(total=len(items), desc="eval", disable=not progress)
    try:
        start = 0
        while start < len(items):
            with_image = items[start][2] is not None
            end = start
            while end < len(items) and end - start < batch_size and (items[end][2] is not None) == with_image:
                end += 1
            batch = items[start:end]
            answers, n, s = _generate_batch(model, processor, [it[1] for it in batch],
                                            [it[2] for it in batch] if with_image else None, max_new_tokens, dev)
            predictions.update({it[0]: a for it, a in zip(batch, answers, strict=True)})
            tokens, seconds = tokens + n, seconds + s
            bar.update(len(batch))
            start = end
    finally:
        bar.close()
        model.train(was_training)

    rows = []
    per_type: dict[str, dict] = {}
    for i, _, _, reference in sorted(items, key=lambda it: it[0]):
        rec = records[i]
        qtype = str(rec.get("question_type") or "other")
        ok = normalize_answer(predictions[i]) == normalize_answer(reference)
        rows.append({"id": rec.get("id", i), "question_type": qtype, "answer": reference,
                     "prediction": predictions[i], "correct": ok})
        t = per_type.setdefault(qtype, {"accuracy": 0.0, "correct": 0, "total": 0})
        t["correct"] += ok
        t["total"] += 1
    for t in per_type.values():
        t["accuracy"] = t["correct"] / t["total"]
    correct = sum(r["correct"] for r in rows)

    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_memory_allocated"
    else:
        peak, kind = _peak_rss_bytes(), "process_peak_rss"
    return EvalResult(accuracy=correct / len(rows) if rows else 0.0, correct=correct, total=len(rows),
                      per_type=dict(sorted(per_type.items())), skipped=dict(skipped),
                      weight_bytes=model_weight_bytes(model), peak_memory_bytes=peak, peak_memory_kind=kind,
                      generated_tokens=tokens, generate_seconds=seconds,
                      tokens_per_s=tokens / seconds if seconds > 0 else 0.0, device=str(dev), predictions=rows)


def generate(model, processor, image_path: str | None, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of ``model`` to ``prompt`` about the image at ``image_path`` (None: text only).

    The prompt is rendered like a training user turn (image first, then the text; an ``<image>``
    marker in the prompt is dropped). Raises ValueError for an unreadable image, an empty prompt,
    max_new_tokens below 1, or a prompt whose tokens plus max_new_tokens exceed the model's
    ``max_position_embeddings`` (the message gives the three numbers).
    """
    if not isinstance(prompt, str) or not prompt.replace("<image>", "").strip():
        raise ValueError("prompt must be a non-empty string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    image = None
    if image_path is not None:
        try:
            image = load_image(image_path)
        except SkipSample as e:
            raise ValueError(f"cannot read image {image_path}: {e}") from None
    text = prompt.replace("<image>", "").strip()
    msgs = to_messages([{"from": "human", "value": f"<image>\n{text}" if image is not None else text}])
    was_training = model.training
    model.eval()
    try:
        answers, _, _ = _generate_batch(model, processor, [msgs], [image] if image is not None else None,
                                        max_new_tokens, _model_device(model), check_positions=True)
    finally:
        model.train(was_training)
    return answers[0]
