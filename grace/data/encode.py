"""Encoding one sample: a record's turns checked and turned into chat messages (:func:`parse_record`), its
image opened, the chat template rendered and tokenized, and labels set on the assistant turns only
(:class:`ConversationDataset`, :func:`assistant_labels`); :func:`collate` pads samples into a batch.

A record that cannot be used raises :class:`SkipSample` with the reason it is counted under.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from grace.data.index import RecordIndex

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipSample(Exception):
    """A record that cannot be trained on or evaluated; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt"|"system", "value"}; ShareGPT's "user"/"assistant" too) as
    chat-template messages; the ``<image>`` placeholder becomes an image content item. A system turn becomes
    a "system" message, which the chat template renders in its system slot. Raises ValueError on a
    malformed turn."""
    msgs = []
    for turn in conversations:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise ValueError("malformed turn")
        # one image item per tag: "<image>\n<image>\n..." is two images, which parse_record refuses for a
        # record that names one
        content = [{"type": "image"} for _ in range(text.count("<image>"))]
        if content:
            text = text.replace("<image>", "").strip()
        content.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": content})
    return msgs


def parse_record(rec) -> tuple[list[dict], str | None]:
    """(chat messages, image path or None) of a record, or SkipSample with the reason it is unusable:
    empty or malformed conversation, a system turn that is not the first turn, no assistant turn, no user
    turn before the first assistant turn, an image without exactly one ``<image>`` placeholder (two tags
    for one image included), or a placeholder without an image. Opens nothing."""
    convs = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(convs, list) or not convs:
        raise SkipSample("empty conversation")
    try:
        msgs = to_messages(convs)
    except ValueError:
        raise SkipSample("malformed conversation") from None
    if any(m["role"] == "system" for m in msgs[1:]):
        raise SkipSample("system turn after the first turn")
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
    if first is None:
        raise SkipSample("no assistant turn")
    if not any(m["role"] == "user" for m in msgs[:first]):
        raise SkipSample("no user turn before the first assistant turn")
    image = rec.get("image") or None
    if image is not None and not isinstance(image, str):
        raise SkipSample("malformed conversation")
    n_items = sum(c["type"] == "image" for m in msgs for c in m["content"])
    if image is not None and n_items != 1:
        raise SkipSample("image without exactly one <image> token")
    if image is None and n_items:
        raise SkipSample("<image> token without an image")
    return msgs, image


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright: its EXIF orientation applied (a phone photo stored sideways
    is turned as a viewer shows it), 16-bit and float images scaled to 8 bits (:func:`to_8bit`; PIL's own
    conversion clips them, which makes a 16-bit image white and a [0, 1] float image black).
    SkipSample("missing or unreadable image") when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return to_8bit(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise SkipSample("missing or unreadable image") from None


def to_8bit(im: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits as 8-bit grayscale ("L"); any other image as it is.

    Integer modes ("I;16*", "I"): v / 257, the 16-bit range [0, 65535] onto [0, 255] (a 32-bit "I" image
    whose values exceed 65535 is scaled by its maximum instead). Float ("F"): values in [0, 1] times 255,
    any other range mapped linearly from [min, max] onto [0, 255]; NaN becomes 0. Rounded to nearest."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = a * 255.0
    else:
        top = float(a.max()) if a.size else 0.0
        a = a / (top / 255.0 if top > 65535 else 257.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))   # 2-D uint8: mode "L"

class ConversationDataset(torch.utils.data.Dataset):
    """The records of a :class:`RecordIndex`, each checked and encoded on access.

    ``dataset[i]`` -> {"input_ids": int64 [T], "attention_mask": [T], "labels": int64 [T] (IGNORE outside
    the assistant turns), and the processor's image tensors ("pixel_values", "image_grid_thw") when the
    record has an image}, T <= max_length; raises SkipSample when the record is unusable (see
    :func:`parse_record`; also a missing or unreadable image, longer than max_length, rejected by the
    processor or its chat template, or assistant turns that cannot be located, see :func:`assistant_labels`).
    Every assistant turn's end token is supervised: ``end_tokens`` (see :func:`end_assistant_turns`) are
    the tokens that count as one; a turn the template renders without any gets the tokenizer's EOS.

    ``cache=True`` keeps every encoded sample (and every skip) after its first access, in this process (each
    DataLoader worker holds its own): for small data read for many epochs, where encoding (the processor's
    image transforms and chat template, ~4 ms a sample on one CPU core) would cost as much as the training
    step. Memory grows with the data (~25 KB a sample for a 42 px image), so leave it off at real size.
    """

    def __init__(self, records: list[dict] | RecordIndex, processor, image_folder: str, max_length: int,
                 cache: bool = False, end_tokens: tuple[str, ...] | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.index = records if isinstance(records, RecordIndex) else RecordIndex.from_records(records)
        self.processor, self.image_folder, self.max_length = processor, image_folder, max_length
        self.end_tokens = end_tokens
        self._cache: dict[int, dict | SkipSample] | None = {} if cache else None

    @classmethod
    def from_json(cls, path: str, processor, image_folder: str, max_length: int,
                  cache: bool = False, end_tokens: tuple[str, ...] | None = None) -> ConversationDataset:
        return cls(RecordIndex.from_json(path), processor, image_folder, max_length, cache, end_tokens)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if self._cache is None:
            return self._encode(i)
        if i not in self._cache:
            try:
                self._cache[i] = self._encode(i)
            except SkipSample as skip:
                self._cache[i] = skip
        hit = self._cache[i]
        if isinstance(hit, SkipSample):
            raise SkipSample(hit.reason)
        # collate pads and stacks into new tensors, so handing out the cached ones is safe; the dict is copied
        return dict(hit)

    def _encode(self, i: int) -> dict:
        msgs, image_name = parse_record(self.index[i])
        image = load_image(os.path.join(self.image_folder, image_name)) if image_name else None
        msgs, text, spans = _end_turns(self.processor, msgs, self.end_tokens)
        try:
            enc = self.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        except ValueError:   # e.g. an image too small for the processor's patching
            raise SkipSample("processor rejected the sample") from None
        input_ids = enc["input_ids"][0]
        if input_ids.numel() > self.max_length:
            raise SkipSample("longer than max_length")
        sample = {k: v[0] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw") and v.dim() > 1}
        for key in ("pixel_values", "image_grid_thw"):
            if key in enc:
                sample[key] = enc[key]
        if spans is None:
            spans = _assistant_spans(self.processor, msgs, text)
        sample["labels"] = _labels_of_spans(self.processor, text, input_ids, list(spans.values()))
        return sample


def render(processor, msgs: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``msgs``; SkipSample when the template refuses them (a template that
    raises on a role or an order it does not support, e.g. a system turn)."""
    # transformers renders chat templates with jinja2
    from jinja2 import TemplateError

    try:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise SkipSample("chat template rejected the conversation") from None


def _assistant_spans(processor, msgs: list[dict], text: str) -> dict[int, tuple[int, int]]:
    """{k: (lo, hi)} for each assistant message k: the characters of ``text`` (the rendering of ``msgs``) that
    its turn adds after the generation prompt, [len(render(msgs[:k], generation prompt)),
    len(render(msgs[:k+1]))). SkipSample when a prefix does not render as a prefix of the whole."""
    spans = {}
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        lo_text = render(processor, msgs[:k], add_generation_prompt=True)
        hi_text = render(processor, msgs[:k + 1])
        if not (text.startswith(lo_text) and text.startswith(hi_text) and len(lo_text) <= len(hi_text)):
            raise SkipSample("chat template renders a conversation prefix inconsistently")
        spans[k] = (len(lo_text), len(hi_text))
    return spans


def end_tokens_of(processor, generation_eos=None) -> tuple[str, ...]:
    """The tokens that end an answer: the tokenizer's EOS and those of a generation config's ``eos_token_id``
    (an int or a list, None for none), as token strings."""
    tok = processor.tokenizer
    ids = generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    tokens = [tok.eos_token, *(tok.convert_ids_to_tokens(int(i)) for i in ids if i is not None)]
    return tuple(dict.fromkeys(t for t in tokens if t))


def end_assistant_turns(processor, msgs: list[dict], end_tokens: tuple[str, ...] | None = None
                        ) -> tuple[list[dict], str]:
    """(messages, their rendering) with every assistant turn ending in an end token, so that the labels
    (:func:`assistant_labels`) supervise the token that stops generation.

    A turn whose rendered span holds none of ``end_tokens`` (None: the tokenizer's EOS; see
    :func:`end_tokens_of`) gets the tokenizer's EOS appended to its text, where LLaVA's own training puts
    ``</s>``: after the answer. llava-hf's Hub template for LLaVA-1.5 writes none ("ASSISTANT: red "), so every
    turn gets one; a template that writes one (Qwen's ``<|im_end|>``, the tiny models' ``</s>``) is left as
    it renders. Without an EOS token in the tokenizer, nothing is appended."""
    msgs, text, _ = _end_turns(processor, msgs, end_tokens)
    return msgs, text


def _end_turns(processor, msgs: list[dict], end_tokens: tuple[str, ...] | None
               ) -> tuple[list[dict], str, dict[int, tuple[int, int]] | None]:
    """:func:`end_assistant_turns`, plus the :func:`_assistant_spans` of the returned rendering when they are
    already known (nothing was appended), else None: the encoder labels with them instead of rendering every
    prefix again."""
    text = render(processor, msgs)
    eos = processor.tokenizer.eos_token
    ends = end_tokens or (eos,)
    if not eos:
        return msgs, text, None
    spans = _assistant_spans(processor, msgs, text)
    bare = [k for k, (lo, hi) in spans.items() if not any(e in text[lo:hi] for e in ends)]
    if not bare:
        return msgs, text, spans
    msgs = [_append_text(m, eos) if k in bare else m for k, m in enumerate(msgs)]
    return msgs, render(processor, msgs), None


def _append_text(message: dict, suffix: str) -> dict:
    content = list(message["content"])
    last = max(i for i, c in enumerate(content) if c["type"] == "text")
    content[last] = {**content[last], "text": content[last]["text"] + suffix}
    return {**message, "content": content}


def template_ends_turns(processor, end_tokens: tuple[str, ...] | None = None) -> bool:
    """Whether the chat template itself ends every assistant turn with an end token (probed on a two-round
    text conversation); False means :func:`end_assistant_turns` appends the EOS to the turns."""
    probe = to_messages([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                         {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}])
    try:
        ended, _ = end_assistant_turns(processor, probe, end_tokens)
    except SkipSample:
        return True   # the template cannot be probed; the samples are checked one by one anyway
    return ended == probe


def assistant_labels(processor, msgs: list[dict], text: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for ``input_ids`` (int64 [T], the processor's encoding of ``text``, the rendering of
    ``msgs``): the token id where the token holds a character of an assistant turn, IGNORE elsewhere.

    An assistant turn is the text its rendering adds after the generation prompt (its content and
    end-of-turn marker): characters [len(render(msgs[:k], generation prompt)), len(render(msgs[:k+1]))).
    Token boundaries come from one tokenization of the whole text with character offsets, never from
    tokenizing prefixes apart: a BPE or SentencePiece merge across a turn boundary cannot shift them (a
    token straddling the boundary, such as " red" after "ASSISTANT:", is supervised). The processor's
    ids are matched to the tokenizer's with image placeholder runs set aside, which checks that the
    processor only expanded placeholders. Raises SkipSample when the template renders a prefix that is
    not a prefix of the whole, or the processor's ids do not match the tokenizer's.
    """
    return _labels_of_spans(processor, text, input_ids, list(_assistant_spans(processor, msgs, text).values()))


def _labels_of_spans(processor, text: str, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`assistant_labels` given the assistant turns' character spans of ``text`` (:func:`_assistant_spans`)."""
    tok = processor.tokenizer
    plain = tok(text, return_offsets_mapping=True)
    plain_ids = np.asarray(plain["input_ids"], np.int64)
    offsets = np.asarray(plain["offset_mapping"], np.int64).reshape(-1, 2)
    supervised = np.zeros(len(plain_ids), bool)
    for lo, hi in spans:   # overlap with [lo, hi); special tokens added by the tokenizer have empty spans
        supervised |= (offsets[:, 1] > lo) & (offsets[:, 0] < hi) & (offsets[:, 1] > offsets[:, 0])
    ids = input_ids.numpy()
    placeholder = getattr(processor, "image_token", None)
    image_id = tok.convert_tokens_to_ids(placeholder) if placeholder else None
    keep_ids, keep_plain = ids != image_id, plain_ids != image_id
    if keep_ids.sum() != keep_plain.sum() or not np.array_equal(ids[keep_ids], plain_ids[keep_plain]):
        raise SkipSample("processor and tokenizer disagree on the text tokens")
    labels = np.full(len(ids), IGNORE, np.int64)
    labels[keep_ids] = np.where(supervised[keep_plain], ids[keep_ids], IGNORE)
    return torch.from_numpy(labels)


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad token tensors; concatenate the images of the samples that have one, in sample order (a
    model matches them to its image tokens in that order; Qwen2-VL's pixel_values are already flat patches)."""
    longest = max(s["input_ids"].numel() for s in samples)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE), ("mm_token_type_ids", 0)):
        if key in samples[0]:
            batch[key] = torch.stack([torch.nn.functional.pad(s[key], (0, longest - s[key].numel()), value=fill)
                                      for s in samples])
    for key in ("pixel_values", "image_grid_thw"):
        if any(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    return batch
