"""``grace demo`` (its options: :mod:`grace.cli.demo`): the whole GRACE method, end to end, on a synthetic task
small enough for a laptop CPU.

1. Writes a synthetic visual question-answering task (``grace.demo.synthetic``: colored shapes in a 3 x 3
   grid, one cell per image token; the color of a named shape, the shape of a named color, how many
   objects of a named color (one to six), the cell of a named color) in the LLaVA conversation format.
2. Trains, from scratch and in full precision, a tiny LLaVA-1.5 teacher and a student of the same width
   and half its depth (``grace.demo.tiny.SIZES["demo-teacher"]`` and ``["demo-student"]``; language layers
   initialised heavy-tailed, Student-t at std 1 / sqrt(fan_in), as trained LLMs' weights are) on it, their
   random vision towers frozen. Both are trained once and cached: a second run reuses them.
3. Makes INT4 (group 128) students four ways, as in the paper's tables: round-to-nearest PTQ of the
   student, QAT only, QAT + naive KD (plain KL, no gate, no RCKA, fixed beta), and full GRACE. The three
   trained methods run once per seed of ``DemoSettings.seeds`` (the seed sets their data order); RTN
   has no randomness and runs once.
4. Evaluates every model with batched greedy decoding on the held-out split; the QAT students are first
   exported in the compressed-tensors pack-quantized format and loaded back as real INT4 (W4A16Linear)
   models, so what is scored is what would be served.
5. Prints the table (mean and spread over seeds), the differences GRACE - QAT only (paired by seed) and
   GRACE - FP32 student (paired by question) with 95% intervals, and one sentence saying what the
   numbers show; writes results.md, results.json and the controller plot of the first GRACE run.

Reproducible: the same settings on the same machine and torch give the same table bit for bit (fixed
thread count, deterministic algorithms, every initialisation and data order seeded; nothing depends on
timing). Every stage writes into ``--out`` and is skipped when its result is already there with the same
settings, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import torch

from grace.config import TrainConfig
from grace.io import write_json

QUESTION_TYPES = ("color", "shape", "count", "position")
INT4_METHODS = ("QAT only", "QAT + naive KD", "GRACE")
_RUN_DIRS = {"QAT only": "qat", "QAT + naive KD": "qat-kd", "GRACE": "grace"}
# Both models' language layers start heavy-tailed, as pretrained LLMs' weights are: from a Gaussian start the
# toy student loses almost nothing to round-to-nearest INT4, and PTQ would have nothing to show (grace.demo.tiny).
INIT = "heavy_tailed"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and evaluates. ``n_eval_per_type`` held-out questions of each type (the eval split
    has 4 x that many); ``n_qat_train`` of the ``n_train`` training samples feed the INT4 stages; the FP32
    pretraining takes batches of ``pretrain_batch_size``, the INT4 stages of ``batch_size``; ``seeds``
    are the INT4 runs' seeds; ``threads`` is torch's intra-op thread count (fixed: results depend on it)."""
    n_train: int = 8000
    n_qat_train: int = 1000
    n_eval_per_type: int = 200
    teacher_steps: int = 600
    student_steps: int = 600
    qat_steps: int = 200
    pretrain_batch_size: int = 128
    batch_size: int = 32
    pretrain_lr: float = 1e-3
    qat_lr: float = 5e-4
    eval_batch_size: int = 100
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 2
    quick: bool = False


FULL = DemoSettings()
# CI's shortened run: every stage and file, a handful of steps, two seeds (accuracies are meaningless there).
QUICK = DemoSettings(n_train=48, n_qat_train=48, n_eval_per_type=3, teacher_steps=3, student_steps=3, qat_steps=2,
                     pretrain_batch_size=8, batch_size=8, eval_batch_size=12, seeds=(0, 1), quick=True)

# Seconds per unit of work on an idle 2-core x86 machine (2 threads), for the time-left estimate only: one
# sample written, one sample encoded, one optimizer step of each kind, one INT4 run's export, one evaluated
# question, one model loaded (measured in a full run: results.json's timing.stages). Measured stages rescale
# them as the demo runs.
_COST = {"task": 0.001, "encode": 0.004, "teacher": 0.23, "student": 0.093, "int4": 0.07, "export": 2.5,
         "eval": 0.0012, "load": 0.3, "report": 1.0}


def _log(msg: str) -> None:
    print(f"[grace demo] {msg}", flush=True)


class _Stages:
    """The stage counter: "stage 3/6: ... (about 4 min left)". The estimate is the predicted cost of the
    stages not yet done, scaled by how the finished (not cached) stages of 30 s or more compared with their
    predictions."""

    def __init__(self, predicted: list[tuple[str, float]]):
        self.names = [n for n, _ in predicted]
        self.predicted = [p for _, p in predicted]
        self.index = -1
        self.started = 0.0
        self.measured = self.expected = 0.0
        self.seconds: dict[str, float] = {}   # wall time of each stage, cached ones included

    def start(self, name: str) -> None:
        self.index = self.names.index(name)
        self.started = time.perf_counter()
        ratio = self.measured / self.expected if self.expected > 0 else 1.0
        left = ratio * sum(self.predicted[self.index:])
        _log(f"stage {self.index + 1}/{len(self.names)}: {name} (about {_minutes(left)} left)")

    def done(self, cached: bool = False) -> None:
        elapsed = time.perf_counter() - self.started
        self.seconds[self.names[self.index]] = round(elapsed, 1)
        # Only stages long enough to measure the machine rescale the estimate: the task's few seconds of PNG
        # writing say little about training speed.
        if not cached and self.predicted[self.index] >= 30:
            self.measured += elapsed
            self.expected += self.predicted[self.index]


def _minutes(seconds: float) -> str:
    return "1 min" if seconds < 90 else f"{round(seconds / 60)} min"


@contextlib.contextmanager
def _reproducible(threads: int):
    """Fixed intra-op thread count and deterministic algorithms for the block; the previous state after."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' loading / saving bars and its warnings out of the demo's output."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _train_cached(cfg: TrainConfig, what: str, progress: bool) -> tuple[str, bool]:
    """(final dir, cached): train unless ``cfg.output_dir`` already holds a finished run of exactly this
    configuration; a run of this configuration that was interrupted resumes from its last checkpoint.
    The trainer's own messages go to ``output_dir/log.txt``; its progress bar is labelled ``what``."""
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
        return final, True
    os.makedirs(cfg.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(cfg.output_dir, "log.txt"), "a") as log, contextlib.redirect_stdout(log):
        train(cfg, progress=progress, desc=what)
    _log(f"{what}: {cfg.max_steps} steps in {time.perf_counter() - t0:.0f} s -> {cfg.output_dir}")
    return final, False


# A few thousand samples read for many epochs: each is encoded once and kept, in the training process, so both
# cores compute instead of one encoding the same samples again in a worker (the samples are the same either way).
_SMALL_DATA = {"num_workers": 0, "cache_samples": True}


def _pretrain_config(s: DemoSettings, init: str, data: dict, out: str, steps: int) -> TrainConfig:
    # Plain supervised training from scratch: no teacher, no quantization. The random vision tower stays
    # frozen as in GRACE itself: on this task its random patch features learn faster than a trained one.
    return TrainConfig(student=init, data=data["train"], image_folder=data["image_folder"], output_dir=out,
                       bits=None, kd=False, rcka=False, max_steps=steps,
                       batch_size=s.pretrain_batch_size, grad_accum=1, lr=s.pretrain_lr, weight_decay=0.0,
                       warmup_ratio=0.05, save_every=max(1, steps // 4), seed=s.seed, device="cpu", max_length=128,
                       **_SMALL_DATA)


def _qat_configs(s: DemoSettings, teacher: str, student: str, data: str, image_folder: str, out: str,
                 seed: int) -> dict[str, TrainConfig]:
    base = TrainConfig(teacher=teacher, student=student, data=data, image_folder=image_folder,
                       bits=4, group_size=128, max_steps=s.qat_steps, batch_size=s.batch_size, grad_accum=1,
                       lr=s.qat_lr, warmup_ratio=0.05, save_every=max(1, s.qat_steps // 2), seed=seed,
                       device="cpu", max_length=128, **_SMALL_DATA)
    runs = {   # the paper's ablation ladder (Tables 3 and 4); everything else at the paper's defaults
        "QAT only": dict(kd=False, rcka=False),
        "QAT + naive KD": dict(kd_type="kl", gate=False, rcka=False, adaptive_beta=False),
        "GRACE": {},
    }
    return {name: dataclasses.replace(base, output_dir=os.path.join(out, f"{_RUN_DIRS[name]}-seed{seed}"), **kw)
            for name, kw in runs.items()}


def _qat_subset(data: dict, n: int) -> str:
    """The first ``n`` training records as their own file: the INT4 stages see fewer samples than the
    pretraining, and the trainer encodes its whole data file up front."""
    path = os.path.join(os.path.dirname(data["train"]), f"train-first{n}.json")
    if not os.path.exists(path):
        with open(data["train"]) as f:
            records = json.load(f)[:n]
        write_json(records, path, indent=None)
    return path


def run_demo(out: str = "grace-demo", settings: DemoSettings = FULL, *, progress: bool = True) -> dict:
    """Run every stage; returns the results (also written to ``out/results.json``).

    results.json: {"settings", "machine", "n_eval_per_type", "rows": [one per method: per-type and average
    accuracy (mean over seeds), their sample standard deviations, "seeds", "weight_mb"], "comparisons",
    "conclusion", "controller", "sample", "per_question": {model: "0101..."}, "timing"}. Everything but
    "timing" is reproducible bit for bit. Raises ValueError for settings that cannot run.
    """
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"settings.seeds must be distinct seeds, at least one, got {settings.seeds}")
    if settings.threads < 1:
        raise ValueError(f"settings.threads must be >= 1, got {settings.threads}")
    with _reproducible(settings.threads), _quiet_transformers():
        return _run(out, settings, progress)


def _run(out: str, s: DemoSettings, progress: bool) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.demo.synthetic import IMAGE_SIZE, VOCAB, write_task
    from grace.demo.tiny import build_tiny_vlm
    from grace.evaluate import evaluate, generate
    from grace.export import export_run
    from grace.load import load_int4_model
    from grace.quantize import rtn_int4_model

    t_start = time.perf_counter()
    n_eval = 4 * s.n_eval_per_type
    k = len(s.seeds)
    n_models = 3 + len(INT4_METHODS) * k

    def encode(records, steps, batch):   # every run encodes each sample it draws once (_SMALL_DATA)
        return _COST["encode"] * min(records, steps * batch)

    stages = _Stages([
        ("task", _COST["task"] * (s.n_train + n_eval)),
        ("teacher pretraining (FP32)", encode(s.n_train, s.teacher_steps, s.pretrain_batch_size)
         + _COST["teacher"] * s.teacher_steps),
        ("student pretraining (FP32)", encode(s.n_train, s.student_steps, s.pretrain_batch_size)
         + _COST["student"] * s.student_steps),
        (f"INT4 students: {len(INT4_METHODS)} methods x {k} seeds",
         len(INT4_METHODS) * k * (encode(s.n_qat_train, s.qat_steps, s.batch_size) + _COST["int4"] * s.qat_steps
                                  + _COST["export"])),
        (f"evaluation: {n_models} models x {n_eval} questions", n_models * (_COST["eval"] * n_eval + _COST["load"])),
        ("report", _COST["report"]),
    ])
    if s.quick:
        _log("--quick: a pipeline check with a few training steps per stage; its accuracies mean nothing")
    os.makedirs(out, exist_ok=True)

    stages.start("task")
    data = write_task(os.path.join(out, "data"), s.n_train, n_eval, seed=s.seed)
    _log(f"{s.n_train} training and {n_eval} held-out questions ({s.n_eval_per_type} per type) "
         f"in {data['image_folder']}")
    stages.done()

    inits = os.path.join(out, "init")
    paths, cached = {}, {}
    for size, what, steps, dirname in (("teacher", "teacher pretraining (FP32)", s.teacher_steps, "teacher"),
                                       ("student", "student pretraining (FP32)", s.student_steps, "student-fp32")):
        stages.start(what)
        init_dir = os.path.join(inits, f"{size}-{INIT}")   # named by the scheme: a new one is a new run
        if not os.path.exists(os.path.join(init_dir, "config.json")):
            build_tiny_vlm(init_dir, size=f"demo-{size}", vocab_words=VOCAB, seed=s.seed + 1, image_size=IMAGE_SIZE,
                           init=INIT)
        paths[size], cached[size] = _train_cached(
            _pretrain_config(s, init_dir, data, os.path.join(out, dirname), steps), what, progress)
        stages.done(cached[size])

    stages.start(f"INT4 students: {len(INT4_METHODS)} methods x {k} seeds")
    qat_data = _qat_subset(data, s.n_qat_train)
    exports: dict[str, list[str]] = {m: [] for m in INT4_METHODS}
    all_cached = True
    for i, seed in enumerate(s.seeds):
        configs = _qat_configs(s, paths["teacher"], paths["student"], qat_data, data["image_folder"],
                               os.path.join(out, "int4-train"), seed)
        for j, (name, cfg) in enumerate(configs.items()):
            n = i * len(configs) + j + 1
            final, was_cached = _train_cached(cfg, f"INT4 {name}, seed {seed} ({n}/{len(configs) * k})", progress)
            all_cached &= was_cached
            target = os.path.join(out, "int4", os.path.basename(cfg.output_dir))
            if not (was_cached and os.path.exists(os.path.join(target, "config.json"))):
                export_run(os.path.dirname(final), target, overwrite=True)
            exports[name].append(target)
    stages.done(all_cached)

    stages.start(f"evaluation: {n_models} models x {n_eval} questions")
    with open(data["eval"]) as f:
        records = json.load(f)
    processor = AutoProcessor.from_pretrained(paths["student"])

    def fp_model(path):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    candidates = [("teacher (larger)", "FP32", None, lambda: fp_model(paths["teacher"])),
                  ("student", "FP32", None, lambda: fp_model(paths["student"])),
                  ("RTN (PTQ)", "INT4", None, lambda: rtn_int4_model(fp_model(paths["student"])))]
    for name in INT4_METHODS:
        candidates += [(name, "INT4", seed, lambda p=p: load_int4_model(p)[0])
                       for seed, p in zip(s.seeds, exports[name], strict=True)]
    evals: dict[str, list[dict]] = {}
    timing = {"decode_tokens_per_s": {}}
    for name, bits, seed, load in candidates:
        model = load()
        res = evaluate(model, processor, records, data["image_folder"], batch_size=s.eval_batch_size,
                       max_new_tokens=4, progress=progress)
        correct = "".join("1" if r["correct"] else "0" for r in res.predictions)
        evals.setdefault(name, []).append({"bits": bits, "seed": seed, "correct": correct,
                                           "weight_mb": res.weight_bytes / 2**20})
        label = name if seed is None else f"{name}, seed {seed}"
        timing["decode_tokens_per_s"][label] = round(res.tokens_per_s, 1)
        _log(f"evaluated {label}: {100 * res.accuracy:.1f}%")
        del model
    stages.done()

    stages.start("report")
    qtypes = [r["question_type"] for r in records]
    rows = [_row(name, runs, qtypes) for name, runs in evals.items()]
    comparisons = _comparisons(evals)
    controller = _controller_summary([os.path.join(out, "int4-train", f"grace-seed{seed}") for seed in s.seeds])
    conclusion = _conclusion(rows, comparisons, controller, s.quick)
    shutil.copyfile(os.path.join(out, "int4-train", f"grace-seed{s.seeds[0]}", "controller.png"),
                    os.path.join(out, "controller.png"))
    sample = records[0]
    int4, int4_processor = load_int4_model(exports["GRACE"][0])
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    answer = generate(int4, int4_processor or processor, os.path.join(data["image_folder"], sample["image"]), question)
    stages.done()
    timing["seconds"] = round(time.perf_counter() - t_start, 1)
    timing["stages"] = stages.seconds
    result = {"settings": dataclasses.asdict(s), "machine": _machine(), "n_eval_per_type": s.n_eval_per_type,
              "rows": rows, "comparisons": comparisons, "conclusion": conclusion, "controller": controller,
              "sample": {"image": sample["image"], "question": question, "answer": answer, "truth": sample["answer"]},
              "per_question": {f"{n}" if r["seed"] is None else f"{n}, seed {r['seed']}": r["correct"]
                               for n, runs in evals.items() for r in runs},
              "timing": timing}
    report = _report(result)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report + "\n")
    print(f"INT4 GRACE student (seed {s.seeds[0]}), held-out image {sample['image']}:\n  Q: {question}\n"
          f"  A: {answer!r}   (ground truth: {sample['answer']!r})")
    print(f"\nwritten: {out}/results.md, results.json, controller.png; INT4 models in {out}/int4/"
          f"  ({timing['seconds']:.0f} s)")
    return result


# --- statistics -----------------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t by degrees of freedom; the normal 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def _t95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom; between tabulated values the one of
    the next smaller df (a slightly wider interval, never a narrower one); NaN for df < 1."""
    if df < 1:
        return math.nan
    if df > max(_T95):
        return 1.96
    return _T95[max(d for d in _T95 if d <= df)]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _interval(diffs: list[float]) -> dict:
    """Mean of paired differences with its two-sided 95% t interval (df = n - 1); an empty interval
    (lo = hi = mean) is reported as such, never widened."""
    m, sd = _mean_sd(diffs)
    half = _t95(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(diffs)}


def _accuracy(correct: str, mask: list[bool] | None = None) -> float:
    picked = [c for c, keep in zip(correct, mask or [True] * len(correct), strict=True) if keep]
    return sum(c == "1" for c in picked) / len(picked) if picked else math.nan


def _row(name: str, runs: list[dict], qtypes: list[str]) -> dict:
    row = {"method": name, "bits": runs[0]["bits"], "seeds": [r["seed"] for r in runs],
           "weight_mb": runs[0]["weight_mb"]}
    for t in (*QUESTION_TYPES, "average"):
        mask = None if t == "average" else [q == t for q in qtypes]
        row[t], row[f"{t}_sd"] = _mean_sd([_accuracy(r["correct"], mask) for r in runs])
    return row


def _comparisons(evals: dict[str, list[dict]]) -> dict:
    """GRACE - QAT only: paired by seed (the two methods share each seed's data order; the spread is
    the training runs' spread). GRACE - FP32 student: paired by question (GRACE's correctness averaged
    over its seeds, minus the one student's), so it measures what quantization costs on these questions."""
    grace = evals["GRACE"]
    by_seed = _interval([_accuracy(g["correct"]) - _accuracy(q["correct"])
                         for g, q in zip(grace, evals["QAT only"], strict=True)])
    student = evals["student"][0]["correct"]
    per_q = [sum(g["correct"][i] == "1" for g in grace) / len(grace) - (student[i] == "1")
             for i in range(len(student))]
    m, sd = _mean_sd(per_q)
    half = 1.96 * sd / math.sqrt(len(per_q)) if len(per_q) > 1 else math.nan
    return {"GRACE - QAT only": {**by_seed, "paired_by": "seed"},
            "GRACE - student (FP32)": {"mean": m, "lo": m - half, "hi": m + half, "n": len(per_q),
                                       "paired_by": "question"}}


def _controller_summary(run_dirs: list[str]) -> dict:
    """What the GRACE runs' controller, gate and RCKA did, averaged over seeds: beta at the first and last
    step and its range, the mean gate, and the last step's CE, GDKD and RCKA terms."""
    rows = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows.append([json.loads(line) for line in f if line.strip()])

    def avg(f):
        return sum(f(r) for r in rows) / len(rows)

    return {"beta_first": avg(lambda r: r[0]["beta"]), "beta_last": avg(lambda r: r[-1]["beta"]),
            "beta_min": min(x["beta"] for r in rows for x in r), "beta_max": max(x["beta"] for r in rows for x in r),
            "tau": rows[0][0]["tau"], "ema_gdkd_last": avg(lambda r: r[-1]["ema_gdkd"]),
            "gate_mean": avg(lambda r: sum(x["gate"] for x in r) / len(r)),
            "ce_last": avg(lambda r: r[-1]["ce"]), "gdkd_last": avg(lambda r: r[-1]["gdkd"]),
            "rcka_last": avg(lambda r: r[-1]["rcka"])}


def _verdict(c: dict) -> str:
    if c["lo"] > 0:
        return "better"
    if c["hi"] < 0:
        return "worse"
    return "not distinguishable"


def _conclusion(rows: list[dict], comparisons: dict, ctl: dict, quick: bool) -> str:
    by = {r["method"]: r for r in rows}
    vs_qat, vs_fp = comparisons["GRACE - QAT only"], comparisons["GRACE - student (FP32)"]
    p = 100
    text = (f"INT4 GRACE averaged {p * by['GRACE']['average']:.1f}% against {p * by['QAT only']['average']:.1f}% "
            f"for QAT only ({p * vs_qat['mean']:+.1f} points, 95% interval [{p * vs_qat['lo']:+.1f}, "
            f"{p * vs_qat['hi']:+.1f}] over {vs_qat['n']} seeds: {_verdict(vs_qat)}) and "
            f"{p * by['student']['average']:.1f}% for the FP32 student ({p * vs_fp['mean']:+.1f} points, "
            f"[{p * vs_fp['lo']:+.1f}, {p * vs_fp['hi']:+.1f}] over {vs_fp['n']} questions: {_verdict(vs_fp)}).")
    if vs_qat["lo"] <= 0:
        text += (f" GRACE did not beat QAT only here: its controller moved beta from {ctl['beta_first']:.3f} to "
                 f"{ctl['beta_last']:.3f} (EMA of GDKD {ctl['ema_gdkd_last']:.3f} against tau {ctl['tau']}), the gate "
                 f"kept {ctl['gate_mean']:.2f} of the tokens' distillation weight on average, and at the last step "
                 f"RCKA was {ctl['rcka_last']:.3f} next to CE {ctl['ce_last']:.3f} and GDKD {ctl['gdkd_last']:.3f} "
                 f"(controller.png).")
    if quick:
        text = "Pipeline check only (--quick), these numbers mean nothing: " + text
    return text


# --- output ---------------------------------------------------------------------------------------------------

def _report(result: dict) -> str:
    s = result["settings"]
    k = len(s["seeds"])
    lines = []
    if s["quick"]:
        lines += ["**Pipeline check (--quick): a few training steps per stage; these numbers mean nothing.**", ""]
    lines += [f"Accuracy in % (exact match, greedy decoding) on {result['n_eval_per_type']} held-out questions per "
              f"type ({4 * result['n_eval_per_type']} in all). INT4 QAT rows: mean ± standard deviation over {k} "
              f"seeds ({', '.join(map(str, s['seeds']))}); RTN is deterministic (one run). Weight MB: every "
              "parameter and buffer of the model as served (the vision tower, projector, embeddings and LM head "
              "stay FP32; INT4 layers count their packed 4-bit weights and scales).", ""]
    head = "| method | weights | " + " | ".join(QUESTION_TYPES) + " | average | weight MB |"
    lines += [head, "|" + "---|" * (len(QUESTION_TYPES) + 4)]
    for r in result["rows"]:
        def cell(t, r=r):
            v, sd = 100 * r[t], 100 * r[f"{t}_sd"]
            return f"{v:.1f} ± {sd:.1f}" if len(r["seeds"]) > 1 else f"{v:.1f}"
        accs = " | ".join(cell(t) for t in QUESTION_TYPES)
        lines.append(f"| {r['method']} | {r['bits']} | {accs} | {cell('average')} | {r['weight_mb']:.2f} |")
    lines.append("")
    for name, c in result["comparisons"].items():
        lines.append(f"- {name}: {100 * c['mean']:+.1f} points, 95% interval [{100 * c['lo']:+.1f}, "
                     f"{100 * c['hi']:+.1f}] (paired by {c['paired_by']}, n = {c['n']})")
    lines += ["", result["conclusion"]]
    return "\n".join(lines)


def _machine() -> str:
    import platform

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"
