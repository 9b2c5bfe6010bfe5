"""``grace lsq-demo``: INT4 LSQ on one LLM-shaped layer (the experiment: :mod:`grace.demo.lsq`)."""

from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser("lsq-demo", help="INT4 LSQ on one LLM-shaped layer: RTN vs LSQ init vs trained (CPU, seconds)")
    p.add_argument("--out", default="grace-demo", help="directory for lsq_demo.json (default: grace-demo)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps of the weights and log-scales through the fake quantizer (0: init only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer's weights and activations")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from grace.demo.lsq import run_lsq_demo

    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    s = run_lsq_demo(steps=args.steps, seed=args.seed, out_dir=args.out)
    print(f"\nINT4 (group 128) output SQNR of a {s['layer'][0]}x{s['layer'][1]} layer on held-out activations:")
    print("| method | SQNR (dB) |\n|---|---|")
    for name, value in s["output_sqnr_db"].items():
        print(f"| {name} | {value:.2f} |")
    print(f"\nwritten: {os.path.join(args.out, 'lsq_demo.json')}")
    return 0
