"""The shapes real conversation data comes in: ShareGPT system turns, files in another encoding or nesting,
records whose <image> tags or images do not fit, data no sample of which is usable, and images that are rotated
by EXIF, 16-bit or float. `grace train` runs in a subprocess on tiny checkpoints and mix665k-shaped data
(test_real_data); a refusal is one line, exit 2, and leaves nothing that makes the corrected retry need
--overwrite."""

import json
import os

import numpy as np
import pytest
import test_real_data
from PIL import Image
from test_end_of_turn import LLAVA_HF_TEMPLATE
from test_real_data import assert_one_line_error, grace_train, metrics

from grace.data import (
    IGNORE,
    ConversationDataset,
    RecordIndex,
    SkipSample,
    end_assistant_turns,
    load_image,
    parse_record,
)
from grace.demo.tiny import build_processor

pair = test_real_data.pair   # the fixture: teacher, student, mix665k-like data, by family
LLAVA = pytest.mark.parametrize("pair", ["llava"], indirect=True)
SYSTEM = {"from": "system", "value": "Answer the question using a single word ."}


def _records(pair):
    return json.load(open(pair["data"]))


def _write(path, records):
    path.write_text(json.dumps(records))
    return str(path)


# --- system turns ---

def test_system_turn_goes_to_the_template_system_slot():
    rec = {"id": "s", "conversations": [SYSTEM, {"from": "human", "value": "what is the color ?"},
                                        {"from": "gpt", "value": "red"}]}
    msgs, image = parse_record(rec)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and image is None
    processor = build_processor()
    for template in (None, LLAVA_HF_TEMPLATE):   # the tiny models' template, then llava-hf's
        if template:
            processor.chat_template = template
        _, text = end_assistant_turns(processor, msgs)
        assert text.startswith("Answer the question using a single word . USER:"), text
        sample = ConversationDataset([rec], processor, "", 128)[0]
        tok = processor.tokenizer
        supervised = tok.convert_ids_to_tokens(sample["input_ids"][sample["labels"] != IGNORE].tolist())
        assert supervised == ["red", "</s>"]   # the system text is context, never a target


def test_system_turn_after_the_first_turn_is_skipped():
    rec = {"conversations": [{"from": "human", "value": "q"}, SYSTEM, {"from": "gpt", "value": "a"}]}
    with pytest.raises(SkipSample, match="system turn after the first turn"):
        parse_record(rec)
    with pytest.raises(SkipSample, match="no user turn before the first assistant turn"):
        parse_record({"conversations": [SYSTEM, {"from": "gpt", "value": "a"}]})


def test_template_that_refuses_a_system_turn_skips_the_record():
    processor = build_processor()
    processor.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}")
    rec = {"conversations": [SYSTEM, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(SkipSample, match="chat template rejected the conversation"):
        ConversationDataset([rec], processor, "", 128)[0]


@LLAVA
def test_grace_train_on_sharegpt_records_with_a_system_turn(pair, tmp_path):
    records = [{**r, "conversations": [SYSTEM, *r["conversations"]]} for r in _records(pair)]
    data = _write(tmp_path / "system.json", records)
    proc = grace_train(pair, tmp_path / "run", "--max-steps", str(len(records)), data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" not in proc.stdout and len(metrics(tmp_path / "run")) == len(records)


# --- files in another shape or encoding ---

@LLAVA
@pytest.mark.parametrize("kind", ["nested", "bom", "utf16", "latin1"])
def test_data_file_in_another_shape_or_encoding_is_one_line(pair, tmp_path, kind):
    records = _records(pair)
    text = json.dumps(records, ensure_ascii=False)
    path = tmp_path / "data.json"
    if kind == "nested":
        path.write_text(json.dumps([records]))
        expect = ("holds a list of lists", "element 0 is a JSON array")
    elif kind == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        expect = ("UTF-8 byte-order mark",)
    elif kind == "utf16":
        path.write_bytes(text.encode("utf-16"))
        expect = ("UTF-16",)
    else:
        records[2]["conversations"][1]["value"] = "caf\u00e9"
        raw = json.dumps(records, ensure_ascii=False).encode("latin-1")
        path.write_bytes(raw)
        expect = ("not UTF-8", f"byte 0xe9 at offset {raw.index(b'caf') + 3}")
    proc = grace_train(pair, tmp_path / "run", data=str(path))
    assert_one_line_error(proc, str(path), *expect)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("chunk", [3, 1 << 20])   # 3: chunk ends split the 2-byte characters
def test_utf8_beyond_ascii_is_read(tmp_path, chunk):
    turns = [{"from": "human", "value": "caf\u00e9 ?"}, {"from": "gpt", "value": "\u00e9t\u00e9"}]
    records = [{"conversations": turns}]
    path = tmp_path / "utf8.json"
    path.write_bytes(json.dumps(records * 3, ensure_ascii=False).encode())
    index = RecordIndex.from_json(str(path), chunk_bytes=chunk)
    assert [index[i] for i in range(3)] == records * 3


# --- records that do not fit their image ---

@LLAVA
def test_two_image_tags_for_one_image_are_skipped_and_counted(pair, tmp_path):
    records = _records(pair)
    records[0]["conversations"][0]["value"] = "<image>\n<image>\nwhat is the color of this object ?"
    data = _write(tmp_path / "two_tags.json", records)
    proc = grace_train(pair, tmp_path / "run", "--max-steps", str(len(records)), data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: skipped 1 bad records: {'image without exactly one <image> token': 1}" in proc.stdout, proc.stdout


# --- data no sample of which is usable: one line, and the corrected retry needs no --overwrite ---

@LLAVA
def test_wrong_image_folder_is_one_line_and_the_retry_needs_no_overwrite(pair, tmp_path):
    out = tmp_path / "run"
    wrong = tmp_path / "no_images"
    wrong.mkdir()
    proc = grace_train(pair, out, images=str(wrong))
    line = assert_one_line_error(proc, "missing or unreadable image: 4", str(wrong), "--image-folder")
    assert "image records" in line, line
    assert not os.path.exists(out)
    proc = grace_train(pair, out, "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]


@LLAVA
def test_image_records_without_an_image_tag_are_one_line(pair, tmp_path):
    records = _records(pair)
    for r in records:
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "")
    data = _write(tmp_path / "no_tags.json", records)
    proc = grace_train(pair, tmp_path / "run", data=data)
    assert_one_line_error(proc, "image without exactly one <image> token: 4")


@LLAVA
def test_every_sample_longer_than_max_length_is_one_line(pair, tmp_path):
    proc = grace_train(pair, tmp_path / "run", "--max-length", "5")
    assert_one_line_error(proc, "longer than max_length", "--max-length 5")
    assert not os.path.exists(tmp_path / "run")


@LLAVA
def test_image_samples_longer_than_max_length_are_refused_not_trained_without(pair, tmp_path):
    """max_length 8 fits the short text-only records (5 tokens) but no image record (16 tokens, 4 of them the
    image's): training would silently run on text alone."""
    records = [r for r in _records(pair) if "image" in r]
    records += [{"id": f"yes{i}", "conversations": [{"from": "human", "value": "yes ?"},
                                                    {"from": "gpt", "value": "yes"}]} for i in range(3)]
    data = _write(tmp_path / "short_text.json", records)
    proc = grace_train(pair, tmp_path / "run", "--max-length", "8", data=data)
    assert_one_line_error(proc, "none of the first 4 image records is usable", "longer than max_length: 4",
                          "--max-length 8")


def test_draws_exhausted_mid_stream_are_one_line(tmp_path):
    """The replacement loop's own limit (MAX_DRAWS bad draws in a row) is a GraceError from the stream, not a
    RuntimeError from inside a DataLoader worker."""
    from grace.data import MAX_DRAWS, SampleStream
    from grace.errors import GraceError

    processor = build_processor()
    rec = {"conversations": [{"from": "human", "value": "what is the color ?"}, {"from": "gpt", "value": "red"}]}
    for workers in (0, 1):
        ds = ConversationDataset([rec] * 3, processor, "", max_length=3)
        stream = SampleStream(ds, batch_size=1, seed=0, num_workers=workers)
        with pytest.raises(GraceError, match=f"{MAX_DRAWS} draws in a row were unusable.*longer than max_length: "
                                             f"{MAX_DRAWS}.*--max-length 3"):
            next(stream)
        stream.close()


# --- images ---

def _save_rotated(path):
    """A 4 x 2 (w x h) image, left half red and right half blue, stored with EXIF orientation 6 (display
    rotated 90 degrees clockwise)."""
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[:, :2, 0] = 255
    pixels[:, 2:, 2] = 255
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif)


def test_exif_orientation_is_applied(tmp_path):
    _save_rotated(tmp_path / "rot.png")
    im = load_image(str(tmp_path / "rot.png"))
    assert im.size == (2, 4) and im.mode == "RGB"   # displayed upright: 2 wide, 4 tall
    a = np.asarray(im)
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[-1, 0]) == (0, 0, 255)   # red on top after the turn


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    a = np.asarray(load_image(str(tmp_path / "deep.png")))
    np.testing.assert_array_equal(a[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert (a[..., 0] == a[..., 2]).all() and 0 < np.median(a) < 255


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_float_images_are_scaled_to_8_bits(tmp_path, scale):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8) * scale
    Image.fromarray(values).save(tmp_path / "float.tiff")   # float32 2-D: mode "F"
    a = np.asarray(load_image(str(tmp_path / "float.tiff")))
    np.testing.assert_array_equal(a[..., 0], np.rint(values / scale * 255).astype(np.uint8))


def test_8_bit_images_are_unchanged(tmp_path):
    pixels = (np.random.default_rng(0).random((6, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "rgb.png"))), pixels)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_a_latin1_byte_is_named_with_its_offset_across_chunks(tmp_path, chunk):
    raw = json.dumps([{"conversations": [{"from": "human", "value": "\u00e9t\u00e9 ?"}]}] * 40,
                     ensure_ascii=False).encode()
    at = len(raw) - 30
    raw = raw[:at] + b"\xe9" + raw[at + 1:]   # a Latin-1 byte where a JSON character stood, after UTF-8 ones
    path = tmp_path / "mixed.json"
    path.write_bytes(raw)
    from grace.errors import GraceError

    with pytest.raises(GraceError, match=f"byte 0xe9 at offset {at} "):
        RecordIndex.from_json(str(path), chunk_bytes=chunk)


@LLAVA
def test_a_start_that_never_took_a_step_needs_no_overwrite(pair, tmp_path):
    """What a start that stopped after writing config.json but before step 1 leaves (a loss that is not finite
    at step 1, a kill while loading) is not a run: the corrected retry starts without --overwrite. A run's log
    or another program's config.json still makes the directory one."""
    from grace.config import TrainConfig

    out = tmp_path / "run"
    out.mkdir()
    TrainConfig(teacher=pair["teacher"], student=pair["student"], data=pair["data"], output_dir=str(out),
                lr=1e9).to_json(str(out / "config.json"))
    (out / "metrics.jsonl").write_text("")
    proc = grace_train(pair, out, "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "config.json"))["lr"] == 1e-3   # the retry's settings
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in ("final", "checkpoint", "controller.png"):   # left: config.json and a log with a step
        os.rename(out / name, tmp_path / f"{name}.aside")
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == ["config.json", "metrics.jsonl"]
    assert_one_line_error(grace_train(pair, out, "--max-steps", "1"), "already holds a run")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert_one_line_error(grace_train(pair, foreign, "--max-steps", "1"), "already holds a run (config.json)")
