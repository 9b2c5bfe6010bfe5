"""``grace train``: every TrainConfig field is a flag (``--max-steps 10``, ``--no-gate``, ``--kd-type kl``,
``--bits none``), documented by the field's own docstring; ``--preset released`` starts from the authors'
released settings instead of the paper's."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from grace.config import FIELD_CHOICES, PRESETS, TrainConfig, field_docs

# Required for every run (the teacher only when it is used: validate() says so). Not argparse-required, so
# that the parser's error and the config's are one message listing every missing option.
REQUIRED = ("student", "data")


def _value_type(kind):
    """The parser of one option's text: its field's type, "none" for None where the field allows None."""
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((t for t in args if t is not type(None)), kind)

    def parse(text: str):
        if text.lower() == "none":
            if optional:
                return None
            raise argparse.ArgumentTypeError("none is not allowed here")
        return base(text)

    parse.__name__ = base.__name__   # argparse names the type in its "invalid <type> value" message
    return parse


def _show(value) -> str:
    return "none" if value is None else str(value)


def _help(field: dataclasses.Field, doc: str) -> str:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if field.name in REQUIRED:
        return f"{doc} [required]"
    released = PRESETS["released"].get(field.name, default)
    tails = ([] if default == "" else [f"default: {_show(default)}"]) + \
        ([] if released == default else [f"--preset released: {_show(released)}"])
    # argparse formats help with %: a literal percent sign must be doubled
    return (f"{doc} ({'; '.join(tails)})" if tails else doc).replace("%", "%%")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="GRACE quantization-aware distillation of a student VLM",
                       description="Train an INT4 (or INT8, or full-precision) student from a frozen teacher with "
                                   "GRACE's loss. Every option below is a TrainConfig field; an option not given "
                                   "keeps the preset's value.")
    hints, docs = typing.get_type_hints(TrainConfig), field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, help_ = hints[f.name], _help(f, docs[f.name])
        # SUPPRESS: an option that is not given is absent from the namespace, so an explicit "none" (None) is
        # told apart from "not given" and reaches the config.
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        choices = FIELD_CHOICES.get(f.name)
        metavar = "{" + ",".join(map(_show, choices)) + "}" if choices else None
        p.add_argument(flag, type=_value_type(kind), choices=choices, metavar=metavar, **common)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.train import train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    preset = given.pop("preset", "paper")
    result = train(TrainConfig.from_preset(preset, **given), progress=args.progress)
    print(f"done: {result.steps} steps; student in {result.final_dir}; plot in {result.run_dir}/controller.png")
    return 0
