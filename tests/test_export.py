"""INT4 export (compressed-tensors pack-quantized) and loading it back, on tiny LLaVA and Qwen2-VL runs.

A "run" here is what training leaves behind: a tiny checkpoint is quantized with quantize_model, its
weights and log-scales are perturbed (so the scales are no longer their initial values), and final/ is
written by grace.train._save_final itself.
"""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from grace import tiny
from grace.config import TrainConfig
from grace.export import (
    COMPRESSED_TENSORS_VERSION,
    _module_checkpoint_names,
    export_run,
    load_int4_model,
    load_model,
    load_student,
)
from grace.quantize import quantize_model
from grace.train import _save_final
from grace_kernels.nn import QuantLinear, W4A16Linear
from grace_kernels.testing import assert_close_to_gold

CASES = [("llava", "bfloat16"), ("llava", "float16"), ("qwen2_vl", "bfloat16")]
GROUP = 128


def _write_final(student, processor, cfg):
    return _save_final(student, student.state_dict(), processor, cfg)


def _make_run(base, out, *, bits=4, scale_dtype="bfloat16", seed=0):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    quantize_model(model, bits=bits, group_size=GROUP, scale_dtype=getattr(torch, scale_dtype), verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if name.endswith("log_scale") else 0.01))
    _write_final(model, processor, TrainConfig(output_dir=str(out), bits=bits, group_size=GROUP,
                                               scale_dtype=scale_dtype))
    return model.eval(), processor


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """case -> the run dict, built once per module: (family, scale dtype) -> run, its export, the student."""
    cache, bases = {}, {}

    def make(family, scale_dtype):
        if family not in getattr(tiny, "FAMILIES", ("llava",)):
            pytest.skip(f"grace.tiny builds no {family} checkpoint")
        if family not in bases:
            bases[family] = tiny.build_tiny_vlm(str(tmp_path_factory.mktemp(family)), family=family)
        if (family, scale_dtype) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{scale_dtype}")
            student, processor = _make_run(bases[family], root / "run", scale_dtype=scale_dtype)
            export = export_run(str(root / "run"), str(root / "int4"))
            cache[family, scale_dtype] = dict(
                family=family, scale_dtype=getattr(torch, scale_dtype), run=str(root / "run"), export=export,
                student=student, processor=processor, base=bases[family], root=root)
        return cache[family, scale_dtype]

    return make


@pytest.fixture(params=CASES, ids=[f"{f}-{d}" for f, d in CASES])
def run(request, make_run):
    return make_run(*request.param)


@pytest.fixture(params=[c for c in CASES if c[1] == "bfloat16"], ids=lambda c: c[0])
def bf16_run(request, make_run):
    """One run per family, for the tests where the scale dtype changes nothing."""
    return make_run(*request.param)


@pytest.fixture
def llava_run(make_run):
    """One run, for the tests of the machinery around the format (errors, atomic writes)."""
    return make_run("llava", "bfloat16")


def _inputs(processor, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    question = {"type": "text", "text": "what color is the circle ?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image, image], text=[text, text + " red"], padding=True, return_tensors="pt")


def _logits(model, inputs, dtype=None):
    inputs = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs).logits


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --------------------------------------------------------------------------- (a) our own loader

def test_int4_logits_equal_fake_quant_student(run, reference_backend):
    int4, _ = load_int4_model(run["export"])
    student, processor = load_student(run["run"])
    qlayers = _quant_layers(student)
    assert set(qlayers) == {n for n, m in int4.named_modules() if isinstance(m, W4A16Linear)}
    assert not any(isinstance(m, QuantLinear) for m in int4.modules())
    for name, ql in qlayers.items():
        # The INT4 layer holds exactly the weight the student computes with, bit for bit.
        assert torch.equal(int4.get_submodule(name).int4_weight.dequantize(), ql.fake_quant_weight()), name

    inputs = _inputs(processor)
    ours = _logits(int4, inputs)
    fake = _logits(student, inputs)
    # load_student rebuilt the very model that was trained.
    assert torch.equal(fake, _logits(run["student"], inputs))
    # Same weights, so only matmul rounding separates the two. The tolerance is the 2x-gold rule: the
    # student with dense copies of its fake-quantized weights, run in float64, is the gold; the same
    # dense model in float32 shows PyTorch's own float32 rounding, and ours may err at most twice that.
    dense = copy.deepcopy(student)
    for name, ql in qlayers.items():
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent), child, ql.to_linear())
    gold = _logits(dense.double(), inputs, torch.float64)
    lowp = _logits(dense.float(), inputs)
    assert_close_to_gold(ours, lowp, gold, atol=1e-6, name="int4 logits")
    assert_close_to_gold(fake, lowp, gold, atol=1e-6, name="fake-quant logits")


# --------------------------------------------------------------------------- (b) a third party reads the files

def test_compressed_tensors_decompresses_our_checkpoint_bit_for_bit(run):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    tensors = load_file(os.path.join(run["export"], "model.safetensors"))
    # The library's model-free dequantizer: reads our config.json, finds the compressor for the format,
    # decompresses every targeted layer, and fails on any quantization tensor left untouched.
    dense = CompressedTensorsDequantizer(run["export"], dtype=torch.float32).validate(dict(tensors))
    with open(os.path.join(run["export"], "config.json")) as f:
        scheme = QuantizationConfig.model_validate(json.load(f)["quantization_config"]).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")

    qlayers = _quant_layers(run["student"])
    on_disk = _module_checkpoint_names(run["student"], list(qlayers))
    for name, ql in qlayers.items():
        key = on_disk[name]
        codes, scales = ql.quantize()
        assert scales.dtype == run["scale_dtype"]
        packed, shape = tensors[f"{key}.weight_packed"], tensors[f"{key}.weight_shape"]
        assert torch.equal(unpack_from_int32(packed, 4, shape), codes), key
        assert torch.equal(tensors[f"{key}.weight_scale"], scales), key
        # The library multiplies in the scale dtype (as vLLM's kernels do): its weight is scale * code
        # rounded once to that dtype.
        expected = (codes.to(scales.dtype) * scales.repeat_interleave(GROUP, dim=1)).float()
        assert torch.equal(dense[f"{key}.weight"], expected), key
        # Given the same scales in float32 (an exact widening) it returns exactly the student's weight.
        wide = compressor.decompress({"weight_packed": packed, "weight_scale": scales.float(), "weight_shape": shape},
                                     scheme)["weight"]
        assert torch.equal(wide, ql.fake_quant_weight()), key
    untouched = [k for k in tensors if not k.rpartition(".")[2].startswith("weight_")]
    assert untouched and all(torch.equal(dense[k].float(), tensors[k].float()) for k in untouched)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_loads_the_export_through_compressed_tensors(run):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    model, info = AutoModelForImageTextToText.from_pretrained(
        run["export"], quantization_config=CompressedTensorsConfig(dequantize=True), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, ql in _quant_layers(run["student"]).items():
        codes, scales = ql.quantize()
        expected = (codes.to(scales.dtype) * scales.repeat_interleave(GROUP, dim=1)).float()
        assert torch.equal(model.get_submodule(name).weight.float(), expected), name
    # the layers kept in full precision arrive unchanged (names mapped through the ignore list)
    lm_head = run["student"].get_output_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight, lm_head)


# --------------------------------------------------------------------------- (c) what is on disk

def test_quantization_config_and_tensors_on_disk(run):
    with open(os.path.join(run["export"], "config.json")) as f:
        config = json.load(f)
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "pack-quantized",
                                                                            "compressed")
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP,
                                "strategy": "group", "dynamic": False}
    student = run["student"]
    qlayers = _quant_layers(student)
    full = [n for n, m in student.named_modules() if type(m) is nn.Linear]
    names = _module_checkpoint_names(student, full + list(qlayers))
    assert sorted(qc["ignore"]) == sorted(names[n] for n in full)
    assert any(n.endswith("lm_head") for n in qc["ignore"])
    assert any(("vision_tower" in n or "visual" in n) for n in qc["ignore"])
    assert any(("multi_modal_projector" in n or "merger" in n) for n in qc["ignore"])

    tensors = load_file(os.path.join(run["export"], "model.safetensors"))
    assert {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")} == {
        names[n] for n in qlayers}
    for name, ql in qlayers.items():
        key, (n, k) = names[name], ql.weight.shape
        assert f"{key}.weight" not in tensors
        assert tensors[f"{key}.weight_packed"].dtype == torch.int32
        assert tuple(tensors[f"{key}.weight_packed"].shape) == (n, k // 8)
        assert tensors[f"{key}.weight_scale"].dtype == run["scale_dtype"]
        assert tuple(tensors[f"{key}.weight_scale"].shape) == (n, k // GROUP)
        assert tensors[f"{key}.weight_shape"].dtype == torch.int64
        assert tensors[f"{key}.weight_shape"].tolist() == [n, k]
    for name in full:
        assert tensors[f"{names[name]}.weight"].dtype == torch.float32

    # The block is what the library itself would write: its own model round-trips it unchanged.
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    mine = {k: v for k, v in qc.items() if k not in ("version", "sparsity_config", "transform_config")}
    assert QuantizationConfig.model_validate(qc).model_dump(mode="json") == mine
    # "version" names the format revision we write, not the installed library: any release reads it.
    assert qc["version"] == COMPRESSED_TENSORS_VERSION and qc["sparsity_config"] == {} and qc["transform_config"] == {}
    # the processor travels with the model
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(run["export"])
    assert processor.tokenizer.get_vocab() == run["processor"].tokenizer.get_vocab()


def test_export_in_bfloat16_for_serving(bf16_run, tmp_path, reference_backend):
    run = bf16_run
    out = export_run(run["run"], str(tmp_path / "bf16"), dtype="bfloat16")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    floats = {t.dtype for k, t in tensors.items() if t.is_floating_point()}
    assert floats == {torch.bfloat16}
    model, processor = load_int4_model(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = _logits(model, _inputs(processor), torch.bfloat16)
    reference = _logits(run["student"], _inputs(processor))
    assert torch.isfinite(logits).all()
    # bf16 activations and weights: same predictions on most positions, not the same bits
    agree = (logits.float().argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_kernel_layout_load_serves_the_same_model(bf16_run, reference_backend):
    # What load_int4_model does by default on a GPU with the extension, forced here on CPU: every layer the
    # CUDA kernel takes holds only the kernel layout; the logits are bit for bit those of the canonical load.
    canonical, processor = load_int4_model(bf16_run["export"], dtype="bfloat16")
    served, _ = load_int4_model(bf16_run["export"], dtype="bfloat16", kernel_layout=True)
    unchanged, _ = load_int4_model(bf16_run["export"], kernel_layout=True)  # float32 activations: no CUDA kernel
    assert all(m.layout == "canonical" for m in unchanged.modules() if isinstance(m, W4A16Linear))
    layers = [m for m in served.modules() if isinstance(m, W4A16Linear)]
    assert layers and all(m.layout == "kernel" for m in layers)
    assert all(m.layout == "canonical" for m in canonical.modules() if isinstance(m, W4A16Linear))
    inputs = _inputs(processor)
    assert torch.equal(_logits(served, inputs, torch.bfloat16), _logits(canonical, inputs, torch.bfloat16))
    sd, ref = served.state_dict(), canonical.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_tied_embeddings_are_saved_once_and_tied_again(llava_run, tmp_path, reference_backend):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(llava_run["base"])
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    base = str(tmp_path / "tied")
    AutoModelForImageTextToText.from_config(config).save_pretrained(base)
    llava_run["processor"].save_pretrained(base)
    student, processor = _make_run(base, tmp_path / "run")
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    out = export_run(str(tmp_path / "run"), str(tmp_path / "int4"))
    assert not any("lm_head" in k for k in load_file(os.path.join(out, "model.safetensors")))
    model, _ = load_int4_model(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    inputs = _inputs(processor)
    # bit-identical weights (checked above for untied runs): float32 summation order is all that may differ
    assert torch.allclose(_logits(model, inputs), _logits(student, inputs), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- load_model dispatch

def test_load_model_dispatches_on_the_directory(bf16_run):
    run = bf16_run
    types = lambda model: {type(m) for m in model.modules()}
    for path in (run["run"], os.path.join(run["run"], "final")):
        model, processor = load_model(path)
        assert QuantLinear in types(model) and W4A16Linear not in types(model) and processor is not None
    model, processor = load_model(run["export"])
    assert W4A16Linear in types(model) and QuantLinear not in types(model) and processor is not None
    model, processor = load_model(run["base"])
    assert W4A16Linear not in types(model) and QuantLinear not in types(model) and processor is not None
    empty = run["root"] / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="neither a model directory"):
        load_model(str(empty))
    with pytest.raises(ValueError, match="not a directory"):
        load_model(os.path.join(run["export"], "config.json"))
    shutil.copy(os.path.join(run["base"], "config.json"), empty / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        load_model(str(empty))


# --------------------------------------------------------------------------- atomic writes

def test_export_is_atomic_and_refuses_to_clobber(llava_run, tmp_path, monkeypatch):
    run = llava_run
    out = tmp_path / "int4"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # Fail after model.safetensors and config.json were written: nothing may appear under out.
    monkeypatch.setattr(type(run["processor"]), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(run["run"], str(out))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    export_run(run["run"], str(out))
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(ValueError, match="not empty"):
        export_run(run["run"], str(out))
    export_run(run["run"], str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["int4"]


# --------------------------------------------------------------------------- (d) bad inputs

def test_export_rejects_bad_inputs(llava_run, tmp_path):
    run = llava_run
    with pytest.raises(ValueError, match="not a finished training run"):
        export_run(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="supported: pack-quantized"):
        export_run(run["run"], str(tmp_path / "out"), format="gptq")
    with pytest.raises(ValueError, match="dtype"):
        export_run(run["run"], str(tmp_path / "out"), dtype="int8")
    _make_run(run["base"], tmp_path / "run8", bits=8)
    with pytest.raises(ValueError, match="bits=8"):
        export_run(str(tmp_path / "run8"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _tampered(run, tmp_path, edit_tensors=None, edit_qc=None):
    path = tmp_path / "tampered"
    shutil.copytree(run["export"], path)
    if edit_tensors:
        tensors = load_file(str(path / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"))
    if edit_qc:
        config = json.loads((path / "config.json").read_text())
        edit_qc(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _first_packed(tensors):
    return next(k for k in sorted(tensors) if k.endswith(".weight_packed"))


def _drop_scale(t):
    del t[_first_packed(t).replace("weight_packed", "weight_scale")]


def _extra(t):
    t["extra.weight"] = torch.zeros(2)


def _narrow(t):
    k = _first_packed(t)
    t[k] = t[k][:, :-1].contiguous()


def _bad_shape(t):
    t[_first_packed(t).replace("weight_packed", "weight_shape")] = torch.tensor([1, 2])


def _eight_bits(qc):
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 8


def _other_format(qc):
    qc["format"] = "naive-quantized"


def _unignore_lm_head(qc):
    qc["ignore"] = [n for n in qc["ignore"] if not n.endswith("lm_head")]


@pytest.mark.parametrize("edit_tensors, edit_qc, message", [
    (_drop_scale, None, "no .*weight_packed / .*weight_scale"),
    (_extra, None, "unexpected: \\['extra.weight'\\]"),
    (_narrow, None, "shapes do not fit"),
    (_bad_shape, None, "weight_shape is \\[1, 2\\]"),
    (None, _eight_bits, "num_bits 4"),
    (None, _other_format, "format 'naive-quantized'"),
    (None, _unignore_lm_head, "lm_head is quantized by the config"),
], ids=["missing-scale", "extra-tensor", "narrow-packed", "bad-weight-shape", "8-bit", "format", "ignore-list"])
def test_load_int4_model_is_strict(llava_run, tmp_path, edit_tensors, edit_qc, message):
    run = llava_run
    with pytest.raises(ValueError, match=message):
        load_int4_model(_tampered(run, tmp_path, edit_tensors, edit_qc))


def test_load_int4_model_rejects_unquantized_directories(llava_run, tmp_path):
    run = llava_run
    with pytest.raises(ValueError, match="no quantization_config"):
        load_int4_model(run["base"])
    with pytest.raises(ValueError, match="no config.json"):
        load_int4_model(str(tmp_path))
