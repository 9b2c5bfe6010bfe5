"""INT4 export (compressed-tensors pack-quantized) and loading it back, on tiny LLaVA and Qwen2-VL runs.

A "run" here is what training leaves behind: a tiny checkpoint is quantized with quantize_model, its
weights and log-scales are perturbed (so the scales are no longer their initial values), final/ is
written by grace.rundir.save_final itself and the run's config.json names the student checkpoint.
"llava_hf" is the tiny LLaVA saved first in the llava-hf Hub layout (``vision_tower.vision_model.*``).
"""

import copy
import json
import logging
import os
import re
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from grace.config import TrainConfig
from grace.demo import tiny
from grace.export import export_run
from grace.families import family_of
from grace.load import load_int4_model, load_model, load_student
from grace.naming import module_checkpoint_names
from grace.quantize import quantize_model
from grace.rundir import save_final
from grace.schemes import COMPRESSED_TENSORS_VERSION
from grace_kernels.nn import QuantLinear, W4A16Linear
from grace_kernels.testing import assert_close_to_gold

CASES = [("llava", "bfloat16"), ("llava", "float16"), ("qwen2_vl", "bfloat16"), ("llava_hf", "bfloat16")]
GROUP = 128


def _write_final(student, processor, cfg):
    return save_final(student, student.state_dict(), processor, cfg)


def _make_run(base, out, *, bits=4, scale_dtype="bfloat16", seed=0, exclude=None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    if bits is not None:   # None: a full-precision distillation run, nothing quantized
        quantize_model(model, bits=bits, group_size=GROUP, scale_dtype=getattr(torch, scale_dtype), exclude=exclude,
                       verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if name.endswith("log_scale") else 0.01))
    cfg = TrainConfig(student=str(base), output_dir=str(out), bits=bits, group_size=GROUP, scale_dtype=scale_dtype)
    _write_final(model, processor, cfg)
    cfg.to_json(os.path.join(out, "config.json"))   # as grace train writes it: the run names its student
    return model.eval(), processor


def _hub_layout(src, dst):
    """The checkpoint at ``src`` in the llava-hf Hub layout: the CLIP tower's tensors under
    ``vision_tower.vision_model.*`` (what llava-hf/llava-1.5-7b-hf holds on disk)."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors = {("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.")
                else k): v for k, v in tensors.items()}
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _source_keys(path):
    return set(load_file(os.path.join(path, "model.safetensors")))


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """case -> the run dict, built once per module: (family, scale dtype) -> run, its export, the student."""
    cache, bases = {}, {}

    def make(family, scale_dtype):
        if family not in bases:
            if family == "llava_hf":
                bases[family] = _hub_layout(make("llava", "bfloat16")["base"],
                                            tmp_path_factory.mktemp("hub") / "llava-hf")
            else:
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


@pytest.fixture(params=[c for c in CASES if c[1] == "bfloat16" and c[0] != "llava_hf"], ids=lambda c: c[0])
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
    on_disk = module_checkpoint_names(run["student"], list(qlayers))
    for name, ql in qlayers.items():
        key = on_disk[name]
        codes, scales = ql.quantize()
        assert scales.dtype == run["scale_dtype"]
        packed, shape = tensors[f"{key}.weight_packed"], tensors[f"{key}.weight_shape"]
        assert torch.equal(unpack_from_int32(packed, 4, shape), codes), key
        # A float32 export holds the trained scales widened exactly to float32 ...
        assert tensors[f"{key}.weight_scale"].dtype == torch.float32, key
        assert torch.equal(tensors[f"{key}.weight_scale"], scales.float()), key
        # ... so the library, which multiplies in the scale dtype, returns exactly the student's weight.
        assert torch.equal(dense[f"{key}.weight"], ql.fake_quant_weight()), key
        # With the scales in their half dtype (a half-precision export) its weight is scale * code rounded once
        # to that dtype.
        half = compressor.decompress({"weight_packed": packed, "weight_scale": scales, "weight_shape": shape},
                                     scheme)["weight"]
        expected = codes.to(scales.dtype) * scales.repeat_interleave(GROUP, dim=1)
        assert half.dtype == scales.dtype and torch.equal(half, expected), key
    untouched = [k for k in tensors if not k.rpartition(".")[2].startswith("weight_")]
    assert untouched and all(torch.equal(dense[k].float(), tensors[k].float()) for k in untouched)


def _plain_load(path, caplog):
    """``AutoModelForImageTextToText.from_pretrained(path)`` as a user calls it, plus everything it
    reported: the loading info, the log records of transformers and compressed-tensors, the warnings."""
    from transformers import AutoModelForImageTextToText

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    logs = [r for r in caplog.records if r.name.startswith(("transformers", "compressed_tensors"))
            and r.levelno >= logging.WARNING]
    return model, info, logs, caught


@pytest.mark.parametrize("dtype", [None, "half"], ids=["float32", "half"])
def test_plain_transformers_loads_and_generates_like_grace(run, dtype, tmp_path, caplog, reference_backend):
    """float32 exports, and half-precision exports in the dtype the run's scales trained in (the only
    half dtype that holds them exactly)."""
    pytest.importorskip("compressed_tensors")
    from grace.evaluate import _generate_batch, generate
    from grace.load import load_model

    if dtype is not None:
        dtype = str(run["scale_dtype"]).removeprefix("torch.")
    out = run["export"] if dtype is None else export_run(run["run"], str(tmp_path / "half"), dtype=dtype)
    model, info, logs, caught = _plain_load(out, caplog)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not logs, [r.getMessage() for r in logs]
    assert not caught, [str(w.message) for w in caught]
    # the full-precision layers arrive unchanged; the INT4 ones stay compressed, with the same codes
    student = run["student"]
    lm_head = student.get_output_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight.float(), lm_head.to(model.dtype).float())
    for name in _quant_layers(student):
        assert hasattr(model.get_submodule(name), "weight_packed"), name

    # greedy generation: the same tokens as grace generate's path (load_model + evaluate.generate)
    ours, processor = load_model(out)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    prompt = "what color is the circle ?"
    plain_text = generate(model, processor, str(image), prompt, max_new_tokens=8)
    grace_text = generate(ours, processor, str(image), prompt, max_new_tokens=8)
    from grace.data import to_messages

    turns = to_messages([{"from": "human", "value": "<image>\n" + prompt}])
    img = Image.open(image).convert("RGB")
    if dtype is None:   # float32: both paths compute the same products exactly
        assert plain_text == grace_text
        plain = _generate_batch(model, processor, [turns], [img], 8, torch.device("cpu"))
        grace = _generate_batch(ours, processor, [turns], [img], 8, torch.device("cpu"))
        assert plain[:2] == grace[:2]
        return
    # half: both hold the same codes and scales, but transformers + compressed-tensors dequantize the weight to
    # the half dtype (code x scale, rounded) and run the model in it, while ours multiplies in float32, so logits
    # differ by that rounding (docs/export.md gives the measured gap). Greedy decoding may then part only where
    # the top two logits are that close, as an untrained tiny model's sometimes are: step by step, the logits
    # agree to rounding until the tokens differ, and where they first differ it is such a near-tie.
    text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[img], return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]
    runs = [m.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
            for m in (model, ours)]
    assert processor.tokenizer.decode(runs[1].sequences[0, n_prompt:], skip_special_tokens=True).strip() == grace_text
    plain_tokens, grace_tokens = (r.sequences[0, n_prompt:].tolist() for r in runs)
    for step, (tp, tg) in enumerate(zip(plain_tokens, grace_tokens, strict=False)):   # EOS may end one first
        lp, lg = runs[0].logits[step][0].float(), runs[1].logits[step][0].float()
        diff = (lp - lg).abs().max().item()
        assert diff < 0.03 * lg.abs().max().item(), (step, diff)   # rounding, not a different model
        if tp != tg:
            top2 = lg.topk(2).values
            assert (top2[0] - top2[1]).item() <= 2 * diff, (step, diff, plain_text, grace_text)
            break


def test_export_keeps_the_source_checkpoints_names(run):
    """Every tensor name of the export is the source checkpoint's in the family's Hub layout (LLaVA: the
    vision tower under ``vision_tower.vision_model.``, whichever layout the student was saved in; Qwen2-VL:
    as saved), except that each INT4 linear's ``weight`` became ``weight_packed`` / ``weight_scale`` /
    ``weight_shape``."""
    source = set(family_of(run["student"].config).hub_checkpoint_keys(sorted(_source_keys(run["base"]))))
    exported = _source_keys(run["export"])
    int4 = {k.removesuffix(".weight_packed") for k in exported if k.endswith(".weight_packed")}
    assert int4 and {f"{n}.weight" for n in int4} <= source
    expected = (source - {f"{n}.weight" for n in int4}) | {f"{n}.{t}" for n in int4
                                                           for t in ("weight_packed", "weight_scale", "weight_shape")}
    assert exported == expected
    if run["family"].startswith("llava"):
        tower = {k for k in exported if "vision_tower" in k}
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


# vLLM's weight-name mappers (``hf_to_vllm_mapper``, a WeightsMapper of prefix rules applied in order) and the
# top-level modules each model holds, as read in vLLM's source (vllm-project/vllm on GitHub; vLLM is not
# installed here): vllm/model_executor/models/llava.py at commit 35d3c24b (LlavaForConditionalGeneration:
# vision_tower = CLIPVisionModel, whose parameters sit under ``vision_model.``; multi_modal_projector;
# language_model = LlamaForCausalLM with ``model.`` and ``lm_head.``) and vllm/model_executor/models/qwen2_vl.py
# (Qwen2VLForConditionalGeneration: visual, language_model).
VLLM_MAPPERS = {
    "llava": ({"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
               "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."},
              ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
               "language_model.lm_head.")),
    "qwen2_vl": ({"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                  "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
                 ("visual.", "language_model.model.", "language_model.lm_head.")),
}


def _vllm_name(name: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def test_export_names_are_what_vllms_mappers_expect(run):
    """Every tensor of the export lands, through vLLM's mapper for its model, under a module vLLM's model
    has (the transformers-5 LLaVA layout, ``vision_tower.<encoder>``, did not: vLLM's CLIP tower wants
    ``vision_tower.vision_model.<encoder>``)."""
    prefixes, modules = VLLM_MAPPERS[run["family"].removesuffix("_hf")]
    mapped = {k: _vllm_name(k, prefixes) for k in _source_keys(run["export"])}
    assert mapped and all(v.startswith(modules) for v in mapped.values()), sorted(
        k for k, v in mapped.items() if not v.startswith(modules))
    # every prefix vLLM's model holds receives tensors
    assert all(any(v.startswith(m) for v in mapped.values()) for m in modules)


def _targeted_by_compressed_tensors(export, base):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForImageTextToText

    with open(os.path.join(export, "config.json")) as f:
        qc = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base))
    apply_quantization_config(model, qc)
    return {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}


def test_compressed_tensors_targets_exactly_the_int4_layers(run):
    pytest.importorskip("compressed_tensors")
    assert _targeted_by_compressed_tensors(run["export"], run["base"]) == set(_quant_layers(run["student"]))


def test_layers_left_out_of_the_backbone_get_their_own_pattern(make_run, tmp_path, caplog, reference_backend):
    """A run that kept two backbone layers in full precision: each gets a pattern on the end of its
    name, and every client still targets exactly the INT4 layers."""
    pytest.importorskip("compressed_tensors")
    from grace.naming import matches_ignore

    base = make_run("llava_hf", "bfloat16")["base"]
    kept = ["*layers.1.mlp.down_proj", "*layers.0.self_attn.o_proj"]
    llava = family_of(SimpleNamespace(model_type="llava"))
    student, _ = _make_run(base, tmp_path / "run", exclude=list(llava.full_precision) + kept)
    out = export_run(str(tmp_path / "run"), str(tmp_path / "int4"))
    with open(os.path.join(out, "config.json")) as f:
        ignore = json.load(f)["quantization_config"]["ignore"]
    assert ignore[:3] == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head$"]
    assert sorted(ignore[3:]) == sorted(["re:(.*\\.)?layers\\.1\\.mlp\\.down_proj$",
                                         "re:(.*\\.)?layers\\.0\\.self_attn\\.o_proj$"])
    # the names vLLM gives these layers (LLaVA's hf_to_vllm_mapper: language_model.model.*) match as well
    assert matches_ignore("language_model.model.layers.1.mlp.down_proj", ignore)
    assert not matches_ignore("language_model.model.layers.0.mlp.down_proj", ignore)
    int4 = set(_quant_layers(student))
    assert "model.language_model.layers.1.mlp.down_proj" not in int4 and len(int4) == 12
    assert _targeted_by_compressed_tensors(out, base) == int4
    model, info, logs, caught = _plain_load(out, caplog)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not logs and not caught
    ours, _ = load_int4_model(out)
    assert {n for n, m in ours.named_modules() if isinstance(m, W4A16Linear)} == int4


def test_cli_export_of_a_hub_layout_run(make_run, tmp_path, caplog, capsys):
    """``grace export`` itself, on the llava-hf layout run: plain transformers loads the result cleanly."""
    pytest.importorskip("compressed_tensors")
    from grace.cli import main

    run = make_run("llava_hf", "bfloat16")
    out = tmp_path / "int4"
    assert main(["export", run["run"], str(out), "--dtype", "bfloat16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert _source_keys(str(out)) == _source_keys(run["export"])
    _, info, logs, caught = _plain_load(str(out), caplog)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not logs and not caught
    assert main(["export", run["run"], str(out)]) == 2   # not empty, no --overwrite: one line, exit 2
    assert "not empty" in capsys.readouterr().err


def test_export_without_the_source_checkpoint_falls_back_to_default_names(llava_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(llava_run["run"], run)
    os.remove(run / "config.json")
    with caplog.at_level(logging.WARNING, logger="grace.export"):
        out = export_run(str(run), str(tmp_path / "int4"))
    assert "default tensor names" in caplog.text
    # the tiny base was itself saved with transformers' default names, so they agree here
    assert _source_keys(out) == _source_keys(llava_run["export"])


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
    assert group["format"] == "pack-quantized"
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP,
                                "strategy": "group", "dynamic": False}
    student = run["student"]
    qlayers = _quant_layers(student)
    full = [n for n, m in student.named_modules() if type(m) is nn.Linear]
    names = module_checkpoint_names(student, full + list(qlayers))
    # on disk in the family's Hub layout (LLaVA's vision tower under vision_tower.vision_model.)
    hub = family_of(student.config).hub_checkpoint_keys
    names = {k: hub([v])[0] for k, v in names.items()}
    # llm-compressor's VLM recipe patterns, and nothing else for these models
    family = {"qwen2_vl": ["re:.*visual.*", "re:.*lm_head$"]}.get(
        run["family"], ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head$"])
    assert qc["ignore"] == family
    from grace.naming import matches_ignore

    for name in full:      # kept in full precision under its in-memory and its on-disk name
        assert matches_ignore(name, qc["ignore"]) and matches_ignore(names[name], qc["ignore"]), name
    for name in qlayers:
        assert not matches_ignore(name, qc["ignore"]) and not matches_ignore(names[name], qc["ignore"]), name

    tensors = load_file(os.path.join(run["export"], "model.safetensors"))
    assert {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")} == {
        names[n] for n in qlayers}
    for name, ql in qlayers.items():
        key, (n, k) = names[name], ql.weight.shape
        assert f"{key}.weight" not in tensors
        assert tensors[f"{key}.weight_packed"].dtype == torch.int32
        assert tuple(tensors[f"{key}.weight_packed"].shape) == (n, k // 8)
        # the default (float32) export holds the scales training used, in float32: an exact widening
        scale = tensors[f"{key}.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale.to(run["scale_dtype"]).float(), scale), key
        assert torch.equal(scale, ql.quantize()[1].float()), key
        assert tuple(scale.shape) == (n, k // GROUP)
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
    with pytest.raises(ValueError, match="dtype"):
        export_run(run["run"], str(tmp_path / "out"), dtype="int8")
    # a run whose width no scheme serves (a hand-edited or future quantization.json)
    shutil.copytree(run["run"], tmp_path / "run3")
    qpath = tmp_path / "run3" / "final" / "quantization.json"
    qpath.write_text(json.dumps({**json.loads(qpath.read_text()), "bits": 3}))
    with pytest.raises(ValueError, match="no quantization scheme serves bits=3; registered: int4 \\(bits=4\\), "
                                         "int8 \\(bits=8\\), full \\(bits=None\\)"):
        export_run(str(tmp_path / "run3"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_half_export_refuses_scales_it_cannot_hold(llava_run, tmp_path):
    """bfloat16 scales below float16's range: a float16 export would round them to 0 (every code of
    the group to 0); it is refused naming the layer, nothing is written, and float32 / bfloat16 work."""
    run = tmp_path / "run"
    shutil.copytree(llava_run["run"], run)
    state = torch.load(run / "final" / "student_state.pt")
    name = sorted(_quant_layers(llava_run["student"]))[0]
    state[f"{name}.log_scale"][0] = -25.0    # exp(-25) ~ 1.4e-11: a bfloat16 number, 0 in float16
    torch.save(state, run / "final" / "student_state.pt")
    with pytest.raises(ValueError, match=f"^{re.escape(name)}: its trained bfloat16 scales do not fit float16 "
                                         "exactly .*export with --dtype bfloat16 or float32"):
        export_run(str(run), str(tmp_path / "fp16"), dtype="float16")
    assert not (tmp_path / "fp16").exists() and os.listdir(tmp_path) == ["run"]
    for dtype in (None, "bfloat16"):
        out = export_run(str(run), str(tmp_path / str(dtype)), dtype=dtype)
        key = module_checkpoint_names(llava_run["student"], [name])[name]
        row = load_file(os.path.join(out, "model.safetensors"))[f"{key}.weight_scale"][0]
        assert torch.equal(row.bfloat16(), torch.exp(torch.full_like(row, -25.0)).bfloat16()), row


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


BAD_SCALE = "weight_scale holds 1 scale\\(s\\) that are not finite and > 0"


def _scale_value(value):
    def edit(t):
        k = _first_packed(t).replace("weight_packed", "weight_scale")
        t[k] = t[k].clone()
        t[k][0, 0] = value
    return edit


def _g_idx(t):
    k = _first_packed(t)
    n_in = int(t[k.replace("weight_packed", "weight_shape")][1])
    t[k.replace("weight_packed", "weight_g_idx")] = torch.arange(n_in, dtype=torch.int32) // GROUP


def _group_actorder(qc):
    qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"


def _three_bits(qc):
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 3


def _other_format(qc):
    qc["format"] = qc["config_groups"]["group_0"]["format"] = "naive-quantized"


def _unignore_lm_head(qc):
    qc["ignore"] = [n for n in qc["ignore"] if "lm_head" not in n]


@pytest.mark.parametrize("edit_tensors, edit_qc, message", [
    (_drop_scale, None, "no .*weight_packed / .*weight_scale"),
    (_extra, None, "unexpected: \\['extra.weight'\\]"),
    (_narrow, None, "shapes do not fit"),
    (_bad_shape, None, "weight_shape is \\[1, 2\\]"),
    (None, _three_bits, "num_bits 3 \\(supported: \\[4, 8\\]\\)"),
    (None, _other_format, "format 'naive-quantized'"),
    (None, _unignore_lm_head, "lm_head is quantized by the config"),
    (_scale_value(float("nan")), None, f"{BAD_SCALE} \\(such as nan\\)"),
    (_scale_value(float("inf")), None, f"{BAD_SCALE} \\(such as inf\\)"),
    (_scale_value(0.0), None, f"{BAD_SCALE} \\(such as 0.0\\)"),
    (_scale_value(-1.0), None, "that are not finite and > 0 \\(such as -1.0\\)"),
    (_g_idx, None, "weight_g_idx holds an activation-order permutation"),
    (None, _group_actorder, "unsupported actorder 'group' \\(a g_idx permutation"),
], ids=["missing-scale", "extra-tensor", "narrow-packed", "bad-weight-shape", "3-bit", "format", "ignore-list",
        "nan-scale", "inf-scale", "zero-scale", "negative-scale", "g_idx", "actorder-group"])
def test_load_int4_model_is_strict(llava_run, tmp_path, edit_tensors, edit_qc, message):
    run = llava_run
    with pytest.raises(ValueError, match=message):
        load_int4_model(_tampered(run, tmp_path, edit_tensors, edit_qc))


def _asymmetric_checkpoint(run, path, bits, bf16_scales=True):
    """The run's trained weights quantized asymmetrically, ``bits``-bit, group 128, as llm-compressor writes
    W4A16_ASYM / an asymmetric W8A16: scales and zero points from compressed-tensors' ``calculate_qparams`` on
    each group's min and max, the weights quantized and packed by its own ``PackedQuantizationCompressor``
    (zero points packed along the output dimension). The scales are stored in float32; with ``bf16_scales``
    they hold bfloat16 values, so every client's dequantization is exact (else they are what llm-compressor
    writes for a float32 model, which the loader rounds to float16). Returns {module: the dequantized weight},
    unpacked with compressed-tensors' own ``unpack_from_int32``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    shutil.copytree(run["export"], path)
    tensors = load_file(str(path / "model.safetensors"))
    qlayers = _quant_layers(run["student"])
    names = module_checkpoint_names(run["student"], list(qlayers))
    expected = {}
    for name, ql in qlayers.items():
        w = ql.weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // GROUP, GROUP)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        if bf16_scales:
            scale = scale.bfloat16().float()
        out = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                                                    scheme)
        key = names[name]
        for t in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            tensors[f"{key}.{t}"] = out[t]
        q = unpack_from_int32(out["weight_packed"], bits, torch.Size([n, k])).float()
        z = unpack_from_int32(out["weight_zero_point"], bits, torch.Size([n, k // GROUP]), packed_dim=0).float()
        expected[name] = (q - z.repeat_interleave(GROUP, 1)) * scale.repeat_interleave(GROUP, 1)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=bits, symmetric=False)
    (path / "config.json").write_text(json.dumps(config))
    return expected


def _dequantized_plain_model(path, dst):
    """compressed-tensors' model-free dequantizer of the checkpoint at ``path``, written at ``dst`` as a plain
    checkpoint, and plain transformers' from_pretrained of it (no missing, unexpected or mismatched key). Returns
    (model, the dense tensors). (transformers' own from_pretrained of the compressed file, 5.24 with
    compressed-tensors 0.20.1, reports the packed zero points as a size mismatch, its model holding one zero
    point per row, and raises: the comparison goes through the dequantizer.)"""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from transformers import AutoModelForImageTextToText

    dense = CompressedTensorsDequantizer(str(path), dtype=torch.float32).validate(
        dict(load_file(str(path / "model.safetensors"))))
    shutil.copytree(path, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in dense.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    plain, info = AutoModelForImageTextToText.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return plain.eval(), dense


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_checkpoints_load_and_match_transformers(bf16_run, tmp_path, bits, reference_backend):
    """An asymmetric checkpoint (zero points) loads exactly: 4-bit as a symmetric 8-bit layer (codes minus zero
    points lie in [-15, 15]), 8-bit as a W8A16Linear keeping its zero points (q - z in [-255, 255]). Its weights
    equal compressed-tensors' own dequantizer's, and plain transformers on those computes the same logits and
    greedy tokens as ours."""
    from grace.evaluate import generate
    from grace_kernels.nn import W8A16Linear

    path = tmp_path / "asym"
    expected = _asymmetric_checkpoint(bf16_run, path, bits)
    ours, processor = load_int4_model(str(path))
    for name, weight in expected.items():
        layer = ours.get_submodule(name)
        assert isinstance(layer, W8A16Linear) and layer.asymmetric == (bits == 8), name
        assert torch.equal(layer.int8_weight.dequantize(), weight), name
    plain, dense = _dequantized_plain_model(path, tmp_path / "dense")
    names = module_checkpoint_names(bf16_run["student"], list(expected))
    for name, weight in expected.items():
        assert torch.equal(dense[f"{names[name]}.weight"].float(), weight), name
    inputs = _inputs(processor)
    a, b = _logits(plain, inputs), _logits(ours, inputs)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    prompt = "what color is the circle ?"
    assert generate(plain, processor, str(image), prompt, 8) == generate(ours, processor, str(image), prompt, 8)


def test_asymmetric_8_bit_checkpoint_with_float32_scales(bf16_run, tmp_path, reference_backend):
    """What llm-compressor writes for a float32 model: float32 scales, which the served layer keeps in float16
    (relative error <= 2**-11 per scale). Our logits stay within 2**-10 of the largest of plain transformers'
    on compressed-tensors' exact float32 dequantization (measured: up to 3.2e-4 over both families and two
    seeds), and the greedy tokens are the same."""
    from grace.evaluate import generate

    path = tmp_path / "asym"
    expected = _asymmetric_checkpoint(bf16_run, path, 8, bf16_scales=False)
    ours, processor = load_int4_model(str(path))
    layer = ours.get_submodule(next(iter(expected)))
    assert layer.weight_scale.dtype == torch.float16
    plain, _ = _dequantized_plain_model(path, tmp_path / "dense")
    inputs = _inputs(processor)
    a, b = _logits(plain, inputs), _logits(ours, inputs)
    assert 0 < (a - b).abs().max() <= 2 ** -10 * a.abs().max(), (a - b).abs().max()
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    prompt = "what color is the circle ?"
    assert generate(plain, processor, str(image), prompt, 16) == generate(ours, processor, str(image), prompt, 16)


@pytest.mark.triton
def test_asymmetric_8_bit_layers_run_on_triton(llava_run, tmp_path):
    """The same checkpoint's zero-point layers on the Triton kernel (interpreted) compute the reference's
    logits up to float32 accumulation order."""
    import grace_kernels as gk

    path = tmp_path / "asym"
    _asymmetric_checkpoint(llava_run, path, 8)
    inputs = _inputs(llava_run["processor"])
    with gk.use_backend("reference"):
        ref = _logits(load_int4_model(str(path))[0], inputs)
    with gk.use_backend("triton"):
        tri = _logits(load_int4_model(str(path))[0], inputs)
    assert (tri - ref).abs().max() <= 1e-4 * ref.abs().max(), (tri - ref).abs().max()


def test_asymmetric_8_bit_checkpoint_through_the_cli(bf16_run, tmp_path, color_task):
    """A user's journey: ``grace generate`` and ``grace eval`` (subprocesses, a CPU machine) on an asymmetric
    W8A16 checkpoint print the greedy answers plain transformers gives on compressed-tensors' dequantization of
    the same file."""
    from grace.data import load_records
    from grace.evaluate import evaluate, generate

    path = tmp_path / "asym8"
    _asymmetric_checkpoint(bf16_run, path, 8)
    plain, _ = _dequantized_plain_model(path, tmp_path / "dense")
    processor = bf16_run["processor"]
    data, images = color_task(tmp_path, 4)
    image = os.path.join(images, "0.png")
    prompt = "what color is the circle ?"
    expected = generate(plain, processor, image, prompt, max_new_tokens=8)
    assert expected.strip()   # words to compare
    assert _cli("generate", str(path), "--image", image, "--prompt", prompt, "--max-new-tokens", "8",
                "--device", "cpu").rstrip("\n") == expected
    result = json.loads(_cli("eval", str(path), "--data", data, "--image-folder", images, "--max-new-tokens", "4",
                             "--device", "cpu", "--verbose"))
    theirs = evaluate(plain, processor, load_records(data), images, max_new_tokens=4, progress=False).to_dict()
    assert result["total"] == 4 and result["predictions"] == theirs["predictions"]


def _zero_points(t):
    for k in [k for k in t if k.endswith(".weight_scale")]:
        n, groups = t[k].shape
        t[k.replace("weight_scale", "weight_zero_point")] = torch.zeros((n + 7) // 8, groups, dtype=torch.int32)


def _asymmetric(bits):
    def edit(qc):
        qc["config_groups"]["group_0"]["weights"].update(num_bits=bits, symmetric=False)
    return edit


def _channelwise(qc):
    qc["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None)


def _asymmetric_channelwise(qc):
    # llm-compressor's asymmetric W8A16 recipes with strategy "channel": one scale and zero point per row
    _asymmetric(8)(qc)
    _channelwise(qc)


def _two_groups(qc):
    groups = qc["config_groups"]
    groups["group_1"] = {**copy.deepcopy(groups["group_0"]), "targets": ["re:.*mlp.*"]}
    groups["group_0"]["targets"] = ["re:.*self_attn.*"]


def _activations(qc):
    qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "token",
                                                           "dynamic": True, "symmetric": True}


@pytest.mark.parametrize("edit_tensors, edit_qc, message", [
    (None, _channelwise, "unsupported strategy 'channel' \\(supported: group\\); group_size None"),
    (None, _asymmetric_channelwise, "unsupported strategy 'channel' \\(supported: group\\); group_size None"),
    (None, _two_groups, "expected one config group, found 2"),
    (None, _activations, "unsupported activation quantization \\(only weight-only W4A16 / W8A16"),
], ids=["channel-wise", "asymmetric-channel-wise", "two-config-groups", "activation-quantization"])
def test_other_producers_variants_are_refused_in_one_line(llava_run, tmp_path, edit_tensors, edit_qc, message):
    """What other compressed-tensors producers write and this loader does not serve: one line that starts
    with the config file and names the field."""
    path = _tampered(llava_run, tmp_path, edit_tensors, edit_qc)
    with pytest.raises(ValueError, match=message) as caught:
        load_int4_model(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(os.path.join(path, "config.json"))


@pytest.mark.parametrize("edit_tensors, edit_qc, message", [
    (_zero_points, None, "weight_zero_point holds zero points but the config says the weights are symmetric"),
    (None, _asymmetric(8), "the config says the weights are asymmetric but the checkpoint has no .*weight_zero_point"),
    # 4-bit zero points (eight per word) under an 8-bit config: the words do not hold one zero point per row
    (_zero_points, _asymmetric(8), "weight_zero_point is torch.int32 \\((\\d+), (\\d)\\), expected int32 "
                                   "\\((?!\\1,)\\d+, \\2\\) \\(8-bit zero points packed along the output dimension\\)"),
], ids=["zero-points-in-a-symmetric-file", "asymmetric-without-zero-points", "zero-points-of-another-width"])
def test_zero_points_that_do_not_fit_the_config_are_refused(llava_run, tmp_path, edit_tensors, edit_qc, message):
    with pytest.raises(ValueError, match=message) as caught:
        load_int4_model(_tampered(llava_run, tmp_path, edit_tensors, edit_qc))
    assert "\n" not in str(caught.value)


def test_cli_refuses_a_channel_wise_asymmetric_checkpoint_in_one_line(llava_run, tmp_path):
    path = _tampered(llava_run, tmp_path, None, _asymmetric_channelwise)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8)).save(image)
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "grace", "generate", path, "--image", str(image), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "unsupported strategy 'channel'" in proc.stderr, proc.stderr


def test_load_int4_model_rejects_unquantized_directories(llava_run, tmp_path):
    run = llava_run
    with pytest.raises(ValueError, match="no quantization_config"):
        load_int4_model(run["base"])
    with pytest.raises(ValueError, match="no config.json"):
        load_int4_model(str(tmp_path))


# --------------------------------------------------------------------------- (e) other producers' files

def _llm_compressor_ignore(family):
    """The ignore lists llm-compressor's multimodal_vision examples write (in-memory names and patterns)."""
    if family == "qwen2_vl":
        return ["lm_head", "re:visual.*", "re:model.visual.*"]
    return ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def _exact_ignore(run, on_disk):
    full = [n for n, m in run["student"].named_modules() if type(m) is nn.Linear]
    if not on_disk:
        return full
    return family_of(run["student"].config).hub_checkpoint_keys(list(module_checkpoint_names(run["student"],
                                                                                           full).values()))


@pytest.mark.parametrize("style, actorder", [("llm-compressor", None), ("llm-compressor", "static"),
                                             ("llm-compressor", "weight"), ("in-memory-names", None),
                                             ("on-disk-names", None)])
def test_load_int4_model_reads_other_producers_configs(run, tmp_path, style, actorder, reference_backend):
    """ignore as llm-compressor's VLM examples write it, as exact in-memory names, or as exact on-disk
    names (what earlier grace exports wrote); GPTQ's activation orderings that leave the layout as it is
    (its default "static" and "weight": the files hold no g_idx)."""
    ignore = (_llm_compressor_ignore(run["family"]) if style == "llm-compressor"
              else _exact_ignore(run, on_disk=style == "on-disk-names"))

    def edit(qc):
        qc["ignore"] = ignore
        qc["config_groups"]["group_0"]["format"] = None   # format given at the top only, as older releases wrote
        qc["config_groups"]["group_0"]["weights"].update(observer="minmax", actorder=actorder, block_structure=None)

    path = _tampered(run, tmp_path, edit_qc=edit)
    model, processor = load_int4_model(path)
    reference, _ = load_int4_model(run["export"])
    assert {n for n, m in model.named_modules() if isinstance(m, W4A16Linear)} == set(_quant_layers(run["student"]))
    inputs = _inputs(processor)
    assert torch.equal(_logits(model, inputs), _logits(reference, inputs))


def test_load_int4_model_converts_float32_scales(llava_run, tmp_path, reference_backend):
    run = llava_run

    def widen(t):
        for k in [k for k in t if k.endswith(".weight_scale")]:
            t[k] = t[k].float()

    path = _tampered(run, tmp_path, edit_tensors=widen)
    stored = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if k.endswith("_scale")}
    assert stored and all(v.dtype == torch.float32 for v in stored.values())
    names = module_checkpoint_names(run["student"], list(_quant_layers(run["student"])))
    # bf16 activations: the scales become bf16 (exactly the trained ones: they were bf16 widened)
    bf16, _ = load_int4_model(path, dtype="bfloat16")
    # float32 activations: float16 (these scales lie in its normal range), rounded once
    fp32, _ = load_int4_model(path)
    for name, key in names.items():
        assert torch.equal(bf16.get_submodule(name).weight_scale, stored[f"{key}.weight_scale"].bfloat16())
        assert torch.equal(fp32.get_submodule(name).weight_scale, stored[f"{key}.weight_scale"].half())


# --------------------------------------------------------------------------- (f) damaged files

def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_truncated_student_state_on_export(llava_run, tmp_path, keep):
    run = str(tmp_path / "run")
    shutil.copytree(llava_run["run"], run)
    _truncate(os.path.join(run, "final", "student_state.pt"), keep)
    with pytest.raises(ValueError, match=r"final/student_state\.pt is truncated or corrupt.*--resume"):
        export_run(run, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_safetensors_on_load(llava_run, tmp_path, keep):
    for src in (llava_run["export"], llava_run["base"]):   # an INT4 export and a plain checkpoint
        path = tmp_path / os.path.basename(src)
        shutil.copytree(src, path)
        _truncate(path / "model.safetensors", keep)
        with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
            load_model(str(path))


@pytest.mark.parametrize("which", ["final/quantization.json", "final/config.json"])
def test_malformed_json_in_a_run(llava_run, tmp_path, which):
    run = tmp_path / "run"
    shutil.copytree(llava_run["run"], run)
    (run / which).write_text('{"bits": 4, "group_')
    with pytest.raises(ValueError, match=f"{which} is not valid JSON"):
        export_run(str(run), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=f"{which} is not valid JSON"):
        load_model(str(run))


def test_malformed_config_json_of_an_export(llava_run, tmp_path):
    path = tmp_path / "int4"
    shutil.copytree(llava_run["export"], path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_int4_model(str(path))
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(str(path))


def test_cli_reports_a_damaged_file_in_one_line(llava_run, tmp_path, capsys):
    from grace.cli import main

    path = tmp_path / "int4"
    shutil.copytree(llava_run["export"], path)
    _truncate(path / "model.safetensors")
    image = tmp_path / "image.png"
    Image.new("RGB", (28, 28)).save(image)
    assert main(["generate", str(path), "--image", str(image), "--prompt", "what ?", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is truncated or corrupt" in err and str(path) in err


def test_ignore_patterns_on_names_alone(caplog):
    from grace.export import ignore_patterns
    from grace.naming import matches_ignore

    def pair(n):   # (in memory, on disk) for LLaVA
        return n, n.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.",
                                                                                       "vision_tower.vision_model.")

    layers = [f"model.language_model.layers.{i}.{p}" for i in range(12)
              for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    full = [pair(n) for n in ("model.vision_tower.encoder.layers.0.mlp.fc1", "lm_head",
                              "model.language_model.layers.1.mlp.down_proj",
                              "model.language_model.layers.11.self_attn.k_proj")]
    quantized = [pair(n) for n in layers if n not in {f for f, _ in full}]
    patterns = family_of(SimpleNamespace(model_type="llava")).ignore_patterns()
    with caplog.at_level(logging.WARNING, logger="grace.export"):
        ignore = ignore_patterns(full, quantized, family_patterns=patterns)
    assert ignore == ["re:.*vision_tower.*", "re:.*lm_head$", "re:(.*\\.)?layers\\.1\\.mlp\\.down_proj$",
                      "re:(.*\\.)?layers\\.11\\.self_attn\\.k_proj$"]
    for n in [n for p in full for n in p]:
        assert matches_ignore(n, ignore)
    for n in [n for p in quantized for n in p]:   # layers.11 does not catch layers.1 and the other way round
        assert not matches_ignore(n, ignore)
    # q/v of layer 11 are INT4 while its k stays dense: vLLM fuses them and would refuse the checkpoint
    assert "layers.11.self_attn.q_proj is INT4" in caplog.text and "vLLM" in caplog.text
    assert "layers.1.mlp" not in caplog.text
    with pytest.raises(ValueError, match="no ignore pattern keeps lm_head"):
        ignore_patterns([("lm_head", "lm_head")], [("model.lm_head", "model.lm_head")], family_patterns=patterns)


# --------------------------------------------------------------------------- (g) INT8 and full-precision runs

def _cli(*argv, timeout=300):
    """``python -m grace ...`` as a user runs it on a CPU machine (no Triton interpreter)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "grace", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_int8_run_exports_loads_in_transformers_and_generates_like_grace(make_run, family, tmp_path, caplog,
                                                                        reference_backend):
    """An INT8 run (``--bits 8``): ``grace export`` writes compressed-tensors pack-quantized 8-bit, plain
    transformers loads it with no missing or unexpected key and decompresses exactly the trained weights,
    and its greedy tokens are those of ``grace generate`` (which serves the layers with W8A16Linear)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from grace.evaluate import generate
    from grace_kernels.nn import W8A16Linear

    # seed 1: an untrained tiny model whose greedy answer is not empty in both families, so the comparisons
    # below compare words
    student, _ = _make_run(make_run(family, "bfloat16")["base"], tmp_path / "run", bits=8, seed=1)
    out = tmp_path / "int8"
    assert _cli("export", str(tmp_path / "run"), str(out)) == f"INT8 compressed-tensors model written to {out}\n"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                                         "group_size": GROUP, "strategy": "group", "dynamic": False}
    qlayers = _quant_layers(student)
    names = module_checkpoint_names(student, list(qlayers))
    tensors = load_file(str(out / "model.safetensors"))
    for name, ql in qlayers.items():
        codes, scales = ql.quantize()
        packed, key = tensors[f"{names[name]}.weight_packed"], names[name]
        assert packed.shape == (ql.out_features, ql.in_features // 4), key
        assert torch.equal(unpack_from_int32(packed, 8, tensors[f"{key}.weight_shape"]), codes), key
        assert torch.equal(tensors[f"{key}.weight_scale"], scales.float()), key

    model, info, logs, caught = _plain_load(str(out), caplog)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not logs and not caught, [r.getMessage() for r in logs] + [str(w.message) for w in caught]
    ours, processor = load_model(str(out))
    assert {n for n, m in ours.named_modules() if isinstance(m, W8A16Linear)} == set(qlayers)
    inputs = _inputs(processor)
    # our served model is the trained student up to matmul rounding
    assert_close_to_gold(_logits(ours, inputs).double(), _logits(student, inputs).double(),
                         _logits(student, inputs).double(), atol=1e-4, name="int8 export vs student")

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    prompt = "what color is the circle ?"
    cli_text = _cli("generate", str(out), "--image", str(image), "--prompt", prompt, "--max-new-tokens", "8",
                    "--device", "cpu").rstrip("\n")
    assert cli_text.strip()
    assert generate(model, processor, str(image), prompt, max_new_tokens=8) == cli_text
    assert generate(ours, processor, str(image), prompt, max_new_tokens=8) == cli_text


@pytest.mark.parametrize("family", ["llava_hf", "qwen2_vl"])
def test_full_precision_run_exports_a_plain_checkpoint(make_run, family, tmp_path, caplog):
    """A full-precision distillation run (``bits`` None): ``grace export`` writes a plain Hugging Face
    checkpoint in the source checkpoint's tensor names, with no quantization_config; transformers loads
    exactly the trained weights and generates what ``grace generate`` prints for the run and the export."""
    base = make_run(family, "bfloat16")["base"]
    student, _ = _make_run(base, tmp_path / "run", bits=None)
    out = tmp_path / "full"
    assert _cli("export", str(tmp_path / "run"), str(out)) == f"full-precision model written to {out}\n"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert _source_keys(str(out)) == _source_keys(base)
    model, info, logs, caught = _plain_load(str(out), caplog)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not logs and not caught, [r.getMessage() for r in logs] + [str(w.message) for w in caught]
    trained = student.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    from grace.evaluate import generate

    processor = load_model(str(out))[1]
    expected = generate(model, processor, str(image), "what is in the picture ?", max_new_tokens=8)
    assert expected.strip()   # words to compare
    for where in (out, tmp_path / "run"):
        assert _cli("generate", str(where), "--image", str(image), "--prompt", "what is in the picture ?",
                    "--max-new-tokens", "8", "--device", "cpu").rstrip("\n") == expected, where
    # bfloat16 export: every tensor rounded once to bfloat16
    half = export_run(str(tmp_path / "run"), str(tmp_path / "bf16"), dtype="bfloat16")
    tensors = load_file(os.path.join(half, "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
