"""Run by tests/test_train_memory.py under ``torchrun --nproc_per_node=2`` (gloo, CPU); not a test module.

Usage: train_memory_worker.py TEACHER STUDENT DATA IMAGES OUT_DIR

Every rank builds the student three ways with the trainer's own stages: FSDP-sharded (2 ranks), sharded with
gradient checkpointing, and unsharded (the single-process path, as a reference), runs one forward and
backward of the GRACE objective with bf16 autocast on the same 4 samples (2 per rank when sharded), and
writes what it measured to OUT_DIR/rank<r>.json; the test asserts on those numbers.
"""

import dataclasses
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from grace import TrainConfig
from grace.data import ConversationDataset, collate, load_records
from grace.families import family_of
from grace.objective import LossConfig, teacher_outputs

train_mod = importlib.import_module("grace.train")


def main(teacher_dir, student_dir, data, images, out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loads = []   # (path, dtype of the loaded parameters) for every checkpoint this rank reads whole
    real_load = train_mod.load_pretrained

    def recording_load(path, dtype, device, **kw):
        model = real_load(path, dtype, device, **kw)
        loads.append((path, sorted({str(p.dtype) for p in model.parameters()})))
        return model

    train_mod.load_pretrained = recording_load
    cfg = TrainConfig(teacher=teacher_dir, student=student_dir, data=data, image_folder=images,
                      mixed_precision="bf16", bits=4, group_size=128)
    family = family_of(__import__("transformers").AutoConfig.from_pretrained(student_dir))

    def student(world_size, **kw):
        run_cfg = dataclasses.replace(cfg, **kw)
        run = train_mod.Run(run_cfg, torch.device("cpu"), rank, world_size, family, frozen_dtype=torch.float32,
                            compute_dtype=run_cfg.compute_dtype("cpu"))
        train_mod.build_student(run)
        run.student.train()
        return run

    sharded = student(world)
    loads_sharded = list(loads)
    checkpointed = student(world, gradient_checkpointing=True)
    single = student(1)

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(student_dir)
    ds = ConversationDataset(load_records(data), processor, images, 2048)
    full_batch = collate([ds[i] for i in range(4)], processor.tokenizer.pad_token_id)
    half = collate([ds[i] for i in range(2 * rank, 2 * rank + 2)], processor.tokenizer.pad_token_id)
    teacher = real_load(teacher_dir, torch.float32, torch.device("cpu")).eval().requires_grad_(False)

    def step(run, batch):
        with torch.autocast("cpu", dtype=run.compute_dtype, enabled=run.compute_dtype != torch.float32):
            t_out = teacher_outputs(teacher, family, batch, kd=True, rcka=True)
            parts = run.objective(family, batch, t_out, LossConfig(omega=1.5, kd=True, rcka=True), beta=0.7)
        parts.total.backward()
        loss = parts.total.detach().float().reshape(1)
        if run.world > 1:
            dist.all_reduce(loss)
            loss /= run.world
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float()
                 for n, p in run.student.named_parameters() if p.requires_grad}
        return float(loss), grads

    sharded_state = get_model_state_dict(sharded.student, options=StateDictOptions(full_state_dict=True))
    single_state = single.student.state_dict()
    trainable = {n: p for n, p in sharded.student.named_parameters() if p.requires_grad}
    frozen = [p for p in sharded.student.parameters() if not p.requires_grad]
    loss_d, grads_d = step(sharded, half)
    loss_c, grads_c = step(checkpointed, half)
    loss_s, grads_s = step(single, full_batch)
    fp32 = student(1, mixed_precision="none")
    loss_fp32, _ = step(fp32, full_batch)

    def rel(a, b):
        return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)

    result = {
        "loads_sharded": loads_sharded,
        "trainable_all_dtensor": all(isinstance(p, DTensor) for p in trainable.values()),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable.values()}),
        "local_numel": sum(p.to_local().numel() for p in trainable.values()),
        "full_numel": sum(p.numel() for p in trainable.values()),
        "frozen_dtypes": sorted({str(p.dtype) for p in frozen}),
        "state_keys_equal": sharded_state.keys() == single_state.keys(),
        "state_max_abs_diff": max(float((sharded_state[k].float() - single_state[k].float()).abs().max())
                                  for k in single_state),
        "buffers_equal": all(torch.equal(b, dict(single.student.named_buffers())[n])
                             for n, b in sharded.student.named_buffers()),
        "log_scale_dtypes": sorted({str(v.dtype) for k, v in sharded_state.items() if k.endswith("log_scale")}),
        "loss_sharded": loss_d, "loss_single": loss_s, "loss_checkpointed": loss_c, "loss_fp32": loss_fp32,
        "grad_rel_sharded_vs_single": rel(grads_d, grads_s),
        "grad_rel_checkpointed_vs_plain": rel(grads_c, grads_d),
        "grad_keys_equal": grads_d.keys() == grads_s.keys() == grads_c.keys(),
        "tied_embeddings": [r.student.get_output_embeddings().weight is r.student.get_input_embeddings().weight
                            for r in (sharded, single)],
        "checkpointing_on": [bool(getattr(r.student, "is_gradient_checkpointing", False))
                             for r in (sharded, checkpointed)],
    }
    print(f"rank {rank}: {result}", flush=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
