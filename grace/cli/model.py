"""``grace export``, ``grace eval`` and ``grace generate``: from a training run to a served model."""

from __future__ import annotations

import json
import os

from grace.config import field_docs

DEVICE_HELP = field_docs()["device"]


def _model_arguments(p, *, max_new_tokens: int) -> None:
    """What eval and generate share: the model to load, where, and how long an answer may be."""
    p.add_argument("model_dir", help="an INT4 / INT8 export, a Hugging Face checkpoint, or a training run "
                                     "(finished: final/; unfinished: its latest checkpoint/)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest answer generated, in tokens")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained run as a Hugging Face checkpoint: compressed-tensors "
                                      "pack-quantized for INT4 / INT8 runs, plain for full-precision ones")
    p.add_argument("run_dir", help="a finished `grace train` run (or its final/ directory); with --step, any run")
    p.add_argument("out_dir", help="the model directory to create")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tensors kept in full precision and of the quantized layers' scales "
                        "(default: float32, exactly as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--step", type=int, default=None,
                   help="export the run's checkpoint/ of this step instead of final/ (an unfinished run)")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="greedy-decoding accuracy, weight bytes, peak memory and decode speed of a model")
    _model_arguments(p, max_new_tokens=8)
    p.add_argument("--data", required=True, help="LLaVA-format conversation JSON with the answers")
    p.add_argument("--image-folder", default=None, help="image root (default: the JSON's directory)")
    p.add_argument("--batch-size", type=int, default=16, help="questions decoded together")
    p.add_argument("--json", dest="json_out", default=None,
                   help="also write the result, with every prediction, to this JSON file")
    p.add_argument("--verbose", action="store_true", help="also print the prediction for every question")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="greedy generation from one image and prompt")
    _model_arguments(p, max_new_tokens=32)
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--prompt", required=True, help="the user's question (the chat template adds the image)")
    p.set_defaults(func=_generate)


def _load(model_dir: str, device: str):
    from grace.load import load_model

    model, processor = load_model(model_dir, device=device)
    if processor is None:
        raise ValueError(f"{model_dir} has no processor/tokenizer files")
    return model, processor


def _export(args) -> int:
    from grace.export import export_run
    from grace.io import read_json

    out = export_run(args.run_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, step=args.step)
    qc = read_json(os.path.join(out, "config.json")).get("quantization_config")
    bits = qc["config_groups"]["group_0"]["weights"]["num_bits"] if qc else None
    print(f"{f'INT{bits} compressed-tensors' if bits else 'full-precision'} model written to {out}")
    return 0


def _eval(args) -> int:
    from grace.data import load_records
    from grace.device import resolve_device
    from grace.evaluate import evaluate

    if not os.path.isfile(args.data):
        raise ValueError(f"data file not found: {args.data!r}")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise ValueError(f"--image-folder {args.image_folder!r} is not a directory")
    records = load_records(args.data)   # before the model: a bad data file fails fast
    device = resolve_device(args.device)
    model, processor = _load(args.model_dir, device)
    folder = args.image_folder or os.path.dirname(os.path.abspath(args.data))
    result = evaluate(model, processor, records, folder, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, device=device)
    print(json.dumps(result.to_dict(predictions=args.verbose), indent=1, default=str))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result.to_dict(), f, indent=1, default=str)
    return 0


def _generate(args) -> int:
    from grace.device import resolve_device
    from grace.evaluate import generate

    if not os.path.isfile(args.image):
        raise ValueError(f"image not found: {args.image!r}")
    model, processor = _load(args.model_dir, resolve_device(args.device))
    print(generate(model, processor, args.image, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0
