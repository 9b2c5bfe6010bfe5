"""An unfinished run becomes a model: ``grace train`` stopped after its step-2 checkpoint (final/ never
written), then ``grace export --step``, ``grace generate`` on the run directory and on the export, and plain
transformers on the export; all through the CLI, in subprocesses, as a user runs them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from grace.export import export_run
from grace.load import load_checkpoint_student, load_model
from tests.test_train import write_dataset


def _cli(*argv, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a CPU user: the references
    return subprocess.run([sys.executable, "-m", "grace", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("unfinished")
    teacher, student = tiny_pair(root)
    data, images = write_dataset(root, corrupt=False)
    finished = root / "finished"
    proc = _cli("train", "--teacher", teacher, "--student", student, "--data", data, "--image-folder", images,
                "--output-dir", finished, "--max-steps", "2", "--save-every", "2", "--batch-size", "2",
                "--grad-accum", "1", "--lr", "1e-2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")   # what a run stopped between its last checkpoint and the end leaves
    return {"root": root, "run": str(run), "finished": str(finished), "images": images}


def test_export_of_an_unfinished_run_by_step(unfinished, tmp_path, reference_backend):
    run = unfinished["run"]
    out = tmp_path / "int4"
    no_step = _cli("export", run, out)
    assert no_step.returncode == 2 and no_step.stderr.count("\n") == 1, no_step.stderr
    assert "is not a finished training run (no final/); its checkpoint/ holds step 2: pass --step 2" in no_step.stderr
    wrong = _cli("export", run, out, "--step", "3")
    assert wrong.returncode == 2 and "holds step 2, not step 3" in wrong.stderr and not out.exists(), wrong.stderr

    done = _cli("export", run, out, "--step", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"INT4 compressed-tensors model written to {out}\n"
    # the step-2 checkpoint is what final/ of the finished run holds: the two exports are the same tensors
    from_final = export_run(unfinished["finished"], str(tmp_path / "from-final"))
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(os.path.join(from_final, "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # and the served model computes what the checkpoint's fake-quantized student computes
    student, processor, cfg, step = load_checkpoint_student(run, step=2)
    assert step == 2 and cfg["bits"] == 4
    served, _ = load_model(str(out))
    image = os.path.join(unfinished["images"], "0.png")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "what is the color of this object ?"}]}], add_generation_prompt=True, tokenize=False)
    from PIL import Image

    enc = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        a, b = student(**enc).logits, served(**enc).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()


def test_generate_and_eval_read_an_unfinished_run(unfinished, tmp_path, caplog):
    """``grace generate`` on the run directory answers what ``grace generate`` on its export answers, and
    plain transformers loads the export with no missing or unexpected key."""
    run, out = unfinished["run"], tmp_path / "int4"
    assert _cli("export", run, out, "--step", "2").returncode == 0
    image = os.path.join(unfinished["images"], "1.png")
    answers = []
    for model_dir in (run, out):
        proc = _cli("generate", model_dir, "--image", image, "--prompt", "what is the color of this object ?",
                    "--max-new-tokens", "4", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers.append(proc.stdout)
    assert answers[0] == answers[1], answers
    ev = _cli("eval", run, "--data", os.path.join(unfinished["root"], "data.json"), "--image-folder",
              unfinished["images"], "--max-new-tokens", "2", "--device", "cpu")
    assert ev.returncode == 0 and '"total": 8' in ev.stdout, ev.stderr[-3000:]
    from transformers import AutoModelForImageTextToText

    _, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.slow
def test_export_by_step_of_an_interrupted_two_rank_run(tmp_path, tiny_pair, color_task):
    """Two gloo ranks (FSDP-sharded student, each rank writing its own DCP shard) are stopped mid-run (SIGTERM
    to rank 1: both stop after the same step and checkpoint it); ``grace export --step`` of that run writes a
    model whose every tensor is the checkpoint's: the quantized layers' codes and scales are exactly what
    lsq_quantize makes of the checkpoint's weights and log-scales, read back with torch's own
    dcp_to_torch_save, and every other tensor equals the checkpoint's."""
    import signal
    import socket
    import time

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from grace.rundir import TRAINER_STATE, read_metrics
    from grace_kernels import lsq_quantize, unpack_int4
    from grace_kernels.nn import W4A16Linear

    teacher, student = tiny_pair(tmp_path)
    data, images = color_task(tmp_path, 6)
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GRACE_KERNELS_BACKEND="reference", OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    args = [sys.executable, "-m", "grace", "train", "--teacher", teacher, "--student", student, "--data", data,
            "--image-folder", images, "--output-dir", str(run), "--max-steps", "40", "--save-every", "100",
            "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-2", "--num-workers", "0", "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    deadline = time.monotonic() + 600
    while not (os.path.exists(run / "metrics.jsonl") and len(read_metrics(str(run / "metrics.jsonl"))) >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errs]
    ckpt = run / "checkpoint"
    step = torch.load(ckpt / TRAINER_STATE, weights_only=False)["step"]
    assert 2 <= step < 40 and not (run / "final").exists()
    assert {n for n in os.listdir(ckpt) if n.endswith(".distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    out = tmp_path / "int4"
    done = _cli("export", run, out, "--step", step)
    assert done.returncode == 0, done.stderr[-3000:]
    dcp_to_torch_save(ckpt, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["student"]
    served, _ = load_model(str(out))
    quantized = {n: m for n, m in served.named_modules() if isinstance(m, W4A16Linear)}
    assert quantized and len(quantized) == sum(k.endswith(".log_scale") for k in saved)
    for name, layer in quantized.items():
        codes, scales = lsq_quantize(saved[f"{name}.weight"], saved[f"{name}.log_scale"], bits=4, group_size=128,
                                     scale_dtype=torch.bfloat16)
        got_codes, got_scales = unpack_int4(layer.int4_weight)
        assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales), name
        if layer.bias is not None:
            assert torch.equal(layer.bias, saved[f"{name}.bias"]), name
    dense = {k: v for k, v in served.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}
    assert dense and all(torch.equal(v, saved[k]) for k, v in dense.items()), \
        [k for k, v in dense.items() if not torch.equal(v, saved.get(k, torch.empty(0)))][:4]
