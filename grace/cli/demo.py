"""``grace demo``: end-to-end GRACE on a synthetic task (the stages: :mod:`grace.demo.run`)."""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end GRACE on a synthetic VQA task: teacher, student, the paper's "
                                    "comparison rows (FP32 controls, RTN, QAT, QAT + KD, GRACE, INT8 GRACE) over 3 "
                                    "seeds, verdicts with paired-bootstrap intervals on test and validation")
    p.add_argument("--out", default="grace-demo", help="output directory (default: grace-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not the method")
    p.add_argument("--ablation", action="store_true",
                   help="also the ladder of GRACE's parts (QAT, + DKD, + gate, + RCKA, + controller) as its own table "
                        "and ablation.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the task and the FP32 pretraining (default 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.demo.run import FULL, QUICK, run_demo

    settings = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    run_demo(args.out, settings, ablation=args.ablation, progress=args.progress)
    return 0
