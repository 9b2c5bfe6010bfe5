"""``grace plan``: the per-GPU memory of a GRACE run and whether it fits (the model: :mod:`grace.plan`)."""

from __future__ import annotations

import argparse

from grace.config import TrainConfig
from grace.plan import ARCHITECTURES, STANDARD_PAIRS


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of a GRACE run on real architectures, and whether it fits",
                       description="Without --teacher/--student: the standard pairs " +
                       ", ".join(f"{a} -> {b}" for a, b in STANDARD_PAIRS) +
                       f". Known architectures: {', '.join(ARCHITECTURES)}; or a local checkpoint path.")
    p.add_argument("--teacher", help="architecture name or local checkpoint (directory or config.json)")
    p.add_argument("--student", help="architecture name or local checkpoint (directory or config.json)")
    p.add_argument("--world-size", type=int, default=8, help="GPUs (ranks) the run is spread over")
    # The options a run has too default to grace train's (TrainConfig): the plan is of the run the same
    # options start.
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="per rank")
    p.add_argument("--seq-len", type=int, default=TrainConfig.max_length,
                   help="tokens per sample (as grace train's --max-length)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=TrainConfig.gradient_checkpointing,
                   help="plan with the student's activations recomputed in the backward pass")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (e.g. 80GiB, 141GB)")
    p.add_argument("--master-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the student's trained weights and optimizer states")
    p.add_argument("--group-size", type=int, default=TrainConfig.group_size, help="weights per quantization scale")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory left unplanned")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.plan import plan

    if (args.teacher is None) != (args.student is None):
        raise ValueError("give both --teacher and --student, or neither (the standard pairs)")
    pairs = [(args.teacher, args.student)] if args.teacher else list(STANDARD_PAIRS)
    for i, (teacher, student) in enumerate(pairs):
        result = plan(teacher, student, world_size=args.world_size, batch_size=args.batch_size, seq_len=args.seq_len,
                      gradient_checkpointing=args.gradient_checkpointing, gpu_memory=args.gpu_memory,
                      master_dtype=args.master_dtype, group_size=args.group_size, headroom=args.headroom)
        print(("\n" if i else "") + result.format())
    return 0
