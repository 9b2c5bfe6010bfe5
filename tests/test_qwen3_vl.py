"""Qwen3-VL, the family of the authors' release, end to end on tiny local checkpoints: GRACE training,
INT4 export, loading (ours and transformers' compressed-tensors path) and greedy generation."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from grace import TrainConfig, train
from grace.demo.tiny import QWEN3_IMAGE_SIZE, build_tiny_vlm
from grace.evaluate import generate
from grace.export import export_run
from grace.families import family_of
from grace.load import load_int4_model, load_student
from grace_kernels.nn import QuantLinear, W4A16Linear

pytestmark = pytest.mark.usefixtures("reference_backend")   # the kernels are parity-tested in their own files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl")
    (root / "images").mkdir()
    records = []
    for i in range(4):
        pixels = (np.random.default_rng(i).random((QWEN3_IMAGE_SIZE, QWEN3_IMAGE_SIZE, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color of this object ?"},
            {"from": "gpt", "value": ["red", "green", "blue", "yellow"][i]}]})
    (root / "data.json").write_text(json.dumps(records))
    teacher = build_tiny_vlm(str(root / "teacher"), family="qwen3_vl", size="teacher", seed=1)
    student = build_tiny_vlm(str(root / "student"), family="qwen3_vl", size="student", seed=2)
    cfg = TrainConfig(teacher=teacher, student=student, data=str(root / "data.json"),
                      image_folder=str(root / "images"), output_dir=str(root / "run"), max_steps=2, batch_size=2,
                      grad_accum=1, lr=1e-3, seed=0)
    result = train(cfg, progress=False)
    export = export_run(result.run_dir, str(root / "int4"))
    return {"root": root, "student": student, "result": result, "export": export}


def test_family_adapter_reads_qwen3_vl(trained):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(trained["student"])
    family = family_of(config)
    assert family.name == "qwen3_vl"
    model = AutoModelForImageTextToText.from_pretrained(trained["student"])
    assert type(family.vision_tower(model)).__name__ == "Qwen3VLVisionModel"
    assert len(family.decoder_layers(model)) == config.text_config.num_hidden_layers
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    assert family.image_token_counts(config, {"image_grid_thw": grid}).tolist() == [4, 8]


def test_trains_with_every_term(trained):
    result = trained["result"]
    assert result.steps == 2 and len(result.metrics) == 2
    row = result.metrics[-1]
    assert all(np.isfinite(row[k]) for k in ("loss", "ce", "gdkd", "rcka"))
    assert row["gdkd"] > 0 and row["rcka"] > 0 and 0 < row["gate"] <= 1
    quantized = json.load(open(os.path.join(result.final_dir, "quantization.json")))["modules"]
    assert len(quantized) == 2 * 7          # q, k, v, o, gate, up, down in each of the 2 decoder blocks
    assert not any("visual" in name or "lm_head" in name for name in quantized)


def _inputs(processor):
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (QWEN3_IMAGE_SIZE, QWEN3_IMAGE_SIZE, 3),
                                                            dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[text], return_tensors="pt")


def test_int4_export_serves_the_trained_student(trained):
    int4, _ = load_int4_model(trained["export"])
    student, processor = load_student(trained["result"].run_dir)
    qlayers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    assert qlayers and set(qlayers) == {n for n, m in int4.named_modules() if isinstance(m, W4A16Linear)}
    for name, ql in qlayers.items():   # exactly the weights the student trained with
        assert torch.equal(int4.get_submodule(name).int4_weight.dequantize(), ql.fake_quant_weight()), name
    inputs = _inputs(processor)
    with torch.no_grad():
        ours, fake = int4(**inputs).logits, student(**inputs).logits
    assert ours.shape == fake.shape and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, fake, rtol=1e-4, atol=1e-4)


def test_transformers_loads_the_export(trained):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    model, info = AutoModelForImageTextToText.from_pretrained(
        trained["export"], quantization_config=CompressedTensorsConfig(dequantize=True), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


def test_generates_from_the_int4_export(trained):
    int4, processor = load_int4_model(trained["export"])
    image = trained["root"] / "images" / "0.png"
    answer = generate(int4, processor, str(image), "what is the color of this object ?", max_new_tokens=3)
    assert isinstance(answer, str)
    inputs = _inputs(processor)
    out = int4.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
