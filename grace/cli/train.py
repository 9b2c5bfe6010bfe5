"""``grace train``: every TrainConfig field is a flag (``--max-steps 10``, ``--no-gate``, ``--kd-type kl``);
``--preset released`` starts from the authors' released settings instead of the paper's."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from grace.config import PRESETS, TrainConfig


def _parse(base):
    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="GRACE quantization-aware distillation of a student VLM")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default="paper")
        elif kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            p.add_argument(flag, dest=f.name, type=_parse(base), default=None, help=f"(default {f.default})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "preset" and getattr(args, f.name) is not None}
    result = train(TrainConfig.from_preset(args.preset, **overrides), progress=args.progress)
    print(f"done: {result.steps} steps; student in {result.final_dir}; plot in {result.run_dir}/controller.png")
    return 0
