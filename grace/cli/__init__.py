"""The ``grace`` command line. Each subcommand's parser lives in a module of this package (``grace.cli.train``,
``.model``, ``.info``, ``.demo``, ``.plan``, ``.lsq``) and registers itself here with an ``add_parser(subparsers)``
function that sets ``func`` on its parser; the work itself is done by the modules those functions call.

Errors: an expected failure (:data:`EXPECTED_ERRORS`: a bad option or input, a file that is missing or
cannot be read, a refused overwrite) is printed as one line, ``grace <command>: error: <message>``, on
stderr with exit code 2, never a traceback; ``--debug`` (before or after the command) re-raises it.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from grace.errors import GraceError
from grace.io import one_line

# ValueError covers GraceError and the library's argument checks; OSError covers files that are missing,
# unreadable, or in the way (FileNotFoundError, NotADirectoryError, PermissionError, ...).
EXPECTED_ERRORS = (GraceError, ValueError, OSError)
# Modules that define add_parser(subparsers); each adds one or more subcommands.
COMMAND_MODULES = [
    "grace.cli.info",
    "grace.cli.lsq",
    "grace.cli.train",
    "grace.cli.model",
    "grace.cli.demo",
    "grace.cli.plan",
]


class HelpFormatter(argparse.HelpFormatter):
    """Every subcommand's help: an option's default is shown after its help unless the help already states it,
    and a required option says so (argparse only drops its brackets in the usage line)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} [required]".strip()
        shown = action.default not in (None, argparse.SUPPRESS, False, "") and "default" not in text
        if shown and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)):
            text = f"{text} (default: %(default)s)".strip()
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grace", description="GRACE: INT4 distillation of VLMs")
    debug_help = "show the traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    for command in sub.choices.values():   # SUPPRESS: absent after the command, the top-level value stands
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        command.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (2 for an expected error, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        print(f"grace {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2

