"""``grace info``: what this installation can run (backends, extension, devices)."""

import grace_kernels
from grace.cli import print_json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print the available backends and devices")
    p.set_defaults(func=lambda args: print_json(grace_kernels.describe()))
