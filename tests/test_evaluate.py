"""Evaluation and generation on a tiny untrained LLaVA; the scoring checked with a generate that is
made to answer right, wrong, or half right."""

import json
import os

import pytest
import torch

from grace.demo.synthetic import QUESTION_TYPES, write_task
from grace.demo.tiny import build_tiny_vlm
from grace.evaluate import EvalResult, evaluate, generate, model_weight_bytes, normalize_answer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_vlm(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    paths = write_task(str(tmp_path_factory.mktemp("task")), 0, 10)
    with open(paths["eval"]) as f:
        return json.load(f), paths["image_folder"]


def _scripted_generate(model, processor, replies):
    """A stand-in for model.generate that answers the prompts, in order, with ``replies`` followed by
    EOS and then padding, the way a finished row is padded while the rest of its batch decodes."""
    tok = processor.tokenizer
    queue = list(replies)

    def fake(input_ids, max_new_tokens, **kwargs):
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = tok(queue.pop(0), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(ids + [tok.pad_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    return fake


def test_untrained_tiny_llava(tiny, task):
    model, processor = tiny
    records, folder = task
    res = evaluate(model, processor, records, folder, batch_size=4, progress=False)
    assert isinstance(res, EvalResult)
    assert 0.0 <= res.accuracy <= 1.0 and res.total == len(records) and res.skipped == {}
    assert set(res.per_type) == set(QUESTION_TYPES)
    assert sum(t["total"] for t in res.per_type.values()) == len(records)
    expected = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert res.weight_bytes == expected == model_weight_bytes(model)
    assert 1 <= res.generated_tokens <= 8 * len(records) and res.tokens_per_s > 0
    assert res.peak_memory_kind == "process_peak_rss" and res.peak_memory_bytes > 0
    assert [p["id"] for p in res.predictions] == [r["id"] for r in records]
    assert not model.training
    json.dumps(res.to_dict())
    assert "predictions" not in res.to_dict(predictions=False)


def test_weight_bytes_count_buffers_at_their_dtype():
    m = torch.nn.Linear(128, 16, bias=False)
    m.register_buffer("packed", torch.zeros(16, 16, dtype=torch.int32))
    m.register_buffer("scale", torch.zeros(16, 1, dtype=torch.float16))
    assert model_weight_bytes(m) == 128 * 16 * 4 + 16 * 16 * 4 + 16 * 2


@pytest.mark.parametrize("batch_size", [3, 16])
def test_scoring_right_wrong_and_half(tiny, task, monkeypatch, batch_size):
    model, processor = tiny
    records, folder = task
    answers = [r["answer"] for r in records]

    # Right answers, with a trailing period that normalisation removes: accuracy 1.
    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, [f"{a} ." for a in answers]))
    res = evaluate(model, processor, records, folder, batch_size=batch_size, progress=False)
    assert res.accuracy == 1.0 and res.correct == len(records)
    assert all(t["accuracy"] == 1.0 for t in res.per_type.values())
    # the answer's words ("top left" is two), ".", EOS; the padding after EOS is not counted
    assert res.generated_tokens == sum(len(a.split()) + 2 for a in answers)

    # An answer that is wrong for every record (no answer is "no"): accuracy 0.
    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, ["no"] * len(records)))
    res = evaluate(model, processor, records, folder, batch_size=batch_size, progress=False)
    assert res.accuracy == 0.0 and res.correct == 0 and all(not p["correct"] for p in res.predictions)

    # Right on even records only: per-type accuracy must follow which records were right.
    replies = [a if i % 2 == 0 else "no" for i, a in enumerate(answers)]
    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, replies))
    res = evaluate(model, processor, records, folder, batch_size=batch_size, progress=False)
    assert res.correct == (len(records) + 1) // 2
    for qtype, t in res.per_type.items():
        idx = [i for i, r in enumerate(records) if r["question_type"] == qtype]
        assert t["total"] == len(idx) and t["correct"] == sum(i % 2 == 0 for i in idx)
        assert t["accuracy"] == pytest.approx(t["correct"] / t["total"])


def test_bad_records_are_skipped_and_counted(tiny, task, tmp_path, monkeypatch):
    model, processor = tiny
    records, folder = task
    good = [dict(r, image=os.path.abspath(os.path.join(folder, r["image"]))) for r in records[:3]]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    turns = records[0]["conversations"]
    bad = [dict(records[0], image="no/such/file.png"), dict(records[0], image=str(corrupt)),
           {"id": "x", "image": good[0]["image"], "conversations": [{"from": "robot", "value": "?"}]},
           {"id": "y", "image": good[0]["image"], "conversations": turns[:1]}]
    text_only = {"id": "t", "question_type": "text",
                 "conversations": [{"from": "human", "value": "how many are there ?"}, {"from": "gpt", "value": "two"}]}
    mixed = [bad[0], good[0], text_only, bad[1], good[1], bad[2], good[2], bad[3]]
    replies = [r["answer"] for r in good] + ["two"]   # image prompts are batched first, text-only last
    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, replies))
    res = evaluate(model, processor, mixed, str(tmp_path), batch_size=2, progress=False)
    assert res.skipped == {"missing or unreadable image": 2, "malformed conversation": 1, "no assistant turn": 1}
    assert res.total == 4 and res.accuracy == 1.0 and res.per_type["text"]["total"] == 1
    assert [p["id"] for p in res.predictions] == [good[0]["id"], "t", good[1]["id"], good[2]["id"]]


def test_real_generate_on_mixed_image_and_text_batches(tiny, task):
    model, processor = tiny
    records, folder = task
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "how many are there ?"},
                                              {"from": "gpt", "value": "two"}]}
    res = evaluate(model, processor, records[:3] + [text_only], folder, batch_size=2, max_new_tokens=3,
                   progress=False)
    assert res.total == 4 and set(res.per_type) == {"color", "shape", "count", "other"}
    assert all(isinstance(p["prediction"], str) for p in res.predictions)


def test_generate_one_answer(tiny, task):
    model, processor = tiny
    records, folder = task
    image = os.path.join(folder, records[0]["image"])
    out = generate(model, processor, image, "<image>\nwhat is the color of the object ?", max_new_tokens=4)
    assert isinstance(out, str) and len(out.split()) <= 4
    assert out == generate(model, processor, image, "what is the color of the object ?", max_new_tokens=4)
    with pytest.raises(ValueError, match="cannot read image"):
        generate(model, processor, os.path.join(folder, "missing.png"), "what is the color of the object ?")
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, processor, image, "<image> ")


def test_argument_errors(tiny, task):
    model, processor = tiny
    records, folder = task
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, processor, records, folder, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="must be a list"):
        evaluate(model, processor, {"a": 1}, folder, progress=False)
    with pytest.raises(ValueError, match="records is empty"):
        evaluate(model, processor, [], folder, progress=False)


def test_every_record_skipped_is_an_error_naming_the_folder(tiny, task, tmp_path):
    model, processor = tiny
    records, _ = task
    wrong = tmp_path / "not-the-images"
    wrong.mkdir()
    with pytest.raises(ValueError, match=rf"none of the {len(records)} records.*missing or unreadable image: "
                                         rf"{len(records)}.*{wrong}.*--image-folder"):
        evaluate(model, processor, records, str(wrong), progress=False)


def _cli_eval(args, capsys):
    from grace.cli import main

    rc = main(["eval", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_eval_wrong_image_folder_and_verbose(tiny_path, task, tmp_path, capsys):
    records, folder = task
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records[:2]))
    rc, out, err = _cli_eval([tiny_path, "--data", str(data), "--image-folder", str(tmp_path), "--device", "cpu"],
                             capsys)
    assert rc == 2 and out == ""
    # stderr also carries transformers' loading progress bar; the error itself is one line
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err
    assert "none of the 2 records" in errors[0] and str(tmp_path) in errors[0]

    rc, _, err = _cli_eval([tiny_path, "--data", str(data), "--image-folder", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "nowhere' is not a directory" in err

    common = [tiny_path, "--data", str(data), "--image-folder", folder, "--device", "cpu", "--max-new-tokens", "2"]
    rc, out, _ = _cli_eval(common + ["--json", str(tmp_path / "r.json")], capsys)
    summary = json.loads(out[out.index("{"):])
    assert rc == 0 and summary["total"] == 2 and "predictions" not in summary
    assert [p["id"] for p in json.loads((tmp_path / "r.json").read_text())["predictions"]] == \
        [r["id"] for r in records[:2]]
    rc, out, _ = _cli_eval(common + ["--verbose"], capsys)
    summary = json.loads(out[out.index("{"):])
    assert rc == 0 and [p["id"] for p in summary["predictions"]] == [r["id"] for r in records[:2]]


@pytest.mark.parametrize("text, expected", [(" Red .", "red"), ("two!", "two"), ("top  left", "top left"),
                                            ("circle ?.", "circle"), ("", "")])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected
