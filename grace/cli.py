"""The ``grace`` command line. Each subcommand lives in its own module and registers itself here
with an ``add_parser(subparsers)`` function that sets ``func`` on its parser."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Modules that define add_parser(subparsers); each adds one or more subcommands.
COMMAND_MODULES = [
    "grace.cli_info",
    "grace.lsq_demo",
    "grace.cli_train",
    "grace.cli_model",
    "grace.demo",
    "grace.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grace", description="GRACE: INT4 distillation of VLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # configuration errors: one clear line, no traceback
        print(f"grace {args.command}: error: {e}", file=sys.stderr)
        return 2


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))
