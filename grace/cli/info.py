"""``grace info``: what this installation can run (backends, extension, devices)."""

import json

import grace_kernels


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print the available backends and devices")
    p.set_defaults(func=_main)


def _main(args) -> int:
    print(json.dumps(grace_kernels.describe(), indent=1, default=str))
    return 0
