"""The run directory of ``grace train``: what it holds, when it may be used, its checkpoints and its log.

Layout:
    config.json        the TrainConfig of the run (ablation switches included)
    metrics.jsonl      one line per optimizer step
    checkpoint/        torch.distributed.checkpoint shards of the student and optimizer (one .distcp file per
                       rank) plus trainer_state.pt (rank 0: schedule, controller, data position, RNG, step,
                       config); written into checkpoint.tmp-<pid>/, then renamed into place. It resumes on any
                       number of ranks (DCP reshards on load).
    final/             student state (weights + log-scales), quantization.json, model config, processor
    controller.png     beta and the EMA of GDKD against tau, and the losses, over steps
A directory holding any of these is a run: ``grace train`` refuses it unless ``resume`` (continue from
checkpoint/) or ``overwrite`` (delete these files first) is set.

The directory is locked while a process trains in it (:func:`lock_run_dir`, the hidden file ``.grace.lock``,
which is not part of the run and is removed when the process releases it; a killed holder's stays and is taken
over).

Every write that a crash could cut short goes to ``<name>.tmp-<pid>`` first and is renamed into place;
:func:`prepare_run_dir` removes such leftovers of dead processes at the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from grace.config import TrainConfig, saved_settings
from grace.errors import GraceError
from grace.io import atomic_path, one_line, path_relation, read_json, write_json

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "final", "controller.png")
TRAINER_STATE = "trainer_state.pt"   # inside checkpoint/, beside the DCP shards
TRAINER_STATE_KEYS = ("scheduler", "controller", "data_position", "rng_cpu", "step", "world_size", "config")
# Options that may differ between a checkpoint and the run resuming it: where files live, which device runs,
# how often to save, where else to report, how many worker processes encode samples and whether they keep them
# (the stream depends on neither); every other option changes the trajectory, so a difference is refused.
# batch_size is compared as batch_size x world size, the global batch, so a run may resume on another number of
# ranks.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "overwrite", "device", "save_every", "teacher", "student",
                               "data", "image_folder", "gradient_checkpointing", "batch_size",
                               "num_workers", "cache_samples", "report_to", "save_every_minutes", "max_steps",
                               "accept_data_change"})
LOCK_FILE = ".grace.lock"
# errno of a filesystem that offers no POSIX record locks (Lustre mounted without -o flock, some FUSE mounts)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def save_atomic(obj, path: str) -> None:
    """torch.save through :func:`grace.io.atomic_path`: a crash before the rename leaves the previous file
    intact (and a temp file that :func:`prepare_run_dir` removes at the next start)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- may training use the directory ---

def check_run_dir(cfg: TrainConfig, world: int = 1) -> dict | None:
    """Decide, without changing anything, whether training may use ``cfg.output_dir``; every rank runs it.

    Returns the trainer state of the checkpoint to resume from (read, its shards' sizes checked against
    their index, its settings checked against ``cfg`` run on ``world`` ranks), or None to start at step 0.

    Raises:
        GraceError: the directory holds a run and neither ``resume`` nor ``overwrite`` is set; ``resume`` of a
            run that logged steps but has no checkpoint/; a checkpoint that cannot be read, is truncated or
            lacks entries; the run's config.json is not valid JSON; settings that differ from the checkpoint's.
    """
    out = cfg.output_dir
    check_apart_from_inputs(cfg)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if not cfg.resume:
        if present and not cfg.overwrite and not only_a_start(out, present):
            raise GraceError(f"{out} already holds a run ({', '.join(present)}): pass --resume to continue it "
                             "or --overwrite to replace it")
        if present and cfg.overwrite and not written_by_train(out):
            raise GraceError(f"--overwrite would delete {', '.join(present)} in {out}, but its config.json is not "
                             "one grace train wrote (it names no teacher, student, data and output_dir), so they "
                             "are not a run's files: choose another --output-dir, or remove them yourself")
        return None
    if "config.json" in present:
        read_json(os.path.join(out, "config.json"), what="the run's configuration")
    ckpt = find_checkpoint(out)
    if ckpt is None:
        if read_metrics(os.path.join(out, "metrics.jsonl")):
            raise GraceError(f"cannot resume: {os.path.join(out, 'checkpoint')} is missing (the run logged steps "
                             "but left no checkpoint); pass --overwrite instead of --resume to train it again "
                             "from step 0")
        return None
    state = read_checkpoint(ckpt)
    check_same_settings(state, cfg, world, ckpt)
    if cfg.max_steps is not None and cfg.max_steps < state["step"]:
        raise GraceError(f"cannot resume {ckpt} with --max-steps {cfg.max_steps}: the checkpoint is at step "
                         f"{state['step']} already; pass --max-steps {state['step']} or more")
    return state


def check_apart_from_inputs(cfg: TrainConfig) -> None:
    """Refuse a run directory that would overwrite what the run reads: ``output_dir`` equal to or inside the
    teacher or student checkpoint (whose config.json the run's would replace), or an input (checkpoint, data
    file, image folder) inside one of the run's own files (:data:`RUN_FILES`: a student taken from this run's
    final/, replaced at the end or deleted by ``overwrite``).

    Raises:
        GraceError: naming the input, the option and the directory.
    """
    out = cfg.output_dir
    inputs = {"--teacher": ("the teacher checkpoint", cfg.teacher),
              "--student": ("the student checkpoint", cfg.student),
              "--data": ("the data file", cfg.data), "--image-folder": ("the image folder", cfg.image_folder)}
    for flag, (what, path) in inputs.items():
        if not path:
            continue
        if flag in ("--teacher", "--student") and path_relation(out, path) in ("is", "inside"):
            where = "is" if path_relation(out, path) == "is" else "is inside"
            raise GraceError(f"--output-dir {out} {where} {what} {path}: training writes config.json, "
                             "checkpoint/ and final/ there; choose another --output-dir")
        for name in RUN_FILES:
            if path_relation(path, os.path.join(out, name)) in ("is", "inside"):
                raise GraceError(f"{flag} {path} lies inside the run directory {out} (its {name}), which this run "
                                 "writes and --overwrite deletes: copy it out of the run first or choose another "
                                 "--output-dir")


def find_checkpoint(out: str) -> str | None:
    """checkpoint/, or the previous one a crash left renamed aside while publishing a new one."""
    path = os.path.join(out, "checkpoint")
    if os.path.isdir(path):
        return path
    aside = sorted(glob.glob(os.path.join(glob.escape(out), "checkpoint.old-*")))
    return aside[-1] if aside else None


def read_checkpoint(path: str) -> dict:
    """The trainer state of checkpoint directory ``path``, after checking that every shard file the DCP index
    names exists and is long enough (a truncated shard would otherwise fail deep inside the load).

    Raises:
        GraceError: naming the index, shard or trainer state that is missing, truncated or not a trainer state.
    """
    from torch.distributed.checkpoint import FileSystemReader

    hint = "pass --overwrite instead of --resume to train again from step 0"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:   # missing, empty or cut-short .metadata
        raise GraceError(f"{os.path.join(path, '.metadata')} cannot be read ({one_line(e, first=True)}): the "
                         f"checkpoint is incomplete; {hint}") from e
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = os.path.join(path, name)
        have = os.path.getsize(shard) if os.path.isfile(shard) else None
        if have is None or have < size:
            state = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise GraceError(f"{shard} is {state}: the checkpoint is incomplete; {hint}")
    state_path = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:   # torch reports a truncated file as RuntimeError, EOFError or UnpicklingError
        raise GraceError(f"{state_path} cannot be read ({one_line(e, first=True)}): it is truncated or missing; "
                         f"{hint}") from e
    missing = [k for k in TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise GraceError(f"{state_path} is not a grace trainer state: it lacks {', '.join(missing)}")
    return state


def data_fingerprint(path: str, index) -> dict:
    """What identifies the data a checkpoint's epoch order and skip list refer to: the file's size and
    modification time, and the SHA-256 of its record index (``index``: a :class:`grace.data.RecordIndex`, each
    record's byte range and whether it holds an image)."""
    digest = hashlib.sha256()
    for array in (index.starts, index.ends, index.has_image):
        digest.update(array.tobytes())
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "index_sha256": digest.hexdigest(),
            "records": len(index.starts)}


def data_changed(saved: dict | None, now: dict) -> str | None:
    """Why the data ``now`` is not the data a checkpoint recorded as ``saved`` (one clause), or None when it is
    the same: same size and the same index. A modification time that alone differs (a copy to node-local
    scratch, a ``touch``) keeps every record's byte range, so the saved order still means the same records."""
    if saved is None:   # a checkpoint written before fingerprints were recorded
        return None
    if saved["size"] != now["size"]:
        return f"its size is {now['size']} bytes (checkpoint: {saved['size']})"
    if saved["index_sha256"] != now["index_sha256"]:
        return (f"its records moved ({now['records']} records, checkpoint: {saved['records']}; the index hash "
                "differs)")
    return None


def check_same_settings(state: dict, cfg: TrainConfig, world: int, path: str) -> None:
    """Raises GraceError listing every option of ``cfg`` (run on ``world`` ranks) that differs from the
    checkpoint's and is not in :data:`RESUMABLE_CHANGES`."""
    saved, now = saved_settings(state["config"]), dataclasses.asdict(cfg)
    differ = [f"{k} {now[k]!r} (checkpoint: {saved[k]!r})" for k in now
              if k in saved and k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if saved["batch_size"] * state["world_size"] != cfg.batch_size * world:
        differ.append(f"batch_size x ranks {cfg.batch_size} x {world} (checkpoint: {saved['batch_size']} x "
                      f"{state['world_size']})")
    if differ:
        raise GraceError(f"cannot resume {path}: settings differ from the checkpoint's: {', '.join(differ)}; "
                         "resume with the checkpoint's settings or pass --overwrite to start again")


def prepare_run_dir(cfg: TrainConfig) -> None:
    """Rank 0 only, after :func:`check_run_dir` passed on every rank: create the directory, put back a
    checkpoint a crash left renamed aside, delete what a killed process left (temp files and directories,
    superseded checkpoints), delete the old run's files under ``overwrite``, write config.json."""
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "checkpoint")
    aside = find_checkpoint(out)
    if aside is not None and aside != ckpt:
        os.rename(aside, ckpt)
    pattern = os.path.join(glob.escape(out), "{}")
    leftovers = (glob.glob(pattern.format("*.tmp-*")) + glob.glob(pattern.format("checkpoint.old-*"))
                 + glob.glob(os.path.join(glob.escape(out), "final", "*.tmp-*")))
    for path in leftovers:
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(path)
    if cfg.overwrite:
        for name in RUN_FILES:
            remove(os.path.join(out, name))
    cfg.to_json(os.path.join(out, "config.json"))


def remove(path: str) -> None:
    """Delete the file or directory tree at ``path``; nothing when it does not exist."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


# --- the lock ---

class RunLock:
    """The lock of one run directory, held by this process until :meth:`release` (or its death)."""

    def __init__(self, path: str, fd: int | None):
        self.path, self._fd = path, fd   # fd None: the pid-file lock of a filesystem without record locks

    def release(self) -> None:
        if self._fd is not None:
            # Unlinked while still held, then closed (which drops the record lock): a process that opened the
            # file meanwhile and locks it next finds it unlinked and starts over (lock_run_dir).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        elif self.path is not None:
            remove(self.path)
        self.path = None


def lock_run_dir(out: str) -> RunLock:
    """Lock run directory ``out`` (created if missing) for this process, or refuse.

    A POSIX record lock (``fcntl.lockf``) on ``out/.grace.lock``, which holds "<pid> <host>" of the holder:
    the kernel (on NFS, the server's lock manager) drops it when the holder dies, however it dies, so a dead
    holder's lock is taken over without guessing from a PID, also when that holder ran on another node.
    Where the filesystem offers no record locks (:data:`NO_LOCKS`), an exclusively created pid file
    ``.grace.lock.pid`` instead: a holder on this host that is no longer alive is taken over; one on another
    host cannot be checked from here and is refused with the file to delete.

    Raises:
        GraceError: another live process holds the lock (its PID and host named).
    """
    import fcntl

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in NO_LOCKS:
                return _lock_with_pid_file(out, path + ".pid")
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise GraceError(_in_use(out, path)) from None
            raise
        try:   # the holder it waited for may have released (and unlinked) the file after we opened it
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, _me().encode())
    os.fsync(fd)
    return RunLock(path, fd)


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _holder(path: str) -> tuple[int | None, str]:
    try:
        with open(path) as f:
            pid, host = (f.read().split() + ["", ""])[:2]
        return (int(pid) if pid.isdigit() else None), host
    except OSError:
        return None, ""


def _in_use(out: str, path: str, hint: str = "wait for it to end or train into another --output-dir") -> str:
    pid, host = _holder(path)
    who = f"pid {pid}" + (f" on {host}" if host else "") if pid else "another process"
    return f"{out} is in use by another grace train ({who}; lock {path}): {hint}"


def _lock_with_pid_file(out: str, path: str) -> RunLock:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)   # atomic on NFSv3+, Lustre, GPFS
        except FileExistsError:
            pid, host = _holder(path)
            if pid is not None and host == socket.gethostname() and not pid_alive(pid):
                remove(path)   # its holder died without releasing it
                continue
            hint = (f"if that process is gone, delete {path}" if host != socket.gethostname()
                    else "wait for it to end or train into another --output-dir")
            raise GraceError(_in_use(out, path, hint)) from None
        with os.fdopen(fd, "w") as f:
            f.write(_me())
        return RunLock(path, None)
    raise GraceError(_in_use(out, path))


# --- checkpoints ---

@contextlib.contextmanager
def _single_process_dcp(world: int):
    """DCP warns on every single-process save and load, which is this trainer's intended use without torchrun."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def write_checkpoint(path: str, student, optimizer, trainer_state: dict, *, rank: int, world: int) -> None:
    """Write the checkpoint directory ``path``: every rank writes its shard of the student and optimizer state
    into ``<path>.tmp-<rank 0's pid>/``; rank 0 adds ``trainer_state`` (the dict of :data:`TRAINER_STATE_KEYS`)
    as trainer_state.pt and publishes the directory. Collective under torchrun (every rank calls it)."""
    import torch.distributed as dist

    model_sd, optim_sd = get_state_dict(student, optimizer)   # sharded under FSDP: no gather
    main = rank == 0
    tmp = [f"{path}.tmp-{os.getpid()}"]
    if world > 1:
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if main:
        remove(tmp)
    if world > 1:
        dist.barrier()
    try:
        with _single_process_dcp(world):
            dcp.save({"student": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp, no_dist=world == 1)
        if main:
            torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
    except BaseException as e:   # DCP reports a writer's failure as CheckpointException, a BaseException
        full = _os_error(e)
        if full is None:
            raise
        remove(tmp)
        kept = find_checkpoint(os.path.dirname(path))
        kept = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
        raise GraceError(f"cannot write the checkpoint {path} ({full.strerror or full}): {kept}; free space "
                         "and continue with --resume") from e
    if main:
        publish_checkpoint(tmp, path)
    if world > 1:
        dist.barrier()


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (DCP wraps a writer's failure in its own exception types), or None."""
    seen, todo = set(), [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        todo += [pair[0] for pair in getattr(e, "failures", {}).values()]   # CheckpointException: rank -> (exc, tb)
    return None


def load_checkpoint(path: str, student, optimizer, *, world: int) -> None:
    """Load the student and optimizer state of checkpoint directory ``path`` in place (each rank reads what its
    shards need, whatever the world size that wrote it)."""
    model_sd, optim_sd = get_state_dict(student, optimizer)   # the shapes to load into
    shards = {"student": model_sd, "optimizer": optim_sd}
    with _single_process_dcp(world):
        dcp.load(shards, checkpoint_id=path, no_dist=world == 1)
    set_state_dict(student, optimizer, model_state_dict=shards["student"], optim_state_dict=shards["optimizer"])


def publish_checkpoint(tmp: str, path: str) -> None:
    """Replace checkpoint/ by the complete directory ``tmp``. Between the two renames a crash leaves the old
    checkpoint as ``checkpoint.old-<pid>``, which resume finds and the next start puts back."""
    aside = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, aside)
    os.rename(tmp, path)
    remove(aside)


# --- final/ ---

def save_final(student, state_dict: dict, processor, cfg: TrainConfig) -> str:
    """final/: the student's full state dict (weights and LSQ log-scales), its config, the processor and
    quantization.json (bits, group size, scale dtype, the names of the quantized linear layers)."""
    final = os.path.join(cfg.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    save_atomic(state_dict, os.path.join(final, "student_state.pt"))
    if not getattr(student, "grace_quantized_modules", None):
        # Nothing quantized (plain training or distillation): final/ is also a Hugging Face checkpoint.
        student.save_pretrained(final, state_dict=state_dict)
    student.config.save_pretrained(final)
    processor.save_pretrained(final)
    write_json({"bits": cfg.bits, "group_size": cfg.group_size, "scale_dtype": cfg.scale_dtype,
                "modules": getattr(student, "grace_quantized_modules", [])}, os.path.join(final, "quantization.json"))
    return final


# --- metrics.jsonl ---

def read_metrics(path: str) -> list[dict]:
    """The rows of metrics.jsonl. A last line that does not parse is a write cut short by a crash and is
    dropped; a bad line before it raises GraceError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for j, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if j == len(lines) - 1:
                break
            raise GraceError(f"{path}:{i} is not a JSON line; fix or delete that line") from None
    return rows


def truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a crash between the two), and a last line
    cut short by the crash."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# TrainConfig fields that every config.json grace train has written names: what tells a run directory from a
# folder that merely holds files of the same names (a Hugging Face checkpoint's config.json, a final/ of its own).
RUN_CONFIG_KEYS = ("teacher", "student", "data", "output_dir")


def written_by_train(out: str) -> bool:
    """Whether ``out/config.json`` is a run configuration grace train wrote (a JSON object naming every key of
    :data:`RUN_CONFIG_KEYS`), so that ``--overwrite`` may delete the run files beside it."""
    try:
        saved = read_json(os.path.join(out, "config.json"))
    except GraceError:
        return False
    return set(RUN_CONFIG_KEYS) <= set(saved)


def only_a_start(out: str, present: list[str]) -> bool:
    """Whether ``out`` holds only what a start that never finished a step writes: this trainer's config.json
    (every TrainConfig field in it) and at most an empty metrics.jsonl, no checkpoint, no final/. Nothing was
    trained there, so a corrected retry may start again without --overwrite; anything else is a run."""
    if not set(present) <= {"config.json", "metrics.jsonl"} or find_checkpoint(out) is not None:
        return False
    try:
        saved = read_json(os.path.join(out, "config.json"))
    except GraceError:
        return False
    if not {f.name for f in dataclasses.fields(TrainConfig)} <= set(saved):
        return False
    try:
        return not read_metrics(os.path.join(out, "metrics.jsonl"))
    except GraceError:   # a log with a bad line is a run's log
        return False
