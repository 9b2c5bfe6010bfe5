"""Nothing outside the run is touched: ``grace demo``, ``grace export`` and ``grace train`` never delete or
overwrite a directory, checkpoint or data file they did not write, and refuse an output that is, or lies inside,
one of their inputs; ``grace plan`` refuses the pairs ``grace train`` refuses and plans with train's defaults.
Walked as a user does: the CLI in a subprocess (one line on stderr, exit 2), on tiny LLaVA models and
LLaVA-format JSON."""

import json
import os
import subprocess
import sys

import pytest
from cli_checks import assert_one_line_error, snapshot

import grace_kernels
from grace import TrainConfig, train
from grace.demo.tiny import build_tiny_vlm
from grace.io import OWNER_FILE, owner_of

ENV = {**os.environ, grace_kernels._backend.ENV_VAR: "reference", "OMP_NUM_THREADS": "1"}


def grace_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grace", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=900)


@pytest.fixture(scope="module")
def models(tmp_path_factory, color_task, tiny_pair):
    root = tmp_path_factory.mktemp("models")
    data, images = color_task(root, 4)
    teacher, student = tiny_pair(root)
    return {"teacher": teacher, "student": student, "data": data, "images": images, "root": root}


def train_args(models, out, *extra, student=None) -> list[str]:
    return ["train", "--teacher", models["teacher"], "--student", student or models["student"],
            "--data", models["data"], "--image-folder", models["images"], "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """A finished 2-step INT4 run (config.json naming its student, checkpoint/, final/, metrics.jsonl)."""
    out = tmp_path_factory.mktemp("run") / "run"
    with grace_kernels.use_backend("reference"):
        train(TrainConfig(teacher=models["teacher"], student=models["student"], data=models["data"],
                          image_folder=models["images"], output_dir=str(out), max_steps=2, batch_size=2,
                          grad_accum=1, lr=1e-3, seed=0), progress=False)
    return out


# --- grace demo ---

def test_demo_refuses_a_directory_it_did_not_create(tmp_path):
    """A user's checkpoint and data in --out: refused before anything is written, every file as it was."""
    out = tmp_path / "mine"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "config.json").write_text('{"model_type": "llava"}')
    (out / "data").mkdir()
    (out / "data" / "train.json").write_text("[]")
    before = snapshot(out)
    proc = grace_cli("demo", "--quick", "--out", out, "--no-progress")
    assert_one_line_error(proc.returncode, proc.stderr, str(out), "grace demo did not create", "--out")
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["data", "teacher"]


def test_demo_refuses_a_training_run_and_an_export(run, tmp_path):
    """A directory another command wrote (a training run) is not the demo's either."""
    before = snapshot(run)
    proc = grace_cli("demo", "--quick", "--out", run, "--no-progress")
    assert_one_line_error(proc.returncode, proc.stderr, str(run), "grace demo did not create")
    assert snapshot(run) == before


# --- grace export ---

@pytest.mark.parametrize("where", ["the run itself", "inside the run", "inside final/", "the run's parent",
                                   "the student checkpoint", "inside the student checkpoint"])
def test_export_refuses_an_output_that_is_an_input_or_holds_one(models, run, where):
    """``grace export RUN RUN --overwrite`` replaced the run (checkpoint, metrics, final weights); with the
    student checkpoint as the output it replaced the student's config.json. Every such output is refused,
    with or without --overwrite, and nothing is touched."""
    student = models["student"]
    out = {"the run itself": run, "inside the run": run / "export", "inside final/": run / "final" / "int4",
           "the run's parent": run.parent, "the student checkpoint": student,
           "inside the student checkpoint": os.path.join(student, "int4")}[where]
    says = {"the run itself": "is the run directory", "inside the run": "inside the run directory",
            "inside final/": "inside the run directory", "the run's parent": "holds the run directory",
            "the student checkpoint": "is the student checkpoint",
            "inside the student checkpoint": "inside the student checkpoint"}[where]
    before_run, before_student = snapshot(run), snapshot(student)
    proc = grace_cli("export", run, out, "--overwrite")
    assert_one_line_error(proc.returncode, proc.stderr, str(out), says)
    assert snapshot(run) == before_run and snapshot(student) == before_student
    assert not os.path.exists(os.path.join(student, "int4")) and not (run / "export").exists()


def test_export_overwrite_replaces_only_an_earlier_export(models, run, tmp_path):
    """--overwrite replaces what grace export wrote before; a directory of the user's (here a data set) is
    refused even with --overwrite and left as it was."""
    out = tmp_path / "int4"
    first = grace_cli("export", run, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert owner_of(str(out)) == "grace export"
    (out / "model.safetensors").write_bytes(b"stale")
    again = grace_cli("export", run, out, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() != b"stale" and (out / OWNER_FILE).exists()

    data_dir = tmp_path / "my-data"   # a user's data set: the run does not name it, it is simply in the way
    (data_dir / "images").mkdir(parents=True)
    (data_dir / "train.json").write_text("[]")
    (data_dir / "images" / "0.png").write_bytes(b"png")
    before = snapshot(data_dir)
    proc = grace_cli("export", run, data_dir, "--overwrite")
    assert_one_line_error(proc.returncode, proc.stderr, str(data_dir), "not written by grace export")
    assert snapshot(data_dir) == before


# --- grace train ---

@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_train_refuses_the_student_checkpoint_as_its_output_dir(models, flag):
    """--output-dir equal to the student checkpoint with --resume replaced the student's config.json."""
    before = snapshot(models["student"])
    proc = grace_cli(*train_args(models, models["student"], flag))
    assert_one_line_error(proc.returncode, proc.stderr, models["student"], "is the student checkpoint", "--output-dir")
    assert snapshot(models["student"]) == before


def test_train_refuses_a_student_inside_the_run_it_would_replace(models, run, tmp_path):
    """Continuing from a run's final/ into that same run with --overwrite would delete the student while it
    is being read."""
    before = snapshot(run)
    proc = grace_cli(*train_args(models, run, "--overwrite", student=run / "final"))
    assert_one_line_error(proc.returncode, proc.stderr, str(run / "final"), "inside the run directory", "--output-dir")
    assert snapshot(run) == before


def test_train_overwrite_refuses_files_it_did_not_write(models, tmp_path):
    """--overwrite into a folder holding a Hugging Face checkpoint's config.json and a final/ of the user's (the
    names of a run's files, not a run) deleted final/ and replaced config.json; it is refused, every file as it
    was. A run grace train wrote is still replaced."""
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}')
    (out / "final" / "weights.bin").write_bytes(b"the user's weights")
    before = snapshot(out)
    proc = grace_cli(*train_args(models, out, "--overwrite"))
    assert_one_line_error(proc.returncode, proc.stderr, str(out), "--overwrite would delete", "not one grace train "
                          "wrote")
    assert snapshot(out) == before
    ours = tmp_path / "run"
    for extra in ((), ("--overwrite",)):
        proc = grace_cli(*train_args(models, ours, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (ours / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_into_a_directory_without_a_run_says_so(models, tmp_path):
    """--resume where no run is (a typo, or the first start of a requeued job): trains from step 0 and says so."""
    out = tmp_path / "fresh"
    proc = grace_cli(*train_args(models, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{out}: no run to resume (no checkpoint/): starting at step 0" in proc.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- grace plan ---

def test_plan_refuses_a_pair_train_refuses(models, tmp_path):
    """Teacher and student of different families: ``grace train`` refuses them, so ``grace plan`` does too,
    by name, for architecture names and for checkpoints alike."""
    proc = grace_cli("plan", "--teacher", "llava-1.5-13b", "--student", "qwen2-vl-2b")
    assert_one_line_error(proc.returncode, proc.stderr,
                          "teacher (llava) and student (qwen2_vl) must be of the same family")
    other = build_tiny_vlm(str(tmp_path / "qwen"), family="qwen2_vl", size="student")
    proc = grace_cli("plan", "--teacher", models["teacher"], "--student", other)
    assert_one_line_error(proc.returncode, proc.stderr,
                          "teacher (llava) and student (qwen2_vl) must be of the same family")


def test_plan_defaults_are_train_defaults():
    """What ``grace plan`` assumes unless told is what ``grace train`` does unless told: gradient
    checkpointing, per-rank batch and sequence length."""
    proc = grace_cli("plan", "--teacher", "llava-1.5-13b", "--student", "llava-1.5-7b")
    assert proc.returncode == 0, proc.stderr
    cfg = TrainConfig()
    header = proc.stdout.splitlines()[1]
    assert f"per-rank batch {cfg.batch_size}, sequence {cfg.max_length}" in header, header
    assert f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}" in header, header
