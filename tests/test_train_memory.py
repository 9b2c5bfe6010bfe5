"""Memory at load and in training: the student is loaded in its stored dtype (never as a float32 copy per
rank), LSQ scales come from the stored weights, bf16 autocast with float32 master weights, and gradient
checkpointing under FSDP (2 gloo processes)."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_train import write_dataset

from grace import TrainConfig
from grace.demo.tiny import build_tiny_vlm
from grace.families import family_of
from grace.quantize import quantize_model

train_mod = importlib.import_module("grace.train")


pytestmark = pytest.mark.usefixtures("reference_backend")   # the kernels are parity-tested in their own files


def _bf16_setup(root, family, tie=False):
    """A tiny teacher (float32) and a student stored in bfloat16, as real checkpoints are; ``tie``: the
    student's LM head shares the embedding matrix (as in Qwen2-VL-2B)."""
    from transformers import AutoModelForImageTextToText

    teacher = build_tiny_vlm(str(root / "teacher"), family=family, size="teacher", seed=1)
    student = build_tiny_vlm(str(root / "student"), family=family, size="student", seed=2)
    model = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.bfloat16)
    if tie:
        model.lm_head.weight = model.get_input_embeddings().weight
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None:
                config.tie_word_embeddings = True
    model.save_pretrained(student)
    data, images = write_dataset(root)
    return {"teacher": teacher, "student": student, "data": data, "images": images}


@pytest.fixture(scope="module")
def bf16_setup(tmp_path_factory):
    return _bf16_setup(tmp_path_factory.mktemp("memory"), "llava")


@pytest.fixture(scope="module")
def bf16_tied_qwen(tmp_path_factory):
    return _bf16_setup(tmp_path_factory.mktemp("memory_qwen"), "qwen2_vl", tie=True)


def _run(setup, **kw):
    from transformers import AutoConfig

    cfg = TrainConfig(teacher=setup["teacher"], student=setup["student"], data=setup["data"],
                      image_folder=setup["images"], **kw)
    family = family_of(AutoConfig.from_pretrained(setup["student"]))
    return train_mod.Run(cfg, torch.device("cpu"), 0, 1, family, frozen_dtype=torch.float32,
                         compute_dtype=cfg.compute_dtype("cpu"))


def test_single_process_loads_stored_dtype_and_initialises_scales_from_it(bf16_setup, monkeypatch):
    from transformers import AutoModelForImageTextToText

    loaded = []
    real_load = train_mod.load_pretrained

    def recording_load(path, dtype, device, **kw):
        model = real_load(path, dtype, device, **kw)
        loaded.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(train_mod, "load_pretrained", recording_load)
    run = _run(bf16_setup)
    train_mod.build_student(run)
    assert loaded == [{torch.bfloat16}]   # read as stored: no float32 copy before quantization
    trainable = {n: p for n, p in run.student.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}   # master weights
    # The scales are initialised from the checkpoint's own values: the same as quantizing the stored model.
    ref = AutoModelForImageTextToText.from_pretrained(bf16_setup["student"], dtype=torch.bfloat16)
    quantize_model(ref, bits=4, group_size=128, verbose=False)
    ref_state = ref.state_dict()
    scales = [n for n in trainable if n.endswith("log_scale")]
    assert len(scales) == 14
    for n in scales:
        torch.testing.assert_close(trainable[n], ref_state[n], rtol=0, atol=0)
        assert ref_state[n].dtype == torch.float32
    weights = [n for n in trainable if n.endswith(".weight")]
    assert all(torch.equal(trainable[n], ref_state[n].float()) for n in weights)


def test_compute_dtype_follows_mixed_precision_and_device():
    assert TrainConfig().compute_dtype("cuda") == torch.bfloat16   # the paper trains in bf16
    assert TrainConfig().compute_dtype("cpu") == torch.float32
    assert TrainConfig(bf16=False).compute_dtype("cuda") == torch.float32
    assert TrainConfig(mixed_precision="bf16").compute_dtype("cpu") == torch.bfloat16
    assert TrainConfig(mixed_precision="none").compute_dtype("cuda") == torch.float32
    with pytest.raises(ValueError, match="mixed_precision must be one of auto, bf16, none, got 'fp8'"):
        TrainConfig(mixed_precision="fp8").validate(check_paths=False)


def test_bf16_autocast_trains_on_cpu(bf16_setup, tmp_path):
    from grace import train

    cfg = dict(teacher=bf16_setup["teacher"], student=bf16_setup["student"], data=bf16_setup["data"],
               image_folder=bf16_setup["images"], max_steps=1, batch_size=2, grad_accum=1, lr=1e-3, seed=0)
    mixed = train(TrainConfig(**cfg, output_dir=str(tmp_path / "bf16"), mixed_precision="bf16"), progress=False)
    full = train(TrainConfig(**cfg, output_dir=str(tmp_path / "fp32"), mixed_precision="none"), progress=False)
    a, b = mixed.metrics[0], full.metrics[0]
    assert a["loss"] != b["loss"]   # the forward really ran in bf16
    print({k: (a[k], b[k]) for k in ("loss", "ce", "gdkd", "rcka")})
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-2)
    # GDKD and RCKA compare near-uniform outputs and near-random features of two random tiny models: they are
    # small differences of large terms, which bf16 rounding moves by tens of percent here.
    assert all(math.isfinite(a[k]) and a[k] > 0 for k in ("loss", "gdkd", "rcka"))
    state = torch.load(os.path.join(mixed.final_dir, "student_state.pt"))
    assert {v.dtype for k, v in state.items() if ".language_model." in k} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("models", ["bf16_setup", "bf16_tied_qwen"])
def test_two_ranks_load_shards_mixed_precision_and_checkpointing(models, request, tmp_path):
    """torchrun, 2 gloo ranks: rank 1 never reads the checkpoint whole, rank 0 reads it in bf16; each rank
    holds half of the float32 trainable parameters; the sharded student equals the single-process one
    exactly; a bf16-autocast forward and backward on 2 + 2 samples matches the single process on 4; gradient
    checkpointing gives the same loss and gradients. LLaVA, and Qwen2-VL with tied embeddings."""
    bf16_setup = request.getfixturevalue(models)
    worker = os.path.join(os.path.dirname(__file__), "train_memory_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout's grace, not an install
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRACE_KERNELS_BACKEND": "reference",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", worker,
                           bf16_setup["teacher"], bf16_setup["student"], bf16_setup["data"], bf16_setup["images"],
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["loads_sharded"] == [[bf16_setup["student"], ["torch.bfloat16"]]]
    assert ranks[1]["loads_sharded"] == []
    for r in ranks:
        assert r["trainable_all_dtensor"] and r["trainable_dtypes"] == ["torch.float32"]
        assert r["local_numel"] <= r["full_numel"] // 2 + 4096   # Shard(0) of every tensor, rows rounded up
        assert r["frozen_dtypes"] == ["torch.float32"]           # CPU: vision tower kept float32
        assert r["log_scale_dtypes"] == ["torch.float32"]
        assert r["state_keys_equal"] and r["state_max_abs_diff"] == 0.0 and r["buffers_equal"]
        assert r["grad_keys_equal"] and r["checkpointing_on"] == [False, True]
        assert r["tied_embeddings"] == [models == "bf16_tied_qwen"] * 2   # sharding keeps a tied LM head tied
        assert r["loss_sharded"] == pytest.approx(r["loss_single"], rel=1e-2)
        assert r["loss_sharded"] != r["loss_fp32"]   # bf16 compute happened
        assert r["grad_rel_sharded_vs_single"] < 5e-2
        assert r["loss_checkpointed"] == pytest.approx(r["loss_sharded"], rel=1e-6)
        assert r["grad_rel_checkpointed_vs_plain"] < 1e-5
    assert ranks[0]["loss_sharded"] == ranks[1]["loss_sharded"]
