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

Run directory:
    config.json        the TrainConfig of the run (ablation switches included)
    metrics.jsonl      one line per optimizer step
    checkpoint.pt      written every save_every steps and at the end, atomically (temp file + rename)
    final/             student state (weights + log-scales), quantization.json, model config, processor
    controller.png     beta and the EMA of GDKD against tau, and the losses, over steps
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from grace.config import TrainConfig
from grace.controller import AdaptiveIBController
from grace.data import ConversationDataset, collate, load_records
from grace.families import check_pair, family_of
from grace.objective import student_objective, teacher_outputs
from grace.quantize import quantize_model


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: list[dict]
    skipped: dict


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; a bare "cuda" is this rank's GPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _init_distributed(dev_type: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev_type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _shard_student(student, family) -> None:
    """FSDP2: one unit per decoder block, then the root. The frozen vision tower stays replicated (it has no
    gradients to reduce, its dtype differs from the backbone's, and transformers' hidden-state capture
    inside it does not survive FSDP's module wrapping). The loss is computed by ``student_objective``
    registered as a forward method of the root, so FSDP gathers the root's parameters (embeddings, LM
    head) around it and reduces their gradients after its backward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in family.decoder_layers(student):
        fully_shard(layer)
    fully_shard(student, ignored_params=set(family.vision_tower(student).parameters()))
    student.grace_objective = types.MethodType(student_objective, student)
    register_fsdp_forward_method(student, "grace_objective")


def _load_model(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)


def _schedule(total: int, warmup_ratio: float):
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a crash before this line leaves the previous checkpoint intact


class _Batches:
    """Deterministic micro-batch order: a permutation per epoch seeded by (seed, epoch); the position
    (epoch, offset) is all a checkpoint needs to continue exactly."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n, self.bs, self.seed, self.epoch, self.offset = n, batch_size, seed, epoch, offset
        self._order = self._perm()

    def _perm(self):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))

    def next(self) -> list[int]:
        if self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.offset:self.offset + self.bs].tolist()
        self.offset += self.bs
        return idx


def train(cfg: TrainConfig, *, progress: bool = True, desc: str = "GRACE") -> TrainResult:
    """Run ``cfg`` to its last step (see the module docstring); ``desc`` labels the progress bar."""
    cfg.validate()
    from transformers import AutoConfig, AutoProcessor

    use_teacher = cfg.kd or cfg.rcka
    s_conf = AutoConfig.from_pretrained(cfg.student)
    family = check_pair(AutoConfig.from_pretrained(cfg.teacher), s_conf) if use_teacher else family_of(s_conf)
    dev = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = _init_distributed(dev.type)
    main = rank == 0
    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.to_json(os.path.join(cfg.output_dir, "config.json"))
    torch.manual_seed(cfg.seed)

    processor = AutoProcessor.from_pretrained(cfg.student)
    dataset = ConversationDataset(load_records(cfg.data), processor, cfg.image_folder, cfg.max_length)
    if dataset.skipped and main:
        print(f"data: kept {len(dataset)} samples, skipped {sum(dataset.skipped.values())}: {dict(dataset.skipped)}")
    if len(dataset) == 0:
        raise ValueError(f"no usable sample in {cfg.data}")
    pad_id = processor.tokenizer.pad_token_id

    half = torch.bfloat16 if (cfg.bf16 and dev.type == "cuda") else torch.float32
    student = _load_model(cfg.student, torch.float32, dev)
    if cfg.freeze_vision:
        family.vision_tower(student).requires_grad_(False).to(half)
    if cfg.bits is not None:
        quantize_model(student, bits=cfg.bits, group_size=cfg.group_size, method=cfg.init_method,
                       scale_dtype=getattr(torch, cfg.scale_dtype) if cfg.scale_dtype else None)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if world > 1:
        _shard_student(student, family)
    objective = student.grace_objective if world > 1 else types.MethodType(student_objective, student)
    teacher = _load_model(cfg.teacher, half, dev).eval().requires_grad_(False) if use_teacher else None

    scales = [p for n, p in student.named_parameters() if p.requires_grad and n.endswith("log_scale")]
    weights = [p for n, p in student.named_parameters() if p.requires_grad and not n.endswith("log_scale")]
    opt = torch.optim.AdamW([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": scales, "lr": cfg.scale_lr or cfg.lr,
         "weight_decay": cfg.weight_decay if cfg.scale_weight_decay is None else cfg.scale_weight_decay},
    ])
    per_step = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps or cfg.epochs * math.ceil(len(dataset) / per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    controller = AdaptiveIBController(cfg.tau, cfg.eta, cfg.beta_init, cfg.beta_min, cfg.beta_max, cfg.ema_decay,
                                      adaptive=cfg.adaptive_beta)
    batches = _Batches(len(dataset), cfg.batch_size * world, cfg.seed)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        set_state_dict(student, opt, model_state_dict=state["student"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        controller.load_state_dict(state["controller"])
        batches = _Batches(len(dataset), cfg.batch_size * world, cfg.seed, *state["data_position"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start = state["step"]
        if main:
            _truncate_metrics(metrics_path, start)
    elif main and os.path.exists(metrics_path):
        os.remove(metrics_path)

    def checkpoint(step: int) -> dict:
        # Full (unsharded) state dicts keyed by parameter name: a checkpoint written by P ranks resumes
        # on any number of ranks, single process included. Every rank takes part in the gather.
        model_sd, optim_sd = get_state_dict(student, opt, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
        if main:
            _save_atomic({"student": model_sd, "optimizer": optim_sd, "scheduler": sched.state_dict(),
                          "controller": controller.state_dict(), "data_position": (batches.epoch, batches.offset),
                          "rng_cpu": torch.get_rng_state(),
                          "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None, "step": step,
                          "world_size": world, "config": dataclasses.asdict(cfg)}, ckpt_path)
        if world > 1:
            dist.barrier()
        return model_sd

    student.train()
    history = _read_metrics(metrics_path) if main else []
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, disable=not (progress and main))
    for step in bar:
        t0 = time.perf_counter()
        kd_scale = min(1.0, (step + 1) / cfg.kd_warmup_steps) if cfg.kd_warmup_steps else 1.0
        sums = {"loss": 0.0, "ce": 0.0, "gdkd": 0.0, "rcka": 0.0, "gate": 0.0}
        tokens = 0
        for micro in range(cfg.grad_accum):
            ids = batches.next()[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            batch = {k: v.to(dev) for k, v in collate([dataset[i] for i in ids], pad_id).items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(half)
            if world > 1:   # reduce-scatter gradients once per optimizer step, not per micro-batch
                student.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda"):
                t_out = teacher_outputs(teacher, family, batch, kd=cfg.kd, rcka=cfg.rcka)
                parts = objective(family, batch, t_out, beta=controller.beta, omega=cfg.omega, kd=cfg.kd,
                                  rcka=cfg.rcka, kd_scale=kd_scale, temperature=cfg.temperature,
                                  tckd_weight=cfg.tckd_weight, nckd_weight=cfg.nckd_weight, gate=cfg.gate,
                                  gate_temperature=cfg.gate_temperature, kd_type=cfg.kd_type)
            (parts.total / cfg.grad_accum).backward()
            for k, v in (("loss", parts.total), ("ce", parts.ce), ("gdkd", parts.gdkd), ("rcka", parts.rcka),
                         ("gate", parts.gate_mean)):
                sums[k] += float(v.detach()) / cfg.grad_accum
            tokens += parts.tokens
        if world > 1:   # every rank logs, and feeds the controller, the mean over ranks
            packed = torch.tensor([*sums.values(), tokens], dtype=torch.float64, device=dev)
            dist.all_reduce(packed)
            sums = {k: float(v) / world for k, v in zip(sums, packed[:-1].tolist(), strict=True)}
            tokens = int(packed[-1])
        if not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {sums}; the last checkpoint is intact")
        torch.nn.utils.clip_grad_norm_(weights + scales, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.kd:
            controller.update(sums["gdkd"])
        dt = time.perf_counter() - t0
        row = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "beta": controller.beta,
               "ema_gdkd": controller.ema, "tau": cfg.tau, "lr": sched.get_last_lr()[0], "tokens": tokens,
               "tokens_per_s": round(tokens / dt, 1)}
        history.append(row)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if use_teacher:
            bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", gdkd=f"{sums['gdkd']:.3f}",
                            rcka=f"{sums['rcka']:.3f}", beta=f"{controller.beta:.3f}", gate=f"{sums['gate']:.2f}",
                            tok_s=f"{tokens / dt:.0f}")
        else:   # no teacher: beta, gate and the distillation terms do not take part, showing them would mislead
            bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{tokens / dt:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            checkpoint(step + 1)   # the last step's checkpoint is written once, below
    final_state = checkpoint(total)
    final_dir = os.path.join(cfg.output_dir, "final")
    if main:
        _save_final(student, final_state, processor, cfg)
        from grace.plots import plot_controller

        plot_controller(history, os.path.join(cfg.output_dir, "controller.png"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(cfg.output_dir, final_dir, total, history, dict(dataset.skipped))


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
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a crash between the two)."""
    rows = [r for r in _read_metrics(path) if r["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
