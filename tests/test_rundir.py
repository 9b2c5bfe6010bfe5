"""A real cluster never loses the run: signals, wall-time checkpoints, the run directory's lock, resuming on
changed data or for more steps, a full disk; and the loggers of the loop. Walked as a user does: ``grace train``
in a subprocess on tiny LLaVA models and LLaVA-format JSON."""

import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from cli_checks import assert_one_line_error

import grace_kernels
from grace import TrainConfig, train
from grace.cli import main
from grace.errors import GraceError
from grace.rundir import LOCK_FILE, TRAINER_STATE, lock_run_dir, read_metrics

train_mod = importlib.import_module("grace.train")   # ``grace.train`` the attribute is the function
rundir = importlib.import_module("grace.rundir")
DEAD_PID = 2 ** 22 + 12345   # above the largest pid Linux hands out: no such process
ENV = {**os.environ, "GRACE_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, color_task, tiny_pair):
    root = tmp_path_factory.mktemp("models")
    data, images = color_task(root, 6)
    teacher, student = tiny_pair(root)
    return {"teacher": teacher, "student": student, "data": data, "images": images,
            "records": json.loads(open(data).read())}


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GRACE_KERNELS_BACKEND", "reference")


def cli_args(models, out, *extra, steps=2) -> list[str]:
    return ["train", "--teacher", models["teacher"], "--student", models["student"], "--data", models["data"],
            "--image-folder", models["images"], "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--no-progress", *extra]


def base_config(models, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(teacher=models["teacher"], student=models["student"], data=models["data"],
                                 image_folder=models["images"], output_dir=str(out), max_steps=2, batch_size=2,
                                 grad_accum=1, lr=1e-3, seed=0), **kw})


def grace_cli(*argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grace", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, **kw)


def wait_for_rows(path, n, proc, timeout=300):
    """Until metrics.jsonl at ``path`` holds ``n`` rows (the process is still training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(read_metrics(str(path))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {n}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"no step {n} within {timeout} s")


def final_state(run) -> dict:
    return torch.load(os.path.join(run, "final", "student_state.pt"))


def checkpoint_step(run) -> int:
    return torch.load(os.path.join(run, "checkpoint", TRAINER_STATE), weights_only=False)["step"]


STEPS = 12


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    """The reference: the same run as the interrupted ones, never stopped (a subprocess, as they are)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = grace_cli(*cli_args(models, out, steps=STEPS))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out


# --- signals ---

@pytest.mark.parametrize("how", ["SIGTERM to the trainer", "SIGINT to its process group"])
def test_a_signal_checkpoints_and_resume_continues_bit_exactly(models, uninterrupted, tmp_path, how):
    """What SLURM or Kubernetes (SIGTERM to the process) and Ctrl-C (SIGINT to the group, DataLoader workers
    included) do: the step in flight finishes, a checkpoint is written, exit 128 + N with one line saying how to
    resume, and --resume ends where an uninterrupted run ends, bit for bit."""
    out = tmp_path / "run"
    sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    proc = grace_cli(*cli_args(models, out, "--num-workers", "2", steps=STEPS), start_new_session=True)
    wait_for_rows(out / "metrics.jsonl", 2, proc)
    if sig == signal.SIGTERM:
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"grace train: stopped by {sig.name} after step") and "--resume" in last, err
    assert "Traceback" not in err
    stopped = checkpoint_step(out)
    assert 2 <= stopped < STEPS and f"after step {stopped} of {STEPS}" in last
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, stopped + 1))
    assert not (out / "final").exists()

    resumed = grace_cli(*cli_args(models, out, "--resume", steps=STEPS))
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    a, b = final_state(uninterrupted), final_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = read_metrics(str(uninterrupted / "metrics.jsonl"))
    got = read_metrics(str(out / "metrics.jsonl"))
    assert [(r["step"], r["loss"], r["beta"]) for r in got] == [(r["step"], r["loss"], r["beta"]) for r in ref]


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_after_the_same_step(models, tmp_path):
    """Two gloo ranks; only rank 1 is signalled. Both stop after the same step (a collective flag), the
    checkpoint holds that step and both exit 143."""
    out = tmp_path / "dist"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "grace", *cli_args(models, out, "--batch-size", "1",
                                                                                  "--num-workers", "0", steps=40)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    wait_for_rows(out / "metrics.jsonl", 2, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errs]
    stopped = checkpoint_step(out)
    assert f"after step {stopped} of 40" in errs[0].strip().splitlines()[-1]
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, stopped + 1))


def test_checkpoints_by_wall_time(models, tmp_path, monkeypatch):
    """--save-every-minutes (default 30) writes a checkpoint once that much time passed since the last one;
    0 turns it off. A clock that moves 20 minutes per reading: checkpoints after steps 2 and 4, and the final
    one after step 5."""
    saved = []
    real = rundir.write_checkpoint

    def spy(path, student, optimizer, state, **kw):
        saved.append(state["step"])
        return real(path, student, optimizer, state, **kw)

    monkeypatch.setattr(rundir, "write_checkpoint", spy)
    now = iter(range(0, 10 ** 6, 20 * 60))
    monkeypatch.setattr(train_mod, "_clock", lambda: next(now))
    assert TrainConfig().save_every_minutes == 30
    train(base_config(models, tmp_path / "timed", max_steps=5), progress=False)
    assert saved == [2, 4, 5]
    saved.clear()
    rc = main(cli_args(models, tmp_path / "off", "--save-every-minutes", "0", steps=5))
    assert rc == 0 and saved == [5]


# --- the lock ---

def test_a_second_trainer_on_the_same_directory_refuses_until_the_first_is_dead(models, tmp_path, capsys):
    out = tmp_path / "run"
    first = grace_cli(*cli_args(models, out, "--save-every", "1", steps=200))
    wait_for_rows(out / "metrics.jsonl", 2, first)
    rc = main(cli_args(models, out, "--resume", steps=200))
    assert_one_line_error(rc, capsys.readouterr().err, str(out), f"pid {first.pid}", "in use")
    assert first.poll() is None   # the first one trains on
    first.kill()   # SIGKILL: no chance to release anything
    first.communicate(timeout=60)
    done = checkpoint_step(out)
    rc = main(cli_args(models, out, "--resume", steps=done + 1))
    assert rc == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, done + 2))


def test_a_refused_start_leaves_no_lock_file(models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rc = main(cli_args(models, out))
    assert_one_line_error(rc, capsys.readouterr().err, "already holds a run")
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_without_record_locks_a_pid_file_is_used(tmp_path, monkeypatch):
    """Filesystems without POSIX record locks (Lustre without -o flock): an exclusive pid file, taken over
    from a dead holder on this host, refused for a live one or for one on another host."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    pid_file = tmp_path / (LOCK_FILE + ".pid")
    pid_file.write_text(f"{DEAD_PID} {socket.gethostname()}\n")
    lock = lock_run_dir(str(tmp_path))
    assert pid_file.read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not pid_file.exists()
    pid_file.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(GraceError, match=f"pid {os.getppid()} on {socket.gethostname()}.*wait for it"):
        lock_run_dir(str(tmp_path))
    pid_file.write_text(f"{DEAD_PID} other-node-7\n")
    with pytest.raises(GraceError, match=f"pid {DEAD_PID} on other-node-7.*delete {pid_file}"):
        lock_run_dir(str(tmp_path))


# --- resume: data, more steps, no run ---

@pytest.fixture
def finished(models, tmp_path):
    out = tmp_path / "run"
    with grace_kernels.use_backend("reference"):
        train(base_config(models, out), progress=False)
    return out


def test_resume_after_the_data_changed_refuses_unless_accepted(models, finished, tmp_path, capsys):
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(models["records"] + models["records"][:1]))
    ckpt = (finished / "checkpoint" / TRAINER_STATE).read_bytes()
    rc = main(cli_args({**models, "data": str(changed)}, finished, "--resume", steps=4))
    assert_one_line_error(rc, capsys.readouterr().err, str(changed), "changed since the checkpoint",
                          "--accept-data-change")
    assert (finished / "checkpoint" / TRAINER_STATE).read_bytes() == ckpt
    assert [r["step"] for r in read_metrics(str(finished / "metrics.jsonl"))] == [1, 2]

    rc = main(cli_args({**models, "data": str(changed)}, finished, "--resume", "--accept-data-change", steps=4))
    out = capsys.readouterr().out
    assert rc == 0 and "changed" in out and "continuing from epoch 2 of the new file" in out
    assert [r["step"] for r in read_metrics(str(finished / "metrics.jsonl"))] == [1, 2, 3, 4]
    state = torch.load(finished / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert state["data"]["records"] == 7
    assert state["data_position"]["position"] == 7 + 2 * 2   # epoch 2 of the new file, then two steps of 2


def test_a_new_modification_time_alone_is_the_same_data(models, finished, tmp_path, capsys):
    copy = tmp_path / "copied.json"   # a copy to node-local scratch: same bytes, new mtime
    copy.write_bytes(open(models["data"], "rb").read())
    os.utime(copy, (1, 1))
    rc = main(cli_args({**models, "data": str(copy)}, finished, "--resume", steps=3))
    assert rc == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(str(finished / "metrics.jsonl"))] == [1, 2, 3]


def test_resume_with_more_steps_extends_a_finished_run(models, finished, capsys):
    rc = main(cli_args(models, finished, "--resume", steps=1))
    assert_one_line_error(rc, capsys.readouterr().err, "--max-steps 1", "step 2 already")
    rc = main(cli_args(models, finished, "--resume", steps=4))
    assert rc == 0, capsys.readouterr().err
    rows = read_metrics(str(finished / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # From the resumed step on, the cosine follows the new length (warmup 3% of 4 steps: 1 step); a row logs
    # the learning rate after its step.
    lr = TrainConfig(lr=1e-3).lr
    expected = [lr * train_mod._schedule(4, 0.03)(s) for s in (3, 4)]
    assert [r["lr"] for r in rows[2:]] == pytest.approx(expected)


def test_resume_into_a_directory_without_a_run_says_so(models, tmp_path, capsys):
    rc = main(cli_args(models, tmp_path / "fresh", "--resume"))
    assert rc == 0
    assert f"{tmp_path / 'fresh'}: no run to resume (no checkpoint/): starting at step 0" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["shards", "trainer state"])
def test_disk_full_during_a_checkpoint(models, tmp_path, monkeypatch, capsys, where):
    """The second checkpoint hits ENOSPC while its shards (DCP's writer) or its trainer state are written: one
    line, the first checkpoint intact, no temp left, and --resume continues once there is space again."""
    real_save, real_write, checkpoints = torch.save, rundir.write_checkpoint, []

    def counting(*args, **kw):
        checkpoints.append(1)
        return real_write(*args, **kw)

    def full_disk(obj, f, *a, **kw):
        target = "trainer state" if str(f).endswith(TRAINER_STATE) else "shards"
        if len(checkpoints) == 2 and target == where:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(rundir, "write_checkpoint", counting)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    rc = main(cli_args(models, out, "--save-every", "1", steps=3))
    assert_one_line_error(rc, capsys.readouterr().err, "No space left on device", str(out / "checkpoint"),
                          "intact", "--resume")
    assert checkpoint_step(out) == 1
    assert [p for p in os.listdir(out) if ".tmp-" in p or ".old-" in p] == []
    monkeypatch.setattr(torch, "save", real_save)
    assert main(cli_args(models, out, "--resume", steps=3)) == 0
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]


# --- loggers ---

class ListLogger:
    def __init__(self):
        self.rows, self.closed = [], False

    def log(self, row):
        self.rows.append(row)

    def close(self):
        self.closed = True


def test_loggers_get_every_row_and_metrics_jsonl_is_still_written(models, tmp_path):
    logger = ListLogger()
    result = train(base_config(models, tmp_path / "run"), progress=False, loggers=[logger])
    assert logger.rows == result.metrics and [r["step"] for r in logger.rows] == [1, 2] and logger.closed
    assert read_metrics(str(tmp_path / "run" / "metrics.jsonl")) == result.metrics


def test_report_to_tensorboard(models, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc = main(cli_args(models, tmp_path / "run", "--report-to", "tensorboard"))
    assert rc == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in rows])


def test_report_to_without_tensorboard_or_unknown_is_one_line(models, tmp_path, monkeypatch, capsys):
    rc = main(cli_args(models, tmp_path / "a", "--report-to", "wandb"))
    assert_one_line_error(rc, capsys.readouterr().err, "report_to", "wandb", "tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if it were not installed
    rc = main(cli_args(models, tmp_path / "b", "--report-to", "tensorboard"))
    assert_one_line_error(rc, capsys.readouterr().err, "pip install tensorboard")
