"""``grace info``: what this installation can run (backends, extension, devices) and which route each
checkpoint format the loader reads takes here."""

import json

import grace_kernels


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print the available backends and devices, and the route of each checkpoint "
                                    "format")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.schemes import serving_routes

    print(json.dumps({**grace_kernels.describe(), "routes": serving_routes()}, indent=1, default=str))
    return 0
