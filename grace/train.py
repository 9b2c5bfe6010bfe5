"""The GRACE training loop, single process or data-parallel under torchrun.

Teacher frozen in eval mode; student's vision tower frozen, its language backbone made
quantization-aware (QuantLinear), weights and log-scales trained jointly with AdamW (separate
learning rate for the scales), cosine schedule with warmup, gradient accumulation and clipping, the
adaptive beta controller updated once per optimizer step from that step's mean GDKD.

Distributed (``torchrun --nproc_per_node=P -m grace train ...``; NCCL on GPUs, gloo on CPU): the student
is sharded with PyTorch FSDP (``fully_shard`` per decoder block, then the root; the frozen vision tower
stays replicated); the teacher is replicated on every rank (it is frozen and only runs forward).
``batch_size`` is per rank: each optimizer step consumes P * batch_size * grad_accum samples, rank r
taking its slice of one global permutation, so a P-rank run and a single-process run with P times the
batch see the same samples.
Gradients are averaged over ranks (FSDP's reduce-scatter), the logged losses and the GDKD the controller
sees are averaged over ranks too, so every rank holds the same beta. As with any data-parallel mean of
per-rank means, this equals the single-process loss exactly when ranks hold equal numbers of supervised
tokens (and of images, for RCKA).

Stages, over one :class:`Run` state: :func:`check_run_dir` (refuse to overwrite a run; changes nothing),
:func:`build_data`, :func:`build_student` (load and check, freeze the vision tower, quantize, shard),
:func:`build_teacher`, :func:`prepare_run_dir` (clean up after a killed run, write config.json: only once data
and checkpoints passed their checks), :func:`build_optimizer`, :func:`resume`, :func:`train_step` (one optimizer step),
:func:`save_checkpoint` and :func:`save_final`; :func:`train` runs them in that order.

Run directory:
    config.json        the TrainConfig of the run (ablation switches included)
    metrics.jsonl      one line per optimizer step
    checkpoint/        written every save_every steps and at the end with torch.distributed.checkpoint:
                       every rank writes its shard of the student and optimizer (one .distcp file each),
                       rank 0 adds trainer_state.pt (schedule, controller, data position, RNG, step,
                       config); written into checkpoint.tmp-<pid>/, then renamed into place. It resumes on
                       any number of ranks (DCP reshards on load).
    final/             student state (weights + log-scales), quantization.json, model config, processor
    controller.png     beta and the EMA of GDKD against tau, and the losses, over steps
A directory holding any of these is a run: ``train`` refuses it unless ``resume`` (continue from
checkpoint/) or ``overwrite`` (delete these files first) is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import time
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm.auto import tqdm

from grace.config import TrainConfig, saved_settings
from grace.controller import AdaptiveIBController
from grace.data import ConversationDataset, SampleStream, build_loader, end_tokens_of, template_ends_turns
from grace.device import resolve_device
from grace.errors import GraceError, NonFiniteLossError
from grace.families import check_pair, check_same_tokenizer, family_of
from grace.io import atomic_path, one_line, read_json
from grace.objective import TeacherCache, student_objective, teacher_key, teacher_outputs, warmup_scale
from grace.quantize import quantize_model

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "final", "controller.png")
TRAINER_STATE = "trainer_state.pt"   # inside checkpoint/, beside the DCP shards
TRAINER_STATE_KEYS = ("scheduler", "controller", "data_position", "rng_cpu", "step", "world_size", "config")
# Options that may differ between a checkpoint and the run resuming it: where files live, which device runs,
# how often to save, how many worker processes encode samples and whether they keep them (the stream depends on
# neither); every other option changes the trajectory, so a difference is refused. batch_size is compared as
# batch_size x world size, the global batch, so a run may resume on another number of ranks.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "overwrite", "device", "save_every", "teacher", "student",
                               "data", "image_folder", "gradient_checkpointing", "batch_size",
                               "num_workers", "cache_samples"})
LOSS_KEYS = ("loss", "ce", "gdkd", "rcka", "gate")   # a metrics row's losses, in this order
MEAN_KEYS = tuple(k for k in LOSS_KEYS if k != "rcka")   # averaged over micro-batches; rcka over measured images


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: list[dict]
    skipped: dict


@dataclasses.dataclass
class Run:
    """What the stages of one training run share. ``frozen_dtype`` is the dtype of the frozen parts (the
    teacher and the student's vision tower): bfloat16 when ``cfg.bf16`` on CUDA, else float32.
    ``compute_dtype`` is the autocast dtype of the forward passes (see :meth:`TrainConfig.compute_dtype`);
    the student's trainable parameters, their gradients and the optimizer states are float32 whatever it is."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    family: Any
    frozen_dtype: torch.dtype
    compute_dtype: torch.dtype = torch.float32
    processor: Any = None
    dataset: ConversationDataset | None = None
    student: torch.nn.Module | None = None
    objective: Any = None                       # student_objective bound to the (sharded) student
    teacher: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    params: list[torch.nn.Parameter] = dataclasses.field(default_factory=list)   # the clipped ones
    controller: AdaptiveIBController | None = None
    batches: SampleStream | None = None
    data_state: dict | None = None              # the stream position a checkpoint recorded, None: the start
    total_steps: int = 0
    step: int = 0                               # optimizer steps done
    last_checkpoint: int | None = None          # the step checkpoint/ holds, None before the first
    history: list[dict] = dataclasses.field(default_factory=list)
    teacher_cache: TeacherCache | None = None   # shared with other runs of the same teacher (train's argument)
    teacher_key: str = ""                       # the teacher's key in teacher_cache (build_teacher)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoint")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "metrics.jsonl")


def _init_distributed(dev_type: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev_type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier(run: Run) -> None:
    if run.world > 1:
        dist.barrier()


def _shard_student(student, family) -> None:
    """FSDP2: one unit per decoder block, then the root. The frozen vision tower stays replicated (it has no
    gradients to reduce, its dtype differs from the backbone's, and transformers' hidden-state capture
    inside it does not survive FSDP's module wrapping). The loss is computed by ``student_objective``
    registered as a forward method of the root, so FSDP gathers the root's parameters (embeddings, LM
    head) around it and reduces their gradients after its backward.

    Parameters stay float32 in every unit (``MixedPrecisionPolicy`` with ``param_dtype`` left unset,
    ``reduce_dtype`` float32); bf16 compute comes from autocast in :func:`train_step`. A bf16 ``param_dtype``
    would round the LSQ log-scales to bf16 in the forward: near |log s| = 4..8 its spacing is 2^-6..2^-5, a
    1.6-3% step of the scale, while an update at lr 2e-5 moves a log-scale by about 1e-5, so the forward would
    not see the scales learn for hundreds of steps. FSDP2 casts a whole unit to one ``param_dtype`` and
    reduce-scatters one gradient dtype per unit, and the log-scales live in the same modules as the weights,
    so they cannot stay float32 inside a bf16 unit. The cost of float32 params: all-gathers move 4 bytes per
    parameter instead of 2, and the unsharded unit (one decoder block at a time) is twice as large."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in family.decoder_layers(student):
        fully_shard(layer, mp_policy=policy)
    fully_shard(student, ignored_params=set(family.vision_tower(student).parameters()), mp_policy=policy)
    student.grace_objective = types.MethodType(student_objective, student)
    register_fsdp_forward_method(student, "grace_objective")


def _load_model(path: str, dtype: torch.dtype | str, device: torch.device, role: str):
    """The checkpoint at ``path`` in ``dtype`` ("auto": the dtype its weights are stored in) on ``device``; a
    missing, unexpected, misshapen or non-finite tensor or a truncated file is refused (see
    :func:`grace.load.load_pretrained`), never trained with random rows."""
    from grace.load import load_pretrained

    return load_pretrained(path, dtype, device, role=role)


def _student_skeleton(path: str):
    """The student's architecture on the meta device, float32: shapes and dtypes, no storage."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)


def _prepare_student(student, run: Run, *, verbose: bool) -> None:
    """Freeze the vision tower, swap the backbone's linear layers for QuantLinear and turn on gradient
    checkpointing (non-reentrant: the variant FSDP supports) when asked, in place. The LSQ log-scales
    (float32) are initialised from ``student``'s weights as they are, so from the checkpoint's own values when
    it is loaded in its stored dtype."""
    cfg = run.cfg
    if cfg.freeze_vision:
        run.family.vision_tower(student).requires_grad_(False)
    if cfg.bits is not None:
        quantize_model(student, bits=cfg.bits, group_size=cfg.group_size, method=cfg.init_method,
                       scale_dtype=getattr(torch, cfg.scale_dtype) if cfg.scale_dtype else None,
                       verbose=verbose)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _set_dtypes(student, run: Run) -> None:
    """Trainable parameters float32 (the optimizer's master weights), the frozen vision tower ``frozen_dtype``."""
    student.to(torch.float32)
    if run.cfg.freeze_vision:
        run.family.vision_tower(student).to(run.frozen_dtype)


def _load_sharded_student(run: Run):
    """Under torchrun: every rank builds the student on the meta device, quantizes and shards it, and only
    then allocates its own shards (float32) and the replicated vision tower; rank 0 alone loads the checkpoint
    (in its stored dtype, on its device, LSQ scales initialised from those weights) and broadcasts it tensor by
    tensor, each rank keeping its slice. Non-persistent buffers (rotary frequencies), which no state dict carries, are
    broadcast from rank 0's loaded model too."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    full_state, buffers = {}, {}
    if run.main:
        full = _load_model(run.cfg.student, "auto", run.device, "student")   # on the GPU the scale init is fast
        _prepare_student(full, run, verbose=False)
        full_state, buffers = full.state_dict(), dict(full.named_buffers())
        del full
    student = _student_skeleton(run.cfg.student)
    _prepare_student(student, run, verbose=run.main)
    _set_dtypes(student, run)
    _shard_student(student, run.family)
    student.to_empty(device=run.device)
    set_model_state_dict(student, full_state, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))
    del full_state
    for name, buf in student.named_buffers():
        value = buffers[name].to(run.device, buf.dtype) if run.main else torch.empty_like(buf)
        dist.broadcast(value, src=0)
        buf.copy_(value)
    return student


def _schedule(total: int, warmup_ratio: float):
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_atomic(obj, path: str) -> None:
    """torch.save to ``path.tmp-<pid>``, then rename: a crash before the rename leaves the previous file
    intact (and a temp file that :func:`prepare_run_dir` removes at the next start)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- stage 1: the run directory ---

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
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if not cfg.resume:
        if present and not cfg.overwrite:
            raise GraceError(f"{out} already holds a run ({', '.join(present)}): pass --resume to continue it "
                             "or --overwrite to replace it")
        return None
    if "config.json" in present:
        read_json(os.path.join(out, "config.json"), what="the run's configuration")
    ckpt = _find_checkpoint(out)
    if ckpt is None:
        if _read_metrics(os.path.join(out, "metrics.jsonl")):
            raise GraceError(f"cannot resume: {os.path.join(out, 'checkpoint')} is missing (the run logged steps "
                             "but left no checkpoint); pass --overwrite instead of --resume to train it again "
                             "from step 0")
        return None
    state = _read_checkpoint(ckpt)
    _check_same_settings(state, cfg, world, ckpt)
    return state


def _find_checkpoint(out: str) -> str | None:
    """checkpoint/, or the previous one a crash left renamed aside while publishing a new one."""
    path = os.path.join(out, "checkpoint")
    if os.path.isdir(path):
        return path
    aside = sorted(glob.glob(os.path.join(glob.escape(out), "checkpoint.old-*")))
    return aside[-1] if aside else None


def _read_checkpoint(path: str) -> dict:
    """The trainer state of checkpoint directory ``path``, after checking that every shard file the DCP index
    names exists and is long enough (a truncated shard would otherwise fail deep inside the load)."""
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


def _check_same_settings(state: dict, cfg: TrainConfig, world: int, path: str) -> None:
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
    aside = _find_checkpoint(out)
    if aside is not None and aside != ckpt:
        os.rename(aside, ckpt)
    pattern = os.path.join(glob.escape(out), "{}")
    leftovers = (glob.glob(pattern.format("*.tmp-*")) + glob.glob(pattern.format("checkpoint.old-*"))
                 + glob.glob(os.path.join(glob.escape(out), "final", "*.tmp-*")))
    for path in leftovers:
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(path)
    if cfg.overwrite:
        for name in RUN_FILES:
            _remove(os.path.join(out, name))
    cfg.to_json(os.path.join(out, "config.json"))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


# --- stage 2: data and models ---

def build_data(run: Run) -> None:
    """The processor and the dataset (bad samples skipped and counted, reported once by rank 0)."""
    from transformers import AutoProcessor

    cfg = run.cfg
    run.processor = AutoProcessor.from_pretrained(cfg.student)
    ends = end_tokens_of(run.processor, _generation_eos(cfg.student))
    if run.main and not template_ends_turns(run.processor, ends):
        print(f"data: the chat template writes no end-of-sequence token after an assistant turn; "
              f"{run.processor.tokenizer.eos_token!r} is appended to every assistant turn and supervised, "
              "so the student learns to stop")
    # Records are indexed here and encoded when drawn: bad ones are skipped and counted by the stream.
    run.dataset = ConversationDataset.from_json(cfg.data, run.processor, cfg.image_folder, cfg.max_length,
                                                cache=cfg.cache_samples, end_tokens=ends)
    if len(run.dataset) == 0:
        raise GraceError(f"no record in {cfg.data}")


def _generation_eos(model_dir: str):
    """``eos_token_id`` of the checkpoint's generation_config.json (an int, a list or None): the tokens
    generation stops on, which may include more than the tokenizer's EOS (Qwen's <|im_end|> and
    <|endoftext|>)."""
    path = os.path.join(model_dir, "generation_config.json")
    return read_json(path, what="the generation config").get("eos_token_id") if os.path.isfile(path) else None


def build_student(run: Run) -> None:
    """The student, ready to train: vision tower frozen (``frozen_dtype``), the backbone's linear layers swapped
    for QuantLinear with LSQ log-scales initialised from the checkpoint's weights in their stored dtype,
    trainable parameters float32, gradient checkpointing when asked for, and sharded under torchrun (see
    :func:`_shard_student`).

    Peak memory for the weights per rank, for N parameters stored in b bytes each (b = 2 for the bf16
    checkpoints real models ship): single process, the loaded copy (b * N) cast to float32 parameter by
    parameter, so about 4N + b * (largest tensor); under torchrun with P ranks, rank 0 holds the loaded copy
    (b * N) plus its float32 shard (4N / P) and one broadcast tensor, every other rank only its float32 shard,
    one broadcast tensor and the replicated vision tower. No rank holds the whole student in float32. On CUDA
    the loaded copy lives on the GPU (the LSQ scale initialisation runs there); the host holds it only while
    transformers reads it. The RNG state is saved and restored around the load, so every rank's RNG stays the
    same whether it read the weights or not."""
    cfg = run.cfg
    with torch.random.fork_rng(devices=[]):
        if run.world > 1:
            student = _load_sharded_student(run)
            run.objective = student.grace_objective
        else:
            student = _load_model(cfg.student, "auto", run.device, "student")
            _prepare_student(student, run, verbose=True)
            _set_dtypes(student, run)
            run.objective = types.MethodType(student_objective, student)
    run.student = student


def build_teacher(run: Run) -> None:
    """The frozen teacher in ``frozen_dtype`` (bf16 on CUDA with ``cfg.bf16``; float32 on CPU, where bf16
    matmuls are slow), loaded directly in that dtype and replicated on every rank; None when neither KD nor
    RCKA."""
    if run.cfg.kd or run.cfg.rcka:
        run.teacher = _load_model(run.cfg.teacher, run.frozen_dtype, run.device, "teacher").eval()
        run.teacher.requires_grad_(False)
        run.teacher_key = teacher_key(run.cfg.teacher, run.frozen_dtype, run.compute_dtype)


def build_optimizer(run: Run) -> None:
    """AdamW with two groups (weights; LSQ log-scales with their own lr and weight decay), the warmup +
    cosine schedule over the run's total steps, the beta controller, and the batch order."""
    cfg = run.cfg
    trainable = [(n, p) for n, p in run.student.named_parameters() if p.requires_grad]
    scales = [p for n, p in trainable if n.endswith("log_scale")]
    weights = [p for n, p in trainable if not n.endswith("log_scale")]
    run.params = weights + scales
    run.optimizer = torch.optim.AdamW([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": scales, "lr": cfg.scale_lr or cfg.lr,
         "weight_decay": cfg.weight_decay if cfg.scale_weight_decay is None else cfg.scale_weight_decay},
    ])
    per_step = cfg.batch_size * cfg.grad_accum * run.world
    run.total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(run.dataset) / per_step)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, _schedule(run.total_steps, cfg.warmup_ratio))
    run.controller = AdaptiveIBController(cfg.tau, cfg.eta, cfg.beta_init, cfg.beta_min, cfg.beta_max,
                                          cfg.ema_decay, adaptive=cfg.adaptive_beta)


# --- stage 3: resume ---

def resume(run: Run, state: dict | None) -> None:
    """Restore the student and optimizer from checkpoint/ (each rank loads what its shards need, whatever the
    world size that wrote it), and the schedule, controller, batch position and RNG from ``state`` (its
    trainer state, read by :func:`check_run_dir`); cut metrics.jsonl back to its step. With no state, start
    at step 0 with an empty log."""
    if state is None:
        if run.main and os.path.exists(run.metrics_path):
            os.remove(run.metrics_path)
        return
    path = _find_checkpoint(run.cfg.output_dir)
    model_sd, optim_sd = get_state_dict(run.student, run.optimizer)   # the shapes to load into
    shards = {"student": model_sd, "optimizer": optim_sd}
    with _single_process_dcp(run):
        dcp.load(shards, checkpoint_id=path, no_dist=run.world == 1)
    set_state_dict(run.student, run.optimizer, model_state_dict=shards["student"],
                   optim_state_dict=shards["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.controller.load_state_dict(state["controller"])
    run.data_state = state["data_position"]
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"])
    run.step = run.last_checkpoint = state["step"]
    if run.main:
        _truncate_metrics(run.metrics_path, run.step)
        run.history = _read_metrics(run.metrics_path)


# --- stage 4: the loop ---

def train_step(run: Run) -> dict:
    """One optimizer step (``grad_accum`` micro-batches of ``batch_size`` per rank), then the controller's
    update. Returns the step's log row: loss, ce, gdkd and gate averaged over micro-batches and ranks; rcka the
    mean of 1 - CKA over the ``rcka_images`` images it measured in the step (None when the step held no usable
    image, e.g. only text-only records: a zero there would read as a perfect match); beta, lr, tokens.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (before the optimizer step: the student is unchanged).
    """
    cfg, step = run.cfg, run.step
    t0 = time.perf_counter()
    sums = dict.fromkeys(MEAN_KEYS, 0.0)
    tokens, rcka_sum, rcka_images = 0, 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(run.device) for k, v in next(run.batches).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(run.frozen_dtype)
        if run.world > 1:   # reduce-scatter gradients once per optimizer step, not per micro-batch
            run.student.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with torch.autocast(run.device.type, dtype=run.compute_dtype, enabled=run.compute_dtype != torch.float32):
            if run.teacher_cache is None:
                t_out = teacher_outputs(run.teacher, run.family, batch, kd=cfg.kd, rcka=cfg.rcka)
            else:
                t_out = run.teacher_cache.outputs(run.teacher, run.family, batch, kd=cfg.kd, rcka=cfg.rcka,
                                                  teacher_key=run.teacher_key)
            parts = run.objective(run.family, batch, t_out, beta=run.controller.beta, omega=cfg.omega, kd=cfg.kd,
                                  rcka=cfg.rcka, gdkd_scale=warmup_scale(step, cfg.gdkd_warmup_steps),
                                  rcka_scale=warmup_scale(step, cfg.rcka_warmup_steps), temperature=cfg.temperature,
                                  tckd_weight=cfg.tckd_weight, nckd_weight=cfg.nckd_weight, gate=cfg.gate,
                                  gate_temperature=cfg.gate_temperature, kd_type=cfg.kd_type,
                                  kd_t2=cfg.kd_t2)
        (parts.total / cfg.grad_accum).backward()
        for k, v in zip(MEAN_KEYS, (parts.total, parts.ce, parts.gdkd, parts.gate_mean), strict=True):
            sums[k] += float(v.detach()) / cfg.grad_accum
        tokens += parts.tokens
        rcka_sum += float(parts.rcka) * parts.rcka_images
        rcka_images += parts.rcka_images
    if run.world > 1:   # every rank logs, and feeds the controller, the mean over ranks
        packed = torch.tensor([*sums.values(), tokens, rcka_sum, rcka_images], dtype=torch.float64,
                              device=run.device)
        dist.all_reduce(packed)
        *means, tokens, rcka_sum, rcka_images = packed.tolist()
        sums = {k: v / run.world for k, v in zip(sums, means, strict=True)}
        tokens, rcka_images = int(tokens), int(rcka_images)
    if not math.isfinite(sums["loss"]):
        kept = (f"the last checkpoint ({run.checkpoint_path}, step {run.last_checkpoint}) is intact"
                if run.last_checkpoint is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(f"non-finite loss at step {step + 1}: {sums}; {kept}")
    torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if cfg.kd:
        run.controller.update(sums["gdkd"])
    run.step += 1
    dt = time.perf_counter() - t0
    losses = {k: round(v, 6) for k, v in sums.items()}
    losses["rcka"] = round(rcka_sum / rcka_images, 6) if rcka_images else None
    return {"step": run.step, **{k: losses[k] for k in LOSS_KEYS}, "rcka_images": rcka_images,
            "beta": run.controller.beta, "ema_gdkd": run.controller.ema, "tau": cfg.tau,
            "lr": run.scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}


def log_step(run: Run, row: dict) -> None:
    run.history.append(row)
    if run.main:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- stage 5: checkpoints and the final model ---

def save_checkpoint(run: Run) -> None:
    """Write checkpoint/ for ``run.step``: every rank writes its shard of the student and optimizer state into
    ``checkpoint.tmp-<rank 0's pid>/``, rank 0 adds trainer_state.pt and renames the directory into place."""
    model_sd, optim_sd = get_state_dict(run.student, run.optimizer)   # sharded under FSDP: no gather
    tmp = [f"{run.checkpoint_path}.tmp-{os.getpid()}"]
    if run.world > 1:
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if run.main:
        _remove(tmp)
    _barrier(run)
    with _single_process_dcp(run):
        dcp.save({"student": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp, no_dist=run.world == 1)
    if run.main:
        torch.save({"scheduler": run.scheduler.state_dict(), "controller": run.controller.state_dict(),
                    "data_position": run.batches.state_dict(), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
                    "step": run.step, "world_size": run.world, "config": dataclasses.asdict(run.cfg)},
                   os.path.join(tmp, TRAINER_STATE))
        _publish_checkpoint(tmp, run.checkpoint_path)
    run.last_checkpoint = run.step
    _barrier(run)


@contextlib.contextmanager
def _single_process_dcp(run: Run):
    """DCP warns on every single-process save and load, which is this trainer's intended use without torchrun."""
    with warnings.catch_warnings():
        if run.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _publish_checkpoint(tmp: str, path: str) -> None:
    """Replace checkpoint/ by the complete directory ``tmp``. Between the two renames a crash leaves the old
    checkpoint as ``checkpoint.old-<pid>``, which resume finds and the next start puts back."""
    aside = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, aside)
    os.rename(tmp, path)
    _remove(aside)


def save_final(run: Run) -> str:
    """The last checkpoint, final/ (the student's full state dict, gathered on rank 0's CPU) and the
    controller plot; returns the final/ directory."""
    save_checkpoint(run)
    state = get_model_state_dict(run.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = os.path.join(run.cfg.output_dir, "final")
    if run.main:
        _save_final(run.student, state, run.processor, run.cfg)
        from grace.plots import plot_controller

        plot_controller(run.history, os.path.join(run.cfg.output_dir, "controller.png"),
                        convention=run.cfg.kd_convention())
    _barrier(run)
    return final


def _save_final(student, state_dict: dict, processor, cfg: TrainConfig) -> str:
    """final/: the student's full state dict (weights and LSQ log-scales), its config, the processor and
    quantization.json (bits, group size, scale dtype, the names of the quantized linear layers)."""
    final = os.path.join(cfg.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    _save_atomic(state_dict, os.path.join(final, "student_state.pt"))
    if not getattr(student, "grace_quantized_modules", None):
        # Nothing quantized (plain training or distillation): final/ is also a Hugging Face checkpoint.
        student.save_pretrained(final, state_dict=state_dict)
    student.config.save_pretrained(final)
    processor.save_pretrained(final)
    with open(os.path.join(final, "quantization.json"), "w") as f:
        json.dump({"bits": cfg.bits, "group_size": cfg.group_size, "scale_dtype": cfg.scale_dtype,
                   "modules": getattr(student, "grace_quantized_modules", [])}, f, indent=1)
    return final


def _read_metrics(path: str) -> list[dict]:
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


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a crash between the two), and a last line
    cut short by the crash."""
    rows = [r for r in _read_metrics(path) if r["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# --- the whole run ---

def _model_family(cfg: TrainConfig):
    from transformers import AutoConfig

    s_conf = AutoConfig.from_pretrained(cfg.student)
    if cfg.kd or cfg.rcka:
        t_conf = AutoConfig.from_pretrained(cfg.teacher)
        family = check_pair(t_conf, s_conf)
        _check_tokenizers(cfg, family.vocab_size(t_conf), family.vocab_size(s_conf))
        return family
    return family_of(s_conf)


def _check_tokenizers(cfg: TrainConfig, teacher_rows: int, student_rows: int) -> None:
    """The teacher's tokenizer must be the student's over the rows both models have (see
    :func:`grace.families.check_same_tokenizer`)."""
    from transformers import AutoProcessor

    processors = []
    for role in ("teacher", "student"):
        try:
            processors.append(AutoProcessor.from_pretrained(getattr(cfg, role)))
        except (OSError, ValueError, TypeError) as e:
            raise GraceError(f"{role} {getattr(cfg, role)}: no tokenizer could be loaded ({one_line(e)}); "
                             "teacher and student tokenizers must be compared before distilling") from None
    toks = [getattr(p, "tokenizer", p) for p in processors]
    check_same_tokenizer(*toks, teacher_rows=teacher_rows, student_rows=student_rows,
                         teacher_image_token=getattr(processors[0], "image_token", None),
                         student_image_token=getattr(processors[1], "image_token", None))


def train(cfg: TrainConfig, *, progress: bool = True, desc: str = "GRACE",
          teacher_cache: TeacherCache | None = None) -> TrainResult:
    """Run GRACE training as ``cfg`` says (see the module docstring); returns the metrics and final/. ``desc``
    labels the progress bar. ``teacher_cache``: the teacher's outputs of earlier runs in this process that drew
    the same micro-batches (same data, seed and batch size), read back instead of computed again (bit for bit
    the same; :class:`grace.objective.TeacherCache`); None computes every one.

    Raises:
        ValueError: a bad option (:meth:`TrainConfig.validate`), before anything is loaded.
        GraceError: the run directory cannot be used as asked (see :func:`check_run_dir`), or no sample of
            the data is usable.
        NonFiniteLossError: the loss became NaN or infinite; the message says which checkpoint is left.
    """
    cfg.validate()
    family = _model_family(cfg)
    dev = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)   # NCCL's object collectives use the current device
    rank, world = _init_distributed(dev.type)
    run = Run(cfg, dev, rank, world, family,
              frozen_dtype=torch.bfloat16 if (cfg.bf16 and dev.type == "cuda") else torch.float32,
              compute_dtype=cfg.compute_dtype(dev.type), teacher_cache=teacher_cache)
    state = check_run_dir(cfg, world)
    torch.manual_seed(cfg.seed)
    # Data, tokenizers and both checkpoints are checked before the run directory is touched: a start refused
    # for any of them leaves nothing behind (no config.json that would make the corrected retry need
    # --overwrite, and under --overwrite the old run is still there).
    build_data(run)
    build_student(run)
    build_teacher(run)
    _barrier(run)   # every rank has looked at the directory before rank 0 changes it
    if run.main:
        prepare_run_dir(cfg)
    _barrier(run)   # resume reads the checkpoint where rank 0 may have just put it back
    build_optimizer(run)
    resume(run, state)
    del state
    run.batches = build_loader(cfg, run.dataset, run.rank, run.world, run.data_state)
    run.student.train()
    bar = tqdm(range(run.step, run.total_steps), initial=run.step, total=run.total_steps, desc=desc,
               disable=not (progress and run.main))
    for _ in bar:
        row = train_step(run)
        log_step(run, row)
        if cfg.kd or cfg.rcka:
            bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", gdkd=f"{row['gdkd']:.3f}",
                            rcka="-" if row["rcka"] is None else f"{row['rcka']:.3f}", beta=f"{row['beta']:.3f}",
                            gate=f"{row['gate']:.2f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
        else:   # no teacher: beta, gate and the distillation terms take no part, showing them would mislead
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total_steps:
            save_checkpoint(run)   # the last step's checkpoint is written once, by save_final
    run.batches.close()
    if run.batches.skipped and run.main:
        print(f"data: skipped {sum(run.batches.skipped.values())} bad records: {dict(run.batches.skipped)}")
    final_dir = save_final(run)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(cfg.output_dir, final_dir, run.total_steps, run.history, dict(run.batches.skipped))
