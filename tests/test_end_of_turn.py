"""Every assistant turn's end token is supervised, whatever the chat template renders: llava-hf's LLaVA-1.5
template writes no end-of-sequence token after an answer (the tokenizer's EOS is appended, and the log says so
once), Qwen's writes <|im_end|> (left as it is, never doubled)."""

import json
import os
import shutil

import pytest
import test_data
import test_real_data
import torch
from test_real_data import grace_train, metrics

from grace.data import IGNORE, ConversationDataset, end_assistant_turns, template_ends_turns, to_messages
from grace.demo.tiny import build_processor

pair = test_real_data.pair   # fixtures shared with the modules that define them
bpe_processor = test_data.bpe_processor

# llava-hf/llava-1.5-7b-hf chat_template.json on the Hub (also in transformers' LLaVA processor tests): the
# assistant turn is its text and a space, no </s>; a system turn is its text, unprefixed.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
NOTE = "the chat template writes no end-of-sequence token after an assistant turn"
MULTI_TURN = [{"from": "human", "value": "how many objects are there ?"}, {"from": "gpt", "value": "two"},
              {"from": "human", "value": "where are they ?"}, {"from": "gpt", "value": "top left"}]


def _runs(labels):
    """The supervised runs of ``labels`` as lists of ids."""
    runs, cur = [], []
    for t in labels.tolist() + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def test_llava_hf_template_gets_the_eos_after_every_answer():
    processor = build_processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    tok = processor.tokenizer
    assert not template_ends_turns(processor)
    sample = ConversationDataset([{"id": "t", "conversations": MULTI_TURN}], processor, "", 128)[0]
    words = [tok.convert_ids_to_tokens(run) for run in _runs(sample["labels"])]
    assert words == [["two", "</s>"], ["top", "left", "</s>"]]   # as LLaVA's own training: "ASSISTANT: two</s>"
    _, text = end_assistant_turns(processor, to_messages(MULTI_TURN))
    assert text.count("</s>") == 2 and "ASSISTANT: two</s> USER:" in text, text


def test_tiny_template_that_writes_the_eos_is_left_as_it_renders():
    processor = build_processor()
    msgs = to_messages(MULTI_TURN)
    ended, text = end_assistant_turns(processor, msgs)
    assert ended == msgs and text == processor.apply_chat_template(msgs, tokenize=False)
    assert template_ends_turns(processor)


def test_qwen_template_im_end_is_supervised_once(bpe_processor):
    processor = bpe_processor
    processor.chat_template = test_data.QWEN_TEMPLATE
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>" and template_ends_turns(processor)
    sample = ConversationDataset([{"id": "q", "conversations": MULTI_TURN}], processor, "", 256)[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = _runs(sample["labels"])
    assert len(runs) == 2 and all(run.count(im_end) == 1 for run in runs)
    assert int((sample["input_ids"] == im_end).sum()) == 5   # system, two user and two assistant turns


def test_generation_config_eos_counts_as_an_end_token(bpe_processor):
    """A template ending turns with <|im_end|> while the tokenizer's EOS is another token (a base model's
    <|endoftext|>): the generation config's end tokens count, nothing is appended."""
    processor = bpe_processor
    processor.chat_template = test_data.QWEN_TEMPLATE
    msgs = to_messages(MULTI_TURN)
    tok = processor.tokenizer
    eos = tok.eos_token
    try:
        tok.eos_token = "<|pad|>"
        appended, _ = end_assistant_turns(processor, msgs)
        assert appended != msgs   # with only the tokenizer's EOS, <|im_end|> does not count
        ended, _ = end_assistant_turns(processor, msgs, ("<|pad|>", "<|im_end|>"))
        assert ended == msgs
    finally:
        tok.eos_token = eos


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "chat_template.jinja"), "w") as f:
        f.write(template)
    return str(dst)


# Supervised targets of one epoch of test_real_data's mix665k-like data, each answer followed by its end token:
# 3 one-word image answers, 3 text conversations ("two", "top left"), one two-turn image conversation.
EPOCH_TARGETS = 3 * 2 + 3 * (2 + 3) + 2 * 2


@pytest.mark.parametrize("pair", ["llava"], indirect=True)
def test_grace_train_with_the_llava_hf_template_supervises_the_eos(pair, tmp_path):
    student = _with_template(pair["student"], tmp_path / "student", LLAVA_HF_TEMPLATE)
    teacher = _with_template(pair["teacher"], tmp_path / "teacher", LLAVA_HF_TEMPLATE)
    n = len(json.load(open(pair["data"])))
    proc = grace_train(pair, tmp_path / "run", "--max-steps", str(n), student=student, teacher=teacher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(NOTE) == 1 and "'</s>' is appended to every assistant turn" in proc.stdout
    # batch 1, one epoch: every record once, each answer's </s> among the targets
    assert sum(r["tokens"] for r in metrics(tmp_path / "run")) == EPOCH_TARGETS


@pytest.mark.parametrize("pair", ["qwen2_vl"], indirect=True)
def test_grace_train_with_a_template_that_ends_turns_appends_nothing(pair, tmp_path):
    n = len(json.load(open(pair["data"])))
    proc = grace_train(pair, tmp_path / "run", "--max-steps", str(n))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NOTE not in proc.stdout
    assert sum(r["tokens"] for r in metrics(tmp_path / "run")) == EPOCH_TARGETS


def test_labels_never_supervise_the_prompt_with_the_appended_eos():
    processor = build_processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    sample = ConversationDataset([{"id": "t", "conversations": MULTI_TURN}], processor, "", 128)[0]
    tok = processor.tokenizer
    supervised = set(tok.convert_ids_to_tokens(sample["input_ids"][sample["labels"] != IGNORE].tolist()))
    assert supervised == {"two", "top", "left", "</s>"}
    assert torch.equal(sample["labels"][sample["labels"] != IGNORE], sample["input_ids"][sample["labels"] != IGNORE])
