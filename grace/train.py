"""The GRACE training loop (single process).

Teacher frozen in eval mode; student's vision tower frozen, its language backbone made
quantization-aware (QuantLinear), weights and log-scales trained jointly with AdamW (separate
learning rate for the scales), cosine schedule with warmup, gradient accumulation and clipping, the
adaptive beta controller updated once per optimizer step from that step's mean GDKD.

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

import torch
from tqdm.auto import tqdm

from grace.config import TrainConfig
from grace.controller import AdaptiveIBController
from grace.data import ConversationDataset, collate, load_records
from grace.families import check_pair, family_of
from grace.objective import grace_objective
from grace.quantize import quantize_model


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: list[dict]
    skipped: dict


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


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


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    cfg.validate()
    from transformers import AutoConfig, AutoProcessor

    use_teacher = cfg.kd or cfg.rcka
    s_conf = AutoConfig.from_pretrained(cfg.student)
    family = check_pair(AutoConfig.from_pretrained(cfg.teacher), s_conf) if use_teacher else family_of(s_conf)
    os.makedirs(cfg.output_dir, exist_ok=True)
    cfg.to_json(os.path.join(cfg.output_dir, "config.json"))
    dev = _device(cfg.device)
    torch.manual_seed(cfg.seed)

    processor = AutoProcessor.from_pretrained(cfg.student)
    dataset = ConversationDataset(load_records(cfg.data), processor, cfg.image_folder, cfg.max_length)
    if dataset.skipped:
        print(f"data: kept {len(dataset)} samples, skipped {sum(dataset.skipped.values())}: {dict(dataset.skipped)}")
    if len(dataset) == 0:
        raise ValueError(f"no usable sample in {cfg.data}")
    pad_id = processor.tokenizer.pad_token_id

    half = torch.bfloat16 if (cfg.bf16 and dev.type == "cuda") else torch.float32
    student = _load_model(cfg.student, torch.float32, dev)
    family.vision_tower(student).requires_grad_(False).to(half)
    if cfg.bits is not None:
        quantize_model(student, bits=cfg.bits, group_size=cfg.group_size, method=cfg.init_method,
                       scale_dtype=getattr(torch, cfg.scale_dtype) if cfg.scale_dtype else None)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    teacher = _load_model(cfg.teacher, half, dev).eval().requires_grad_(False) if use_teacher else None

    scales = [p for n, p in student.named_parameters() if p.requires_grad and n.endswith("log_scale")]
    weights = [p for n, p in student.named_parameters() if p.requires_grad and not n.endswith("log_scale")]
    opt = torch.optim.AdamW([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": scales, "lr": cfg.scale_lr or cfg.lr,
         "weight_decay": cfg.weight_decay if cfg.scale_weight_decay is None else cfg.scale_weight_decay},
    ])
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or cfg.epochs * math.ceil(len(dataset) / per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    controller = AdaptiveIBController(cfg.tau, cfg.eta, cfg.beta_init, cfg.beta_min, cfg.beta_max, cfg.ema_decay,
                                      adaptive=cfg.adaptive_beta)
    batches = _Batches(len(dataset), cfg.batch_size, cfg.seed)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        controller.load_state_dict(state["controller"])
        batches = _Batches(len(dataset), cfg.batch_size, cfg.seed, *state["data_position"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start = state["step"]
        _truncate_metrics(metrics_path, start)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    def checkpoint(step: int) -> None:
        _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "controller": controller.state_dict(), "data_position": (batches.epoch, batches.offset),
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None, "step": step,
                      "config": dataclasses.asdict(cfg)}, ckpt_path)

    student.train()
    history = _read_metrics(metrics_path)
    bar = tqdm(range(start, total), initial=start, total=total, desc="GRACE", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        kd_scale = min(1.0, (step + 1) / cfg.kd_warmup_steps) if cfg.kd_warmup_steps else 1.0
        sums = {"loss": 0.0, "ce": 0.0, "gdkd": 0.0, "rcka": 0.0, "gate": 0.0}
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(dev) for k, v in collate([dataset[i] for i in batches.next()], pad_id).items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(half)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda"):
                parts = grace_objective(student, teacher, family, batch, beta=controller.beta, omega=cfg.omega,
                                        kd=cfg.kd, rcka=cfg.rcka, kd_scale=kd_scale, temperature=cfg.temperature,
                                        tckd_weight=cfg.tckd_weight, nckd_weight=cfg.nckd_weight, gate=cfg.gate,
                                        gate_temperature=cfg.gate_temperature, kd_type=cfg.kd_type)
            (parts.total / cfg.grad_accum).backward()
            for k, v in (("loss", parts.total), ("ce", parts.ce), ("gdkd", parts.gdkd), ("rcka", parts.rcka),
                         ("gate", parts.gate_mean)):
                sums[k] += float(v.detach()) / cfg.grad_accum
            tokens += parts.tokens
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
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", gdkd=f"{sums['gdkd']:.3f}",
                        rcka=f"{sums['rcka']:.3f}", beta=f"{controller.beta:.3f}", gate=f"{sums['gate']:.2f}",
                        tok_s=f"{tokens / dt:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            checkpoint(step + 1)
    checkpoint(total)
    final_dir = _save_final(student, processor, cfg)
    from grace.plots import plot_controller

    plot_controller(history, os.path.join(cfg.output_dir, "controller.png"))
    return TrainResult(cfg.output_dir, final_dir, total, history, dict(dataset.skipped))


def _save_final(student, processor, cfg: TrainConfig) -> str:
    final = os.path.join(cfg.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    _save_atomic(student.state_dict(), os.path.join(final, "student_state.pt"))
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
