"""Bad options and damaged runs: the trainer refuses them with an error naming the option or file, the CLI
prints that error as one line with exit code 2 (a traceback only under --debug), and no file of an existing
run is touched."""

import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_checks import assert_one_line_error, snapshot

import grace_kernels
from grace import TrainConfig, train
from grace.cli import main
from grace.device import resolve_device
from grace.errors import GraceError, NonFiniteLossError
from grace.rundir import read_metrics


@pytest.fixture(scope="module")
def models(tmp_path_factory, color_task, tiny_pair):
    root = tmp_path_factory.mktemp("models")
    data, images = color_task(root, 4)
    teacher, student = tiny_pair(root)
    return {"teacher": teacher, "student": student, "data": data, "images": images}


def base_config(models, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(teacher=models["teacher"], student=models["student"], data=models["data"],
                                 image_folder=models["images"], output_dir=str(out), max_steps=2, batch_size=2,
                                 grad_accum=1, lr=1e-3, group_size=128, seed=0), **kw})


def cli_args(models, out, *extra) -> list[str]:
    return ["train", "--teacher", models["teacher"], "--student", models["student"], "--data", models["data"],
            "--image-folder", models["images"], "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--lr", "1e-3", "--group-size", "128", "--no-progress", *extra]


@pytest.fixture(scope="module")
def finished_run(models, tmp_path_factory):
    """A finished 2-step run (checkpoint/, metrics.jsonl, final/, config.json), trained once per module."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with grace_kernels.use_backend("reference"):
        train(base_config(models, out), progress=False)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


pytestmark = pytest.mark.usefixtures("reference_backend")   # the kernels are parity-tested in their own files


def run_cli(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


# --- the run directory ---

def test_train_refuses_a_directory_holding_a_run(models, run_copy, capsys):
    before = snapshot(run_copy)
    rc, err = run_cli(capsys, cli_args(models, run_copy))
    assert_one_line_error(rc, err, str(run_copy), "--resume", "--overwrite", "checkpoint")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(models, run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine")
    old_metrics = (run_copy / "metrics.jsonl").read_text()
    (run_copy / "metrics.jsonl").write_text(old_metrics + '{"step": 99}\n')
    (run_copy / "final" / "stale.bin").write_bytes(b"x")
    rc, err = run_cli(capsys, cli_args(models, run_copy, "--overwrite"))
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(str(run_copy / "metrics.jsonl"))] == [1, 2]
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert not (run_copy / "final" / "stale.bin").exists()   # final/ of the old run is gone, not merged
    assert json.loads((run_copy / "config.json").read_text())["overwrite"] is True


DEAD_PID = 2 ** 22 + 12345   # above the largest pid Linux hands out: no such process


def test_stale_temp_files_of_a_killed_run_are_removed(models, run_copy):
    stale_dirs = [run_copy / f"checkpoint.tmp-{DEAD_PID}", run_copy / f"checkpoint.old-{DEAD_PID}"]
    for d in stale_dirs:
        shutil.copytree(run_copy / "checkpoint", d)
    stale = [run_copy / f"config.json.tmp-{DEAD_PID}", run_copy / "final" / f"student_state.pt.tmp-{DEAD_PID}"]
    live = run_copy / f"config.json.tmp-{os.getppid()}"   # a live process may still be writing it
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    train(base_config(models, run_copy, resume=True), progress=False)
    assert not any(p.exists() for p in stale + stale_dirs)
    assert live.read_bytes() == b"partial"


def test_checkpoint_left_aside_by_a_crash_while_publishing_is_resumed(models, run_copy):
    """A kill between the two renames of publishing leaves checkpoint/ as checkpoint.old-<pid>."""
    (run_copy / "checkpoint").rename(run_copy / f"checkpoint.old-{DEAD_PID}")
    result = train(base_config(models, run_copy, resume=True), progress=False)
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert (run_copy / "checkpoint").is_dir() and not (run_copy / f"checkpoint.old-{DEAD_PID}").exists()


def test_resume_without_checkpoint_refuses_and_keeps_metrics(models, run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoint")
    before = snapshot(run_copy)
    rc, err = run_cli(capsys, cli_args(models, run_copy, "--resume"))
    assert_one_line_error(rc, err, str(run_copy / "checkpoint"), "missing", "--overwrite")
    assert snapshot(run_copy) == before


def test_resume_into_an_empty_directory_starts_at_step_zero(models, tmp_path):
    result = train(base_config(models, tmp_path / "fresh", resume=True), progress=False)
    assert [r["step"] for r in result.metrics] == [1, 2]


def test_resume_drops_a_half_written_last_metrics_line(models, run_copy):
    rows = (run_copy / "metrics.jsonl").read_text()
    (run_copy / "metrics.jsonl").write_text(rows + '{"step": 3, "loss": 4.1')   # cut by a crash
    result = train(base_config(models, run_copy, resume=True), progress=False)
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert (run_copy / "metrics.jsonl").read_text() == rows


def test_a_bad_metrics_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(GraceError, match=r"metrics.jsonl:2 is not a JSON line"):
        read_metrics(str(path))


@pytest.mark.parametrize(("damage", "says"), [("truncated shard", "is truncated"), ("missing shard", "is missing"),
                                             ("empty index", "cannot be read"),
                                             ("truncated trainer state", "cannot be read"),
                                             ("not a trainer state", "lacks")])
def test_damaged_checkpoint_is_one_line_naming_the_file(models, run_copy, capsys, damage, says):
    ckpt = run_copy / "checkpoint"
    (shard,) = ckpt.glob("*.distcp")
    state = ckpt / "trainer_state.pt"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        named = shard
    elif damage == "missing shard":
        shard.unlink()
        named = shard
    elif damage == "empty index":
        (ckpt / ".metadata").write_bytes(b"")
        named = ckpt / ".metadata"
    elif damage == "truncated trainer state":
        state.write_bytes(state.read_bytes()[:100])
        named = state
    else:
        torch.save({"step": 2}, state)
        named = state
    before = snapshot(run_copy)
    rc, err = run_cli(capsys, cli_args(models, run_copy, "--resume"))
    assert_one_line_error(rc, err, str(named), says)
    assert snapshot(run_copy) == before


def test_malformed_run_config_json_is_named(models, run_copy, capsys):
    (run_copy / "config.json").write_text('{"teacher": ')
    before = snapshot(run_copy)
    rc, err = run_cli(capsys, cli_args(models, run_copy, "--resume"))
    assert_one_line_error(rc, err, str(run_copy / "config.json"), "not valid JSON")
    assert snapshot(run_copy) == before


def test_malformed_model_config_json_is_named(models, tmp_path, capsys):
    broken = tmp_path / "student"
    shutil.copytree(models["student"], broken)
    (broken / "config.json").write_text("{")
    rc, err = run_cli(capsys, cli_args({**models, "student": str(broken)}, tmp_path / "out"))
    assert_one_line_error(rc, err, str(broken / "config.json"), "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_malformed_data_json_is_named(models, tmp_path, capsys):
    bad = tmp_path / "data.json"
    bad.write_text('[{"id": "0", ')
    rc, err = run_cli(capsys, cli_args({**models, "data": str(bad)}, tmp_path / "out"))
    assert_one_line_error(rc, err, str(bad), "invalid JSON")


def test_resume_with_other_settings_names_them(models, run_copy, capsys):
    before = snapshot(run_copy)
    argv = cli_args(models, run_copy, "--resume")
    argv[argv.index("--group-size") + 1] = "64"
    argv[argv.index("--lr") + 1] = "2e-3"
    rc, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, str(run_copy / "checkpoint"), "group_size 64 (checkpoint: 128)",
                          "lr 0.002 (checkpoint: 0.001)")
    assert "save_every" not in err and "resume" not in err.split("differ")[1].split(";")[0]
    assert snapshot(run_copy) == before


def test_resume_of_a_finished_run_with_the_same_settings_is_a_no_op_on_the_weights(models, run_copy):
    before = torch.load(run_copy / "final" / "student_state.pt")
    result = train(base_config(models, run_copy, resume=True, save_every=1), progress=False)
    after = torch.load(os.path.join(result.final_dir, "student_state.pt"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- options ---

def test_output_dir_under_a_regular_file(models, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("data")
    rc, err = run_cli(capsys, cli_args(models, blocker / "run"))
    assert_one_line_error(rc, err, "output_dir", str(blocker), "is a file")
    assert blocker.read_text() == "data"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is usable")
def test_device_cuda_without_a_gpu(models, tmp_path, capsys):
    rc, err = run_cli(capsys, cli_args(models, tmp_path / "out", "--device", "cuda"))
    assert_one_line_error(rc, err, "device 'cuda'", "no CUDA GPU")
    assert not (tmp_path / "out").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is usable"):
            resolve_device("cuda:0")


BAD_VALUES = [("lr", -1e-3), ("lr", 0.0), ("lr", math.inf), ("scale_lr", 0.0), ("max_grad_norm", -1.0),
              ("max_grad_norm", 0.0), ("temperature", math.nan), ("temperature", 0.0), ("gate_temperature", -1.0),
              ("tckd_weight", -1.0), ("nckd_weight", math.nan), ("omega", math.inf), ("weight_decay", -0.1),
              ("scale_weight_decay", -0.1), ("tau", math.nan), ("tau", -0.1), ("eta", -1e-3), ("beta_min", -0.1),
              ("beta_max", 0.5), ("beta_init", math.nan), ("ema_decay", 1.0), ("ema_decay", -0.1),
              ("warmup_ratio", 1.0), ("batch_size", 0), ("grad_accum", 2.5), ("epochs", 0), ("max_steps", 0),
              ("max_length", 0), ("save_every", -1), ("gdkd_warmup_steps", -1), ("rcka_warmup_steps", -1),
              ("seed", -1), ("init_method", "max"), ("preset", "nope"), ("num_workers", -1)]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_validate_names_the_option_out_of_range(name, value):
    cfg = dataclasses.replace(TrainConfig(), **{name: value})
    # beta_max below beta_init is reported as beta_init outside [beta_min, beta_max]
    shown = "beta_init" if name == "beta_max" else name
    with pytest.raises(ValueError, match=rf"bad configuration: .*\b{shown}\b"):
        cfg.validate(check_paths=False)


def test_validate_accepts_the_defaults_and_presets():
    for preset in ("paper", "released"):
        TrainConfig.from_preset(preset).validate(check_paths=False)


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        TrainConfig(resume=True, overwrite=True).validate(check_paths=False)


def test_negative_lr_on_the_cli_trains_nothing(models, tmp_path, capsys):
    rc, err = run_cli(capsys, cli_args(models, tmp_path / "out", "--lr", "-0.001", "--max-grad-norm", "-1"))
    assert_one_line_error(rc, err, "lr must be finite and > 0, got -0.001", "max_grad_norm")
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_says_whether_a_checkpoint_exists(models, tmp_path, monkeypatch):
    # The ops refuse a NaN temperature, so poison the objective itself: the loss of the first step is NaN.
    grace_train = importlib.import_module("grace.train")  # the package's ``train`` attribute is the function
    real = grace_train.student_objective

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        return dataclasses.replace(parts, total=parts.total * math.nan)

    monkeypatch.setattr(grace_train, "student_objective", poisoned)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet") as info:
        train(base_config(models, tmp_path / "nan"), progress=False)
    assert "intact" not in str(info.value)
    assert isinstance(info.value, FloatingPointError) and not (tmp_path / "nan" / "checkpoint").exists()


# --- the CLI's error rule ---

def test_debug_keeps_the_traceback(models, tmp_path):
    for argv in (["--debug", *cli_args(models, tmp_path / "o", "--lr", "-1")],
                 [*cli_args(models, tmp_path / "o", "--lr", "-1"), "--debug"]):
        with pytest.raises(ValueError, match="lr must be"):
            main(argv)


@pytest.mark.parametrize("argv", [["export", "/nonexistent/run", "/nonexistent/out"],
                                  ["eval", "/nonexistent/model", "--data", "/nonexistent/data.json"],
                                  ["generate", "/nonexistent/model", "--image", "/nonexistent.png", "--prompt", "hi"]])
def test_other_commands_report_errors_in_one_line(capsys, argv):
    rc, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, f"grace {argv[0]}: error:")


def test_python_dash_m_grace_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grace", "train", "--data", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("grace train: error: bad configuration:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
