"""Lazy conversation data: the compact record index, the deterministic sample stream (bad samples skipped
and counted, the same for any number of workers or ranks, resumable) and assistant-turn labels under a
byte-level BPE tokenizer with a Qwen2-VL-style chat template."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

import grace.data as data
import grace.data.encode as encode
from grace.config import TrainConfig
from grace.data import (
    MAX_DRAWS,
    ConversationDataset,
    RecordIndex,
    SampleOrder,
    SampleStream,
    SkipSample,
    assistant_labels,
    build_loader,
    to_messages,
)
from grace.data.index import _scan_json_list
from grace.demo.tiny import build_processor
from grace.errors import GraceError

WORDS = "what is the color shape of this object red green blue yellow circle square one two three yes no".split()


def _record(i, image=None, rounds=1):
    turns = []
    for r in range(rounds):
        q = " ".join(WORDS[(i + r + k) % len(WORDS)] for k in range(3))
        turns += [{"from": "human", "value": f"<image>\n{q}" if image and r == 0 else q},
                  {"from": "gpt", "value": " ".join(WORDS[(i * 7 + r + k) % len(WORDS)] for k in range(1 + i % 3))}]
    rec = {"id": str(i), "conversations": turns}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """14 records: 9 good (6 with an image, 3 text-only), and 5 bad ones of different kinds."""
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        pixels = (np.random.default_rng(i).random((28, 28, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    (root / "corrupt.png").write_bytes(b"not a png")
    records = [_record(i, image=f"{i % 3}.png" if i < 6 else None, rounds=1 + i % 2) for i in range(9)]
    records[2:2] = [_record(20, image="missing.png")]
    records[5:5] = [_record(21, image="corrupt.png"), {"id": "empty", "conversations": []}]
    records[9:9] = [{"id": "robot", "conversations": [{"from": "robot", "value": "?"}]},
                    {"id": "long", "conversations": [{"from": "human", "value": "what"},
                                                     {"from": "gpt", "value": " ".join(WORDS * 8)}]}]
    path = root / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path), str(root)


BAD = {"missing or unreadable image": 2, "empty conversation": 1, "malformed conversation": 1,
       "longer than max_length": 1}


def _dataset(image_data):
    path, folder = image_data
    return ConversationDataset.from_json(path, build_processor(WORDS), folder, max_length=60)


def _rows(batch):
    """The unpadded token ids of each sample of a micro-batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def _global_batches(ds, world, workers, n, state=None, group=False):
    """n global micro-batches of 4 samples, each rank's share concatenated in rank order."""
    streams = [SampleStream(ds, batch_size=4 // world, seed=3, rank=r, world=world, num_workers=workers,
                            group_by_length=group, state=state) for r in range(world)]
    out = [sum((_rows(next(s)) for s in streams), []) for _ in range(n)]
    for s in streams:
        s.close()
    return out, streams


def test_index_opens_and_tokenizes_nothing(image_data, monkeypatch):
    opened, rendered = [], []
    real_open = encode.Image.open
    monkeypatch.setattr(encode.Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    processor = build_processor(WORDS)
    real_render = processor.apply_chat_template
    monkeypatch.setattr(processor, "apply_chat_template", lambda *a, **k: rendered.append(a) or real_render(*a, **k))
    monkeypatch.setattr(processor.tokenizer, "__call__", lambda *a, **k: pytest.fail("tokenized while indexing"))
    path, folder = image_data
    ds = ConversationDataset.from_json(path, processor, folder, max_length=60)
    assert len(ds) == 14 and opened == [] and rendered == []
    assert ds.index.has_image.tolist() == [bool(r.get("image")) for r in json.load(open(path))]
    monkeypatch.undo()
    assert ds[0]["labels"].ne(data.IGNORE).any() and ds[0]["pixel_values"].shape[0] == 1


def test_index_is_compact_and_streamed(tmp_path):
    n = 50_000
    records = [{"id": i, "image": f"{i % 7}.png", "conversations": [
        {"from": "human", "value": f"<image>\nq {i} é"}, {"from": "gpt", "value": f"a{i} \u2713"}]} for i in range(n)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    chunk = 1 << 20
    assert path.stat().st_size > 4 * chunk
    tracemalloc.start()
    try:
        index = RecordIndex.from_json(str(path), chunk_bytes=chunk)
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == n and index.nbytes == 17 * n
    assert retained < 24 * n                       # the arrays, not a dict per record
    assert peak < 4 * chunk + 2 * 17 * n           # text a chunk at a time, never a list of dicts
    for i in (0, 1, n // 2, n - 1):                # UTF-8 decoded from the byte range, not latin-1
        assert index[i] == records[i]


@pytest.mark.parametrize("processes", [2, 3, 7])
def test_parallel_index_equals_serial_even_when_a_guess_lies_in_a_string(tmp_path, processes):
    # Long strings full of "}, {" put most range guesses inside a string; the chain check must catch them.
    trap = '"}, {"image": "x"}, {' * 40
    records = [{"id": i, "conversations": [{"from": "gpt", "value": trap if i % 3 else "ok"}],
                **({"image": f"{i}.png"} if i % 2 else {})} for i in range(60)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(records))
    serial = RecordIndex.from_json(str(path), chunk_bytes=512, processes=1)
    parallel = RecordIndex.from_json(str(path), chunk_bytes=512, processes=processes)
    for name in ("starts", "ends", "has_image"):
        assert np.array_equal(getattr(parallel, name), getattr(serial, name)), name
    assert [parallel[i] for i in range(60)] == records and serial.has_image.tolist() == [i % 2 == 1 for i in range(60)]
    path.write_text(json.dumps(records)[:-40])
    with pytest.raises(ValueError, match="invalid JSON"):
        RecordIndex.from_json(str(path), chunk_bytes=512, processes=processes)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_scanner_across_chunk_boundaries(tmp_path, chunk):
    items = [*({"a": "x,]}\"" * k, "n": 12345678901 + k, "u": "ü€"} for k in range(5)), [1, 2], 3.25, "s]",
             None, True, {}]
    path = tmp_path / "x.json"
    path.write_text(" [ " + " ,\n ".join(json.dumps(x, ensure_ascii=False) for x in items) + " ]\n")
    blob = path.read_bytes()
    got = list(_scan_json_list(str(path), chunk_bytes=chunk))
    assert [json.loads(blob[s:e]) for s, e, _ in got] == json.loads(blob)
    path.write_text("[]")
    assert list(_scan_json_list(str(path), chunk_bytes=chunk)) == []
    for bad, message in (('{"a": 1}', "expected a JSON list"), ('[{"a": 1}, {"b": ', "invalid JSON"),
                         ('[{"a": 1} {"b": 2}]', "expected ',' or ']'")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            list(_scan_json_list(str(path), chunk_bytes=chunk))


def test_bad_samples_skipped_and_counted_the_same_for_any_workers_and_ranks(image_data):
    ds = _dataset(image_data)
    bad_ids = {"20", "21", "empty", "robot", "long"}
    reference, (stream,) = _global_batches(ds, world=1, workers=0, n=9)
    assert stream.skipped == BAD                  # 36 draws from 14 records meet every bad one
    assert {ds.index[r]["id"] for r in stream.bad} == bad_ids
    assert all(len(b) == 4 for b in reference)    # a bad draw is replaced, never dropped
    good_texts = set()
    for i in range(len(ds)):
        try:
            good_texts.add(tuple(ds[i]["input_ids"].tolist()))
        except SkipSample:
            pass
    assert len(good_texts) == 9 and all(tuple(row) in good_texts for b in reference for row in b)
    for world, workers in ((1, 2), (2, 0), (2, 2), (4, 1)):
        batches, streams = _global_batches(ds, world, workers, n=9)
        assert batches == reference, (world, workers)
        assert set().union(*(s.bad for s in streams)) == set(stream.bad)


def test_sample_cache_encodes_each_record_once_and_changes_nothing(image_data, monkeypatch):
    path, folder = image_data
    plain = _dataset(image_data)
    cached = ConversationDataset.from_json(path, build_processor(WORDS), folder, max_length=60, cache=True)
    encoded = []
    real_encode = cached._encode
    monkeypatch.setattr(cached, "_encode", lambda i: encoded.append(i) or real_encode(i))
    reference, (stream,) = _global_batches(plain, world=1, workers=0, n=9)
    batches, (cached_stream,) = _global_batches(cached, world=1, workers=0, n=9)
    assert batches == reference and cached_stream.bad == stream.bad
    assert sorted(encoded) == list(range(len(cached)))   # 36 draws of 14 records: each encoded once
    for i in range(len(cached)):   # the same tensors, the same skips with their reasons
        try:
            want = plain[i]
        except SkipSample as skip:
            with pytest.raises(SkipSample) as got:
                cached[i]
            assert got.value.reason == skip.reason
            continue
        got = cached[i]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        got.pop("labels")   # a caller's changes to the dict it got do not reach the cache
        assert "labels" in cached[i]
    assert sorted(encoded) == list(range(len(cached)))


def test_resume_continues_with_the_next_micro_batch(image_data):
    ds = _dataset(image_data)
    full, _ = _global_batches(ds, world=1, workers=0, n=7)
    first = SampleStream(ds, batch_size=4, seed=3)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    assert state["position"] == 12
    rest, (resumed,) = _global_batches(ds, world=1, workers=2, n=4, state=state)
    assert rest == full[3:]
    two_ranks, _ = _global_batches(ds, world=2, workers=0, n=4, state=state)
    assert two_ranks == full[3:]
    assert resumed.state_dict()["position"] == 28 and set(state["bad"]) <= set(resumed.bad)


def test_group_by_length_keeps_every_record_once_per_epoch():
    index = RecordIndex.from_records([_record(i, image="x.png" if i % 3 else None, rounds=1 + i % 3)
                                      for i in range(1000)])
    order = SampleOrder(index, seed=1, micro_batch=8, group_by_length=True)
    for epoch in (0, 1):
        perm = order.epoch_order(epoch)
        assert sorted(perm.tolist()) == list(range(1000))
    perm = order.epoch_order(0).reshape(-1, 8)
    mixed = sum(len(set(index.has_image[b].tolist())) > 1 for b in perm)
    assert mixed <= 1000 // (8 * data.GROUP_CHUNK) + 1   # at most the chunk's one modality boundary
    spread = np.mean([np.ptp(index.lengths()[b]) for b in perm])
    plain = SampleOrder(index, seed=1, micro_batch=8).epoch_order(0).reshape(-1, 8)
    assert spread < 0.5 * np.mean([np.ptp(index.lengths()[b]) for b in plain])
    again = SampleOrder(index, seed=1, micro_batch=8, group_by_length=True)
    assert np.array_equal(again.epoch_order(1), order.epoch_order(1))


def test_stream_rejects_bad_arguments_and_unusable_data(image_data, tmp_path):
    ds = _dataset(image_data)
    for kw, match in ((dict(batch_size=0), "batch_size"), (dict(world=2, rank=2), "rank"),
                      (dict(num_workers=-1), "num_workers"), (dict(state={"position": -4}), "position")):
        with pytest.raises(ValueError, match=match):
            SampleStream(ds, **{"batch_size": 2, "seed": 0, **kw})
    only_bad = ConversationDataset([{"id": "x", "conversations": []}], build_processor(WORDS), "", 60)
    with pytest.raises(GraceError, match=f"{MAX_DRAWS} draws in a row were unusable.*empty conversation: {MAX_DRAWS}"):
        next(SampleStream(only_bad, batch_size=1, seed=0))   # one line for the CLI, not a RuntimeError
    with pytest.raises(ValueError, match="max_length"):
        ConversationDataset([], build_processor(WORDS), "", 0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        TrainConfig(num_workers=-1).validate(check_paths=False)


def test_build_loader_follows_the_config(image_data):
    ds = _dataset(image_data)
    cfg = TrainConfig(batch_size=2, seed=3, num_workers=0, group_by_length=False)
    reference, _ = _global_batches(ds, world=2, workers=0, n=2)
    streams = [build_loader(cfg, ds, rank, 2) for rank in range(2)]
    assert [sum((_rows(next(s)) for s in streams), []) for _ in range(2)] == reference


# Labels under a byte-level BPE tokenizer and a Qwen2-VL-style chat template (system turn, <|im_start|>).

QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A generation prompt ending in a space: byte-level BPE merges it with the answer's first word.
SPACE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {{ m['content'][-1]['text'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
           "<|video_pad|>"]
SENTENCES = ["You are a helpful assistant.", "What is the color of this object?", "The object is red.",
             "How many circles are there in the image?", "There are two circles and one square.",
             "Describe the scene in one sentence.", "A red circle sits above a blue square.", " red", " blue",
             "ASSISTANT: red", "USER: what", "yes\n\nno", "\n\nThe answer is yes."]


@pytest.fixture(scope="module")
def bpe_processor():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.image_token, fast.video_token = "<|image_pad|>", "<|video_pad|>"
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2,
                                   merge_size=2)
    return Qwen2VLProcessor(image_processor=images, tokenizer=fast, chat_template=QWEN_TEMPLATE,
                            video_processor=Qwen2VLVideoProcessor())


CONVERSATIONS = [
    [("human", "<image>\nWhat is the color of this object?"), ("gpt", "The object is red."),
     ("human", "How many circles are there?"), ("gpt", "\n\nThere are two circles and one square.")],
    [("human", "Describe the scene in one sentence."), ("gpt", " A red circle sits above a blue square."),
     ("human", "yes?"), ("gpt", "yes\n\nno"), ("human", "red?"), ("gpt", "red")],
]


def _supervised_runs(labels, ids):
    """Maximal runs of supervised positions as (start, end)."""
    mask = (labels != data.IGNORE).tolist() + [False]
    runs, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    assert all(torch.equal(labels[a:b], ids[a:b]) for a, b in runs)
    return runs


@pytest.mark.parametrize("template", ["qwen", "space"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_labels_are_exactly_the_assistant_turns(bpe_processor, tmp_path, template, conv):
    processor = bpe_processor
    processor.chat_template = QWEN_TEMPLATE if template == "qwen" else SPACE_TEMPLATE
    turns = CONVERSATIONS[conv]
    image = None
    if any("<image>" in v for _, v in turns):
        image = "img.png"
        Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)).save(tmp_path / image)
    rec = {"id": "c", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image:
        rec["image"] = image
    sample = ConversationDataset([rec], processor, str(tmp_path), max_length=512)[0]
    ids, labels = sample["input_ids"], sample["labels"]
    tok = processor.tokenizer
    assert (ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == (4 if image else 0)
    answers = [v for f, v in turns if f == "gpt"]
    end = "<|im_end|>\n" if template == "qwen" else "<|im_end|>"
    runs = _supervised_runs(labels, ids)
    assert len(runs) == len(answers)
    decode = lambda t: tok.decode(t, clean_up_tokenization_spaces=False)
    for (a, b), answer in zip(runs, answers, strict=True):
        text = decode(ids[a:b].tolist())
        # A token straddling the turn's start may carry whitespace of the generation prompt, nothing else.
        assert text.endswith(answer + end) and text[:-len(answer + end)].strip() == "", (text, answer)
    prompt = "<|im_start|>assistant" if template == "qwen" else "ASSISTANT:"
    for prev_end, (a, _) in zip([0, *(b for _, b in runs[:-1])], runs, strict=True):
        assert decode(ids[prev_end:a].tolist()).rstrip().endswith(prompt)   # the text between runs is prompt
    assert runs[-1][1] == len(ids)


def test_prefix_tokenization_would_misplace_the_space_template_span(bpe_processor):
    """The case the labels are built for: tokenizing the rendered prefix separately gives ids that are not
    a prefix of the whole conversation's ids (" red" is one token in the whole, ":" + " " in the prefix)."""
    processor = bpe_processor
    processor.chat_template = SPACE_TEMPLATE
    msgs = to_messages([{"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}])
    full = processor.apply_chat_template(msgs, tokenize=False)
    prefix = processor.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    tok = processor.tokenizer
    whole, part = tok(full)["input_ids"], tok(prefix)["input_ids"]
    assert whole[:len(part)] != part
    labels = assistant_labels(processor, msgs, full, torch.tensor(whole))
    supervised = labels[labels != data.IGNORE].tolist()
    assert tok.decode(supervised, clean_up_tokenization_spaces=False) == " red<|im_end|>"


def test_inconsistent_template_is_skipped_and_counted(bpe_processor):
    processor = bpe_processor
    processor.chat_template = QWEN_TEMPLATE.replace("<|im_end|>\n{% endfor %}",
                                                    "<|im_end|>\n{% if loop.last %}(end){% endif %}{% endfor %}")
    ds = ConversationDataset([{"id": "t", "conversations": [{"from": "human", "value": "yes?"},
                                                            {"from": "gpt", "value": "yes"},
                                                            {"from": "human", "value": "no?"},
                                                            {"from": "gpt", "value": "no"}]}], processor, "", 512)
    with pytest.raises(SkipSample, match="prefix inconsistently"):
        ds[0]
