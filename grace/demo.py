"""``grace demo``: the whole GRACE method, end to end, on a synthetic task small enough for a laptop CPU.

1. Writes a synthetic visual question-answering task (``grace.synthetic``: colored shapes; questions
   about color, shape, count and position) in the LLaVA conversation format.
2. Trains, from scratch and in full precision, a tiny LLaVA-1.5 teacher (hidden 256, 3 layers) and a
   smaller student (hidden 128, 2 layers) on it, their random vision towers frozen. Both are cached: a
   second run reuses them.
3. Makes INT4 (group 128) students four ways, as in the paper's tables: round-to-nearest PTQ of the
   student, QAT only, QAT + naive KD (plain KL, no gate, no RCKA, fixed beta), and full GRACE.
4. Evaluates the teacher, the full-precision student and the four INT4 students with greedy decoding
   on the held-out split; the QAT students are first exported in the compressed-tensors pack-quantized
   format and loaded back as real INT4 (W4A16Linear) models, so what is scored is what would be served.
5. Prints the table, writes it as Markdown and JSON, saves the controller plot of the GRACE run, and
   answers one held-out question with the exported INT4 GRACE student.

The numbers are whatever this run measures; on a task this small the methods can tie or swap places.
Every stage writes into ``--out`` and is skipped when its result is already there with the same
settings, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import torch

from grace.config import TrainConfig

QUESTION_TYPES = ("color", "shape", "count", "position")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    n_train: int = 3000
    n_eval: int = 200
    teacher_steps: int = 2000
    student_steps: int = 1500
    qat_steps: int = 300
    batch_size: int = 32
    pretrain_lr: float = 1e-3
    qat_lr: float = 5e-4
    eval_batch_size: int = 50
    seed: int = 0


FULL = DemoSettings()
# CI's shortened run: every stage and file, a handful of steps (accuracies are meaningless there).
QUICK = DemoSettings(n_train=48, n_eval=12, teacher_steps=3, student_steps=3, qat_steps=2, batch_size=8,
                     eval_batch_size=12)


def _log(msg: str) -> None:
    print(f"[grace demo] {msg}", flush=True)


def _train_cached(cfg: TrainConfig, what: str, progress: bool) -> str:
    """Train unless ``cfg.output_dir`` already holds a finished run of exactly this configuration; a run
    of this configuration that was interrupted resumes from its last checkpoint."""
    from grace.train import train

    cfg = dataclasses.replace(cfg, resume=True)
    final = os.path.join(cfg.output_dir, "final")
    cfg_path = os.path.join(cfg.output_dir, "config.json")
    same = False
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            same = json.load(f) == json.loads(json.dumps(dataclasses.asdict(cfg)))
        if not same:   # a run with other settings: the demo owns its directories, start over
            shutil.rmtree(cfg.output_dir)
    if same and os.path.exists(os.path.join(final, "student_state.pt")):
        _log(f"{what}: cached in {cfg.output_dir}")
        return final
    _log(f"{what}: training ({cfg.max_steps} steps) -> {cfg.output_dir}")
    t0 = time.perf_counter()
    train(cfg, progress=progress)
    _log(f"{what}: {time.perf_counter() - t0:.0f} s")
    return final


def _pretrain_config(s: DemoSettings, init: str, data: dict, out: str, steps: int) -> TrainConfig:
    # Plain supervised training from scratch: no teacher, no quantization. The random vision tower stays
    # frozen as in GRACE itself: on this task its random patch features learn faster than a trained one.
    return TrainConfig(student=init, data=data["train"], image_folder=data["image_folder"], output_dir=out,
                       bits=None, kd=False, rcka=False, max_steps=steps,
                       batch_size=s.batch_size, grad_accum=1, lr=s.pretrain_lr, weight_decay=0.0, warmup_ratio=0.05,
                       save_every=max(1, steps // 4), seed=s.seed, device="cpu", max_length=128)


def _qat_configs(s: DemoSettings, teacher: str, student: str, data: dict, out: str) -> dict[str, TrainConfig]:
    base = TrainConfig(teacher=teacher, student=student, data=data["train"], image_folder=data["image_folder"],
                       bits=4, group_size=128, max_steps=s.qat_steps, batch_size=s.batch_size, grad_accum=1,
                       lr=s.qat_lr, warmup_ratio=0.05, save_every=max(1, s.qat_steps // 3), seed=s.seed,
                       device="cpu", max_length=128)
    return {   # the paper's ablation ladder (Tables 3 and 4); everything else at the paper's defaults
        "QAT only": dataclasses.replace(base, output_dir=os.path.join(out, "qat"), kd=False, rcka=False),
        "QAT + naive KD": dataclasses.replace(base, output_dir=os.path.join(out, "qat-kd"), kd_type="kl", gate=False,
                                              rcka=False, adaptive_beta=False),
        "GRACE": dataclasses.replace(base, output_dir=os.path.join(out, "grace")),
    }


def run_demo(out: str = "grace-demo", settings: DemoSettings = FULL, *, progress: bool = True) -> dict:
    """Run every stage; returns the results table as a dict (also written to ``out/results.json``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.evaluate import evaluate, generate
    from grace.export import export_run
    from grace.load import load_int4_model
    from grace.quantize import rtn_int4_model
    from grace.synthetic import VOCAB, write_task
    from grace.tiny import build_tiny_vlm

    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    os.makedirs(out, exist_ok=True)
    data = write_task(os.path.join(out, "data"), settings.n_train, settings.n_eval, seed=settings.seed)
    _log(f"task: {settings.n_train} training and {settings.n_eval} held-out questions in {data['image_folder']}")

    inits = os.path.join(out, "init")
    for size in ("teacher", "student"):
        if not os.path.exists(os.path.join(inits, size, "config.json")):
            build_tiny_vlm(os.path.join(inits, size), size=size, vocab_words=VOCAB, seed=settings.seed + 1)
    teacher = _train_cached(_pretrain_config(settings, os.path.join(inits, "teacher"), data,
                                             os.path.join(out, "teacher"), settings.teacher_steps), "teacher", progress)
    student = _train_cached(_pretrain_config(settings, os.path.join(inits, "student"), data,
                                             os.path.join(out, "student-fp32"), settings.student_steps),
                            "full-precision student", progress)
    exports = {}
    for name, cfg in _qat_configs(settings, teacher, student, data, out).items():
        run = os.path.dirname(_train_cached(cfg, f"INT4 student, {name}", progress))
        exports[name] = export_run(run, os.path.join(out, "int4", os.path.basename(run)), overwrite=True)

    with open(data["eval"]) as f:
        records = json.load(f)
    processor = AutoProcessor.from_pretrained(student)

    def fp_model(path):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    candidates = [("teacher (larger)", "FP32", lambda: fp_model(teacher)),
                  ("student", "FP32", lambda: fp_model(student)),
                  ("RTN (PTQ)", "INT4", lambda: rtn_int4_model(fp_model(student)))]
    candidates += [(name, "INT4", lambda p=path: load_int4_model(p)[0]) for name, path in exports.items()]
    rows = []
    for name, bits, load in candidates:
        model = load()
        res = evaluate(model, processor, records, data["image_folder"], batch_size=settings.eval_batch_size,
                       progress=progress)
        per_type = {t: res.per_type[t]["accuracy"] if t in res.per_type else None for t in QUESTION_TYPES}
        rows.append({"method": name, "bits": bits, **per_type,
                     "average": res.accuracy, "weight_mb": res.weight_bytes / 2**20,
                     "decode_tokens_per_s": res.tokens_per_s})
        _log(f"evaluated {name}: {res.accuracy:.3f}")
        del model

    shutil.copyfile(os.path.join(out, "grace", "controller.png"), os.path.join(out, "controller.png"))
    table = _markdown(rows)
    sample = records[0]
    int4, int4_processor = load_int4_model(exports["GRACE"])
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    answer = generate(int4, int4_processor or processor, os.path.join(data["image_folder"], sample["image"]), question)
    result = {"settings": dataclasses.asdict(settings), "rows": rows, "machine": _machine(),
              "sample": {"image": sample["image"], "question": question, "answer": answer, "truth": sample["answer"]},
              "seconds": round(time.perf_counter() - t_start, 1)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n")
    print(f"INT4 GRACE student, held-out image {sample['image']}:\n  Q: {question}\n  A: {answer!r}"
          f"   (ground truth: {sample['answer']!r})")
    print(f"\nwritten: {out}/results.md, results.json, controller.png; INT4 model in {exports['GRACE']}"
          f"  ({result['seconds']:.0f} s)")
    return result


def _markdown(rows: list[dict]) -> str:
    head = "| method | weights | " + " | ".join(QUESTION_TYPES) + " | average | weight MB |"
    lines = [head, "|" + "---|" * (len(QUESTION_TYPES) + 4)]
    for r in rows:
        accs = " | ".join("-" if r[t] is None else f"{100 * r[t]:.1f}" for t in QUESTION_TYPES)
        lines.append(f"| {r['method']} | {r['bits']} | {accs} | {100 * r['average']:.1f} | {r['weight_mb']:.2f} |")
    return "\n".join(lines)


def _machine() -> str:
    import platform

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end GRACE on a synthetic VQA task: teacher, student, four INT4 students, "
                                    "evaluation table, export (about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", default="grace-demo", help="output directory (default: grace-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not the method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    settings = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    run_demo(args.out, settings, progress=args.progress)
    return 0
