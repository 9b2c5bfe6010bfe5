"""LLaVA-format conversation data: parsing, tokenization with the model's own processor and chat
template (only assistant turns supervised), and padding into batches.

Format (ShareGPT4V / LLaVA mixtures): a JSON list of
    {"id": ..., "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}, ...]}
Bad samples (missing or unreadable image, empty or malformed conversation, no assistant turn, longer
than max_length tokens) are skipped and counted by reason, never trained on and never fatal.
"""

from __future__ import annotations

import collections
import json
import os

import torch
from PIL import Image

IGNORE = -100


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversation records")
    return data


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) as chat-template messages; the ``<image>`` placeholder
    becomes an image content item. Raises ValueError on a malformed turn."""
    msgs = []
    for turn in conversations:
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(turn.get("from"))
        text = turn.get("value")
        if role is None or not isinstance(text, str):
            raise ValueError("malformed turn")
        content = []
        if "<image>" in text:
            content.append({"type": "image"})
            text = text.replace("<image>", "").strip()
        content.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": content})
    return msgs


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenized samples; ``skipped`` counts the samples left out, by reason."""

    def __init__(self, records: list[dict], processor, image_folder: str, max_length: int):
        self.processor, self.image_folder, self.max_length = processor, image_folder, max_length
        self.skipped: collections.Counter = collections.Counter()
        self.samples = []
        for rec in records:
            try:
                sample = self._encode(rec)
            except _Skip as s:
                self.skipped[s.reason] += 1
                continue
            self.samples.append(sample)

    def _encode(self, rec: dict) -> dict:
        convs = rec.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise _Skip("empty conversation")
        try:
            msgs = to_messages(convs)
        except ValueError as e:
            raise _Skip("malformed conversation") from e
        if not any(m["role"] == "assistant" for m in msgs):
            raise _Skip("no assistant turn")
        image = None
        if rec.get("image"):
            path = os.path.join(self.image_folder, rec["image"])
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError):
                raise _Skip("missing or unreadable image") from None
        n_image_items = sum(c["type"] == "image" for m in msgs for c in m["content"])
        if n_image_items != (image is not None):
            raise _Skip("image and <image> placeholder do not match")
        images = [image] if image is not None else None
        text = self.processor.apply_chat_template(msgs, tokenize=False)
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        input_ids = enc["input_ids"][0]
        if input_ids.numel() > self.max_length:
            raise _Skip("longer than max_length")
        # Where each assistant turn starts and ends, counted with the tokenizer alone: the processor
        # expands each image placeholder into the image's tokens, so a prefix holding p placeholders is
        # p * (tokens per image - 1) longer than its plain tokenization. (Running the processor on
        # every prefix would preprocess the image once per turn boundary: 3x slower on small data.)
        placeholder = getattr(self.processor, "image_token", "<image>")
        n_placeholders = text.count(placeholder)
        extra = 0
        if n_placeholders:
            token_id = self.processor.tokenizer.convert_tokens_to_ids(placeholder)
            extra = (int((input_ids == token_id).sum()) - n_placeholders) // n_placeholders

        def length_of(k: int, generation_prompt: bool) -> int:
            prefix = self.processor.apply_chat_template(msgs[:k], tokenize=False,
                                                        add_generation_prompt=generation_prompt)
            return len(self.processor.tokenizer(prefix)["input_ids"]) + extra * prefix.count(placeholder)

        labels = torch.full_like(input_ids, IGNORE)
        # Supervise each assistant turn: the tokens its rendering adds after the generation prompt.
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                lo, hi = length_of(k, True), length_of(k + 1, False)
                labels[lo:hi] = input_ids[lo:hi]
        sample = {k: v[0] for k, v in enc.items() if k != "pixel_values" and v.dim() > 1}
        if "pixel_values" in enc:
            sample["pixel_values"] = enc["pixel_values"]
        if "image_grid_thw" in enc:
            sample["image_grid_thw"] = enc["image_grid_thw"]
        sample["labels"] = labels
        return sample

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad token tensors; concatenate images (Qwen2-VL's pixel_values are already flat patches)."""
    longest = max(s["input_ids"].numel() for s in samples)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE), ("mm_token_type_ids", 0)):
        if key in samples[0]:
            batch[key] = torch.stack([torch.nn.functional.pad(s[key], (0, longest - s[key].numel()), value=fill)
                                      for s in samples])
    for key in ("pixel_values", "image_grid_thw"):
        if key in samples[0]:
            batch[key] = torch.cat([s[key] for s in samples])
    return batch
