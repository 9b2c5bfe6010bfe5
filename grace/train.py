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

Stages, over one :class:`Run` state: :func:`grace.rundir.check_run_dir` (refuse to overwrite a run; changes
nothing), :func:`build_data`, :func:`build_student` (load and check, freeze the vision tower, quantize, shard),
:func:`build_teacher`, :func:`grace.rundir.prepare_run_dir` (clean up after a killed run, write config.json: only
once data and checkpoints passed their checks), :func:`build_optimizer`, :func:`resume`, :func:`train_step` (one
optimizer step), :func:`save_checkpoint` and :func:`save_final`; :func:`train` runs them in that order.

The run directory (config.json, metrics.jsonl, checkpoint/, final/, controller.png) and its rules are
:mod:`grace.rundir`'s; each step's row goes to the loggers of :mod:`grace.reporting` (metrics.jsonl always).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
import types
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from grace import rundir
from grace.config import TrainConfig
from grace.controller import AdaptiveIBController
from grace.data import (
    ConversationDataset,
    SampleStream,
    build_loader,
    check_usable,
    end_tokens_of,
    template_ends_turns,
)
from grace.device import resolve_device
from grace.errors import GraceError, NonFiniteLossError, TrainingStopped
from grace.families import check_pair, check_same_tokenizer, family_of
from grace.io import one_line, read_json
from grace.load import load_pretrained
from grace.objective import LossConfig, TeacherCache, student_objective, teacher_key, teacher_outputs
from grace.quantize import quantize_model
from grace.reporting import make_loggers

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
    loss: LossConfig = dataclasses.field(init=False)                   # the objective's settings, from cfg
    loggers: list = dataclasses.field(default_factory=list)            # rank 0's (grace.reporting)
    data_fingerprint: dict | None = None                               # grace.rundir.data_fingerprint

    def __post_init__(self):
        self.loss = LossConfig.from_train_config(self.cfg)

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
    refused = [None]
    if run.main:
        try:   # on the GPU the scale init is fast
            full = load_pretrained(run.cfg.student, "auto", run.device, role="student")
        except ValueError as e:   # every rank raises it: the others would wait for the broadcast forever
            refused = [one_line(e)]
        else:
            _prepare_student(full, run, verbose=False)
            full_state, buffers = full.state_dict(), dict(full.named_buffers())
            del full
    dist.broadcast_object_list(refused, src=0)
    if refused[0] is not None:
        raise GraceError(refused[0])
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
    check_usable(run.dataset, cfg.data)   # before any model loads: a wrong image folder fails in seconds


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
            student = load_pretrained(cfg.student, "auto", run.device, role="student")
            _prepare_student(student, run, verbose=True)
            _set_dtypes(student, run)
            run.objective = types.MethodType(student_objective, student)
    run.student = student


def build_teacher(run: Run) -> None:
    """The frozen teacher in ``frozen_dtype`` (bf16 on CUDA with ``cfg.bf16``; float32 on CPU, where bf16
    matmuls are slow), loaded directly in that dtype and replicated on every rank; None when neither KD nor
    RCKA."""
    if run.cfg.kd or run.cfg.rcka:
        run.teacher = load_pretrained(run.cfg.teacher, run.frozen_dtype, run.device, role="teacher").eval()
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
    """Restore the student and optimizer from checkpoint/ (:func:`grace.rundir.load_checkpoint`), and the
    schedule, controller, batch position and RNG from ``state`` (its trainer state, read by
    :func:`grace.rundir.check_run_dir`); cut metrics.jsonl back to its step. With no state, start at step 0
    with an empty log."""
    if state is None:
        if run.main and os.path.exists(run.metrics_path):
            os.remove(run.metrics_path)
        return
    rundir.load_checkpoint(rundir.find_checkpoint(run.cfg.output_dir), run.student, run.optimizer, world=run.world)
    run.scheduler.load_state_dict(state["scheduler"])
    run.controller.load_state_dict(state["controller"])
    run.data_state = state["data_position"]
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"])
    run.step = run.last_checkpoint = state["step"]
    if run.main:
        rundir.truncate_metrics(run.metrics_path, run.step)
        run.history = rundir.read_metrics(run.metrics_path)


# --- stage 4: the loop ---

def train_step(run: Run) -> dict:
    """One optimizer step (``grad_accum`` micro-batches of ``batch_size`` per rank), then the controller's
    update. Returns the step's log row: loss, ce, gdkd and gate averaged over micro-batches and ranks; rcka the
    mean of 1 - CKA over the ``rcka_images`` images it measured in the step (None when the step held no usable
    image, e.g. only text-only records: a zero there would read as a perfect match); beta, lr, tokens.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (before the optimizer step: the student is unchanged).
    """
    cfg, step, loss = run.cfg, run.step, run.loss
    t0 = time.perf_counter()
    sums = dict.fromkeys(MEAN_KEYS, 0.0)
    tokens, rcka_sum, rcka_images = 0, 0.0, 0
    gdkd_scale, rcka_scale = loss.scales(step)
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(run.device) for k, v in next(run.batches).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(run.frozen_dtype)
        if run.world > 1:   # reduce-scatter gradients once per optimizer step, not per micro-batch
            run.student.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with torch.autocast(run.device.type, dtype=run.compute_dtype, enabled=run.compute_dtype != torch.float32):
            if run.teacher_cache is None:
                t_out = teacher_outputs(run.teacher, run.family, batch, kd=loss.kd, rcka=loss.rcka)
            else:
                t_out = run.teacher_cache.outputs(run.teacher, run.family, batch, kd=loss.kd, rcka=loss.rcka,
                                                  teacher_key=run.teacher_key)
            parts = run.objective(run.family, batch, t_out, loss, beta=run.controller.beta, gdkd_scale=gdkd_scale,
                                  rcka_scale=rcka_scale)
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
    if loss.kd:
        run.controller.update(sums["gdkd"])
    run.step += 1
    dt = time.perf_counter() - t0
    losses = {k: round(v, 6) for k, v in sums.items()}
    losses["rcka"] = round(rcka_sum / rcka_images, 6) if rcka_images else None
    return {"step": run.step, **{k: losses[k] for k in LOSS_KEYS}, "rcka_images": rcka_images,
            "beta": run.controller.beta, "ema_gdkd": run.controller.ema, "tau": cfg.tau,
            "lr": run.scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}


def log_step(run: Run, row: dict) -> None:
    """The one logging call site: the row joins the run's history and, on rank 0, every logger."""
    run.history.append(row)
    if run.main:
        for logger in run.loggers:
            logger.log(row)


# --- stage 5: checkpoints and the final model ---

def trainer_state(run: Run) -> dict:
    """What a checkpoint holds beside the student and optimizer shards: the one dict of
    :data:`grace.rundir.TRAINER_STATE_KEYS` (plus the CUDA RNG)."""
    return {"scheduler": run.scheduler.state_dict(), "controller": run.controller.state_dict(),
            "data_position": run.batches.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
            "step": run.step, "world_size": run.world, "config": dataclasses.asdict(run.cfg),
            "data": run.data_fingerprint}


def save_checkpoint(run: Run) -> None:
    """Write checkpoint/ for ``run.step`` (:func:`grace.rundir.write_checkpoint`; every rank calls it)."""
    state = trainer_state(run) if run.main else None
    rundir.write_checkpoint(run.checkpoint_path, run.student, run.optimizer, state, rank=run.rank, world=run.world)
    run.last_checkpoint = run.step


def save_final(run: Run) -> str:
    """The last checkpoint, final/ (the student's full state dict, gathered on rank 0's CPU) and the
    controller plot; returns the final/ directory."""
    save_checkpoint(run)
    state = get_model_state_dict(run.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = os.path.join(run.cfg.output_dir, "final")
    if run.main:
        rundir.save_final(run.student, state, run.processor, run.cfg)
        from grace.plots import plot_controller

        plot_controller(run.history, os.path.join(run.cfg.output_dir, "controller.png"),
                        convention=run.cfg.kd_convention())
    _barrier(run)
    return final


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


def train(cfg: TrainConfig, *, progress: bool = True, desc: str = "GRACE", loggers: list | None = None,
          teacher_cache: TeacherCache | None = None) -> TrainResult:
    """Run GRACE training as ``cfg`` says (see the module docstring); returns the metrics and final/. ``desc``
    labels the progress bar. ``loggers``: objects with ``log(row)`` and ``close()`` that receive every step's
    row on rank 0, after metrics.jsonl (always written) and the loggers of ``cfg.report_to``
    (:mod:`grace.reporting`). ``teacher_cache``: the teacher's outputs of earlier runs in this process that drew
    the same micro-batches (same data, seed and batch size), read back instead of computed again (bit for bit
    the same; :class:`grace.objective.TeacherCache`); None computes every one.

    Rank 0 holds the run directory's lock (:func:`grace.rundir.lock_run_dir`) from before it changes anything
    until it returns. SIGTERM or SIGINT during the loop: the current optimizer step finishes, every rank agrees
    to stop after the same step, a checkpoint is written and :class:`TrainingStopped` (exit code 128 + the
    signal's number) is raised after one line on stderr saying how to resume; a second signal interrupts at
    once (KeyboardInterrupt; the last checkpoint stays intact).

    Raises:
        ValueError: a bad option (:meth:`TrainConfig.validate`), before anything is loaded.
        GraceError: the run directory cannot be used as asked (see :func:`grace.rundir.check_run_dir`) or is
            locked by another process; the data changed since the checkpoint (without ``accept_data_change``);
            no sample of the data is usable; a checkpoint cannot be written (disk full).
        NonFiniteLossError: the loss became NaN or infinite; the message says which checkpoint is left.
        TrainingStopped: a signal stopped the run after a checkpoint.
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
    lock, created = None, not os.path.exists(cfg.output_dir)
    if run.main:
        rundir.check_run_dir(cfg, world)   # a refusal here leaves the directory as it was (no lock file)
        lock = rundir.lock_run_dir(cfg.output_dir)
    try:
        _barrier(run)
        # Under the lock: what another process wrote before it released the lock counts.
        state = rundir.check_run_dir(cfg, world)
        return _train(run, state, progress, desc, loggers)
    finally:
        if lock is not None:
            lock.release()
            if created and os.path.isdir(cfg.output_dir) and not os.listdir(cfg.output_dir):
                os.rmdir(cfg.output_dir)   # a start refused before it wrote anything leaves no directory


def _train(run: Run, state: dict | None, progress: bool, desc: str, loggers: list | None) -> TrainResult:
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    # Data, tokenizers and both checkpoints are checked before the run directory is touched: a start refused
    # for any of them leaves nothing behind (no config.json that would make the corrected retry need
    # --overwrite, and under --overwrite the old run is still there).
    build_data(run)
    run.data_fingerprint = rundir.data_fingerprint(cfg.data, run.dataset.index)
    if state is not None:
        _check_data(run, state)
    build_student(run)
    build_teacher(run)
    _barrier(run)   # every rank has looked at the directory before rank 0 changes it
    if run.main:
        if cfg.resume and state is None:
            print(f"{cfg.output_dir}: no run to resume (no checkpoint/): starting at step 0")
        rundir.prepare_run_dir(cfg)
    _barrier(run)   # resume reads the checkpoint where rank 0 may have just put it back
    build_optimizer(run)
    resume(run, state)
    del state
    with _StopOnSignal() as stop:   # before the stream forks its workers: they inherit the handler
        run.batches = build_loader(cfg, run.dataset, run.rank, run.world, run.data_state)
        run.student.train()
        if run.main:
            run.loggers = make_loggers(cfg.output_dir, cfg.report_to, run.step) + list(loggers or [])
        try:
            signum = _loop(run, stop, progress, desc)
        finally:
            run.batches.close()
            for logger in run.loggers:
                logger.close()
        if signum:
            _stopped(run, signum)
        if run.batches.skipped and run.main:
            print(f"data: skipped {sum(run.batches.skipped.values())} bad records: {dict(run.batches.skipped)}")
        final_dir = save_final(run)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(cfg.output_dir, final_dir, run.total_steps, run.history, dict(run.batches.skipped))


def _loop(run: Run, stop: _StopOnSignal, progress: bool, desc: str) -> int:
    """Optimizer steps up to ``run.total_steps`` with their checkpoints (every ``save_every`` steps and every
    ``save_every_minutes``); returns the number of the signal that stopped it early (after a checkpoint), 0 when
    it ran to the end."""
    cfg = run.cfg
    last_save = _clock()
    bar = tqdm(range(run.step, run.total_steps), initial=run.step, total=run.total_steps, desc=desc,
               disable=not (progress and run.main))
    with bar:
        for _ in bar:
            row = train_step(run)
            log_step(run, row)
            if cfg.kd or cfg.rcka:
                bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", gdkd=f"{row['gdkd']:.3f}",
                                rcka="-" if row["rcka"] is None else f"{row['rcka']:.3f}",
                                beta=f"{row['beta']:.3f}", gate=f"{row['gate']:.2f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
            else:   # no teacher: beta, gate and the distillation terms take no part, showing them would mislead
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if run.step == run.total_steps:
                break   # the last step's checkpoint is written once, by save_final
            timed = bool(cfg.save_every_minutes) and _clock() - last_save >= 60 * cfg.save_every_minutes
            signum, timed = _agree(run, stop.signum, timed)
            if signum or timed or (cfg.save_every and run.step % cfg.save_every == 0):
                save_checkpoint(run)
                last_save = _clock()
            if signum:
                return signum
    return 0


_clock = time.monotonic   # the wall clock of save_every_minutes (a test may replace it)


def _agree(run: Run, signum: int, timed: bool) -> tuple[int, bool]:
    """Every rank's view after a step, made one: stop if any rank was signalled (the highest signal number),
    checkpoint if any rank's clock says it is time. One small all-reduce per step under torchrun."""
    if run.world == 1:
        return signum, timed
    flags = torch.tensor([signum, int(timed)], dtype=torch.int64, device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])


def _stopped(run: Run, signum: int) -> None:
    """Leave after the checkpoint a signal asked for: one line on rank 0's stderr, exit code 128 + signum."""
    name = signal.Signals(signum).name
    message = (f"grace train: stopped by {name} after step {run.step} of {run.total_steps}; checkpoint written to "
               f"{run.checkpoint_path}; continue with the same command and --resume")
    if run.main:
        print(message, file=sys.stderr, flush=True)
    if run.world > 1:
        dist.destroy_process_group()
    raise TrainingStopped(signum, run.step, message)


class _StopOnSignal:
    """While active (main thread only: Python delivers signals there), SIGTERM and SIGINT only set ``signum``;
    the loop checks it after each optimizer step. A second signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping now")
        self.signum = signum

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _check_data(run: Run, state: dict) -> None:
    """Refuse to resume on a data file other than the checkpoint's; under ``accept_data_change`` continue at
    the start of the next epoch of the new file, with a fresh order and skip list."""
    why = rundir.data_changed(state.get("data"), run.data_fingerprint)
    if why is None:
        return
    if not run.cfg.accept_data_change:
        raise GraceError(f"cannot resume: {run.cfg.data} changed since the checkpoint ({why}), so the saved epoch "
                         "order and skip list refer to other records; pass --accept-data-change to continue on it "
                         "from the next epoch, or --overwrite to start again")
    old_records = state["data"]["records"]
    epoch = state["data_position"]["position"] // old_records
    state["data_position"] = {"position": (epoch + 1) * len(run.dataset), "bad": {}}
    if run.main:
        print(f"data: {run.cfg.data} changed ({why}): continuing from epoch {epoch + 2} of the new file")
