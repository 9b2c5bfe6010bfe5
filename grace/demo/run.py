"""``grace demo`` (its options: :mod:`grace.cli.demo`): the whole GRACE method, end to end, on a synthetic task
small enough for a laptop CPU, with the comparison rows of the paper's tables in miniature.

1. Writes a synthetic visual question-answering task (``grace.demo.synthetic``: colored shapes in a 3 x 3
   grid, one cell per image token; the color of a named shape, the shape of a named color, how many
   objects of a named color (one to six), the cell of a named color) in the LLaVA conversation format: a
   training split, a test split (``eval.json``) and a validation split drawn apart from the test questions.
2. Trains, from scratch and in full precision, a tiny LLaVA-1.5 teacher and a student of the same width
   and half its depth (``grace.demo.tiny.SIZES["demo-teacher"]`` and ``["demo-student"]``; language layers
   initialised heavy-tailed, Student-t at std 1 / sqrt(fan_in), as trained LLMs' weights are) on it, their
   random vision towers frozen. Both are trained once and cached: a second run reuses them.
3. Continues the student in the runs of :data:`RUNS`, once per seed of ``DemoSettings.seeds`` (the seed sets the
   data order; all runs of a seed draw the same batches, so the frozen teacher's outputs are computed once per
   seed and replayed to the others: grace.objective.TeacherCache): the full-precision controls (the student
   trained on for the same steps with CE alone, and with GRACE's losses but no quantization: the paper's
   Table 1 and its reviewers' control), the INT4 students (QAT only, QAT + naive KD, GRACE) and an INT8 GRACE
   student (the paper's Table 2). RTN rounds the student and has no randomness: it runs once.
   With ``ablation``, also the component ladder of the paper's Table 3 (QAT, + DKD, + gate, + RCKA,
   + controller = GRACE).
4. Exports every trained student (INT4 and INT8 as compressed-tensors pack-quantized checkpoints, the
   full-precision ones as plain checkpoints), loads it back as it would be served and scores it with batched
   greedy decoding on the test and the validation split.
5. Prints the table (mean and spread over seeds), the comparisons of :data:`COMPARISONS` on both splits, each
   with a 95% interval of a paired bootstrap over questions and seeds (:mod:`grace.demo.stats`) and a verdict
   only where the interval excludes zero, and what the numbers show; writes results.md, results.json, the
   controller plot of the first GRACE run and, with ``ablation``, ablation.png.

Reproducible: the same settings on the same machine and torch give the same table bit for bit (fixed
thread count, deterministic algorithms, every initialisation, data order and bootstrap seeded; nothing depends
on timing). Every stage writes into ``--out`` and is skipped when its result is already there with the same
settings, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import time

import torch

from grace.config import TrainConfig, saved_settings
from grace.io import claim_dir, write_json

QUESTION_TYPES = ("color", "shape", "count", "position")
SPLITS = {"test": "eval", "val": "val"}   # the split's name in the report -> its file in the task (write_task)
# Both models' language layers start heavy-tailed, as pretrained LLMs' weights are: from a Gaussian start the
# toy student loses almost nothing to round-to-nearest INT4, and PTQ would have nothing to show (grace.demo.tiny).
INIT = "heavy_tailed"

# The models trained once per seed from the FP32 student: row name -> (run directory, weights, the changes to
# the common configuration of _run_configs, which is the paper's GRACE). Everything else is shared: data,
# steps, batch, learning rate.
RUNS = {
    "student + CE (same steps)": ("fp-ce", "FP32", {"bits": None, "kd": False, "rcka": False}),
    "student + GRACE losses (unquantized)": ("fp-grace", "FP32", {"bits": None}),
    "QAT only": ("qat", "INT4", {"kd": False, "rcka": False}),
    "QAT + naive KD": ("qat-kd", "INT4", {"kd_type": "kl", "gate": False, "rcka": False, "adaptive_beta": False}),
    "GRACE": ("grace", "INT4", {}),
    "GRACE (INT8)": ("grace-int8", "INT8", {"bits": 8}),
    # the ladder's middle rungs (--ablation): fixed beta until the controller's rung
    "QAT + DKD": ("dkd", "INT4", {"gate": False, "rcka": False, "adaptive_beta": False}),
    "QAT + DKD + gate": ("dkd-gate", "INT4", {"rcka": False, "adaptive_beta": False}),
    "QAT + DKD + gate + RCKA": ("dkd-gate-rcka", "INT4", {"adaptive_beta": False}),
}
BASELINES = {"teacher (larger)": "FP32", "student": "FP32", "RTN (PTQ)": "INT4"}   # one model each, no seed
# The main table's rows, in order.
MAIN_ROWS = ("teacher (larger)", "student", "student + CE (same steps)", "student + GRACE losses (unquantized)",
             "RTN (PTQ)", "QAT only", "QAT + naive KD", "GRACE", "GRACE (INT8)")
# The paper's Table 3 ladder: each rung adds one of GRACE's parts to the one above (label, row of RUNS).
LADDER = (("QAT", "QAT only"), ("+ DKD", "QAT + DKD"), ("+ gate", "QAT + DKD + gate"),
          ("+ RCKA", "QAT + DKD + gate + RCKA"), ("+ controller", "GRACE"))
# Every difference the demo reports, A - B, and what it measures.
COMPARISONS = (
    ("GRACE", "QAT only", "GRACE's distillation on top of QAT"),
    ("GRACE", "QAT + naive KD", "GRACE against plain KD"),
    ("QAT + naive KD", "QAT only", "plain KD on top of QAT"),
    ("QAT only", "RTN (PTQ)", "what QAT recovers over rounding"),
    ("GRACE", "student", "the INT4 GRACE student against its FP32 start"),
    ("GRACE", "student + CE (same steps)", "against the FP32 student trained for the same steps"),
    ("student + CE (same steps)", "student", "continued training alone"),
    ("student + GRACE losses (unquantized)", "student + CE (same steps)", "GRACE's losses without quantization"),
    ("GRACE", "student + GRACE losses (unquantized)", "what INT4 costs under the same losses"),
    ("GRACE (INT8)", "GRACE", "INT8 against INT4"),
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and evaluates. ``n_eval_per_type`` test questions of each type (the test split
    has 4 x that many), ``n_val_per_type`` validation questions of each type; ``n_qat_train`` of the ``n_train``
    training samples feed the runs of :data:`RUNS`; the FP32 pretraining takes batches of
    ``pretrain_batch_size``, the runs of RUNS of ``batch_size``, for ``qat_steps`` steps; ``seeds`` are those
    runs' seeds; ``threads`` is torch's intra-op thread count (fixed: results depend on it); ``replicates``
    the bootstrap's."""
    n_train: int = 8000
    n_qat_train: int = 1000
    n_eval_per_type: int = 200
    n_val_per_type: int = 200
    teacher_steps: int = 600
    student_steps: int = 600
    qat_steps: int = 400
    pretrain_batch_size: int = 128
    batch_size: int = 32
    pretrain_lr: float = 1e-3
    qat_lr: float = 5e-4
    eval_batch_size: int = 100
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 2
    replicates: int = 10_000
    quick: bool = False


FULL = DemoSettings()
# CI's shortened run: every stage and file, a handful of steps, two seeds (accuracies are meaningless there).
QUICK = DemoSettings(n_train=48, n_qat_train=48, n_eval_per_type=3, n_val_per_type=3, teacher_steps=3,
                     student_steps=3, qat_steps=2, pretrain_batch_size=8, batch_size=8, eval_batch_size=12,
                     seeds=(0, 1), replicates=1000, quick=True)

# Seconds per unit of work on an idle 2-core x86 machine (2 threads): one sample written, one sample encoded,
# one optimizer step of the teacher's and the student's pretraining, one step of a run of RUNS without the
# teacher (CE only) and with it (its outputs replayed from the seed's TeacherCache), a run's fixed cost (the
# trainer's start, its final save and the export), one evaluated question, one model loaded, the report, and the
# interpreter's start (imports). Measured on the current code, 2 threads, on the project's 2-core machine under
# a light load (1.4-1.9; it was never idle), so an idle machine should beat them: the median step of each kind
# (tokens / tokens_per_s in metrics.jsonl), docs/demo.md "How it was calibrated". They predict
# the stage counter's time left (measured stages rescale it as the demo runs) and, in the tests, that FULL fits
# its time budget (predicted_seconds).
_COST = {"task": 0.001, "encode": 0.001, "teacher": 0.12, "student": 0.083, "ce_step": 0.027, "kd_step": 0.037,
         "run": 1.2, "eval": 0.0006, "load": 0.1, "report": 3.0, "start": 5.0}


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


def _train_cached(cfg: TrainConfig, what: str, progress: bool, teacher_cache=None) -> tuple[str, bool]:
    """(final dir, cached): train unless ``cfg.output_dir`` already holds a finished run of exactly this
    configuration (its config.json read as :func:`grace.config.saved_settings` completes it, so a run saved
    before a later option existed still counts); a run of this configuration that was interrupted resumes from
    its last checkpoint. The trainer's own messages go to ``output_dir/log.txt``; its progress bar is labelled
    ``what``; ``teacher_cache`` is handed to the trainer (grace.objective.TeacherCache)."""
    from grace.train import train

    cfg = dataclasses.replace(cfg, resume=True)
    final = os.path.join(cfg.output_dir, "final")
    cfg_path = os.path.join(cfg.output_dir, "config.json")
    same = False
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            same = saved_settings(json.load(f)) == json.loads(json.dumps(dataclasses.asdict(cfg)))
        # The demo owns its directories: a run with other settings, or one interrupted before its first
        # checkpoint (nothing to resume from, and the trainer refuses to resume a run that logged steps without
        # one), starts over.
        out = cfg.output_dir
        resumable = os.path.isdir(os.path.join(out, "checkpoint")) or glob.glob(
            os.path.join(glob.escape(out), "checkpoint.old-*"))
        if not same or not (resumable or os.path.exists(os.path.join(final, "student_state.pt"))):
            shutil.rmtree(out)
            same = False
    if same and os.path.exists(os.path.join(final, "student_state.pt")):
        _log(f"{what}: cached in {cfg.output_dir}")
        return final, True
    os.makedirs(cfg.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(cfg.output_dir, "log.txt"), "a") as log, contextlib.redirect_stdout(log):
        train(cfg, progress=progress, desc=what, teacher_cache=teacher_cache)
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


def _run_configs(s: DemoSettings, names: list[str], teacher: str, student: str, data: str, image_folder: str,
                 out: str, seed: int) -> dict[str, TrainConfig]:
    """The TrainConfig of each run of ``names`` (keys of :data:`RUNS`) with ``seed``: the paper's GRACE at
    group 128, changed as RUNS says."""
    base = TrainConfig(teacher=teacher, student=student, data=data, image_folder=image_folder,
                       bits=4, group_size=128, max_steps=s.qat_steps, batch_size=s.batch_size, grad_accum=1,
                       lr=s.qat_lr, warmup_ratio=0.05, save_every=max(1, s.qat_steps // 2), seed=seed,
                       device="cpu", max_length=128, **_SMALL_DATA)
    return {name: dataclasses.replace(base, output_dir=os.path.join(out, f"{RUNS[name][0]}-seed{seed}"),
                                      **RUNS[name][2])
            for name in names}


def _qat_subset(data: dict, n: int) -> str:
    """The first ``n`` training records as their own file: the runs from the FP32 student see fewer samples
    than the pretraining, and the trainer encodes its whole data file up front."""
    path = os.path.join(os.path.dirname(data["train"]), f"train-first{n}.json")
    if not os.path.exists(path):
        with open(data["train"]) as f:
            records = json.load(f)[:n]
        write_json(records, path, indent=None)
    return path


def trained_runs(ablation: bool) -> list[str]:
    """The rows of :data:`RUNS` a demo trains, in training order: the main table's, then (``ablation``) the
    ladder's middle rungs."""
    names = [n for n in MAIN_ROWS if n in RUNS]
    if ablation:
        names += [row for _, row in LADDER if row not in names]
    return names


def run_demo(out: str = "grace-demo", settings: DemoSettings = FULL, *, ablation: bool = False,
             progress: bool = True) -> dict:
    """Run every stage; returns the results (also written to ``out/results.json``).

    results.json: {"settings", "machine", "n_questions": {split: count}, "rows": [one per row of MAIN_ROWS:
    per-type test accuracy and the test and val averages (mean over seeds), their sample standard deviations,
    "seeds", "weights", "weight_mb"], "comparisons": {"A - B": {"what", split: bootstrap interval with its
    "verdict"}}, "ablation": null or {"rows", "comparisons"} (the ladder), "conclusion", "controller", "sample",
    "per_question": {split: {model: "0101..."}}, "timing"}. Everything but "timing" is reproducible bit for bit.

    Raises:
        ValueError: settings that cannot run (no seeds or repeated ones, threads < 1, replicates < 100).
    """
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"settings.seeds must be distinct seeds, at least one, got {settings.seeds}")
    if settings.threads < 1:
        raise ValueError(f"settings.threads must be >= 1, got {settings.threads}")
    if settings.replicates < 100:
        raise ValueError(f"settings.replicates must be >= 100, got {settings.replicates}")
    # The demo deletes and rewrites what it finds in ``out`` (stale runs, exports): only a directory it created.
    claim_dir(out, "grace demo", flag="--out")
    with _reproducible(settings.threads), _quiet_transformers():
        return _run(out, settings, ablation, progress)


@dataclasses.dataclass
class _Demo:
    """What the stages of one demo run share: its settings, and what each stage leaves for the next."""
    out: str
    s: DemoSettings
    ablation: bool
    progress: bool
    stages: _Stages
    names: list[str]                                  # the trained rows (trained_runs)
    n_q: dict[str, int]                               # questions per split
    data: dict = dataclasses.field(default_factory=dict)             # write_task's paths
    paths: dict[str, str] = dataclasses.field(default_factory=dict)  # "teacher" / "student": their final/
    exports: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # row -> one export per seed
    records: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # split -> its questions
    evals: dict[str, list[dict]] = dataclasses.field(default_factory=dict)    # row -> one result per model
    timing: dict = dataclasses.field(default_factory=lambda: {"decode_tokens_per_s": {}})


def _run(out: str, s: DemoSettings, ablation: bool, progress: bool) -> dict:
    """The stages in order, each a function of :class:`_Demo`: the task, the FP32 pretraining, the trained
    students, the evaluation, the report."""
    t_start = time.perf_counter()
    n_q = _n_questions(s)
    names = trained_runs(ablation)
    demo = _Demo(out, s, ablation, progress, _stage_plan(s, names, n_q, ablation), names, n_q)
    if s.quick:
        _log("--quick: a pipeline check with a few training steps per stage; its accuracies mean nothing")
    _make_task(demo)
    _pretrain(demo)
    _train_students(demo)
    _evaluate_all(demo)
    return _write_report(demo, t_start)


def _n_questions(s: DemoSettings) -> dict[str, int]:
    """Questions per split (keys of :data:`SPLITS`): ``n_*_per_type`` of each question type."""
    return {"test": len(QUESTION_TYPES) * s.n_eval_per_type, "val": len(QUESTION_TYPES) * s.n_val_per_type}


def _trained_stage(s: DemoSettings, names: list[str]) -> str:
    return f"trained students: {len(names)} runs x {len(s.seeds)} seeds"


def _eval_stage(s: DemoSettings, names: list[str], n_q: dict[str, int]) -> str:
    n_models = len(BASELINES) + len(names) * len(s.seeds)
    return f"evaluation: {n_models} models x {n_q['test']} test + {n_q['val']} validation questions"


def _stage_plan(s: DemoSettings, names: list[str], n_q: dict[str, int], ablation: bool) -> _Stages:
    """The stage counter, with each stage's predicted cost (seconds, from _COST)."""
    def encode(records, steps, batch):   # every run encodes each sample it draws once (_SMALL_DATA)
        return _COST["encode"] * min(records, steps * batch)

    k = len(s.seeds)
    return _Stages([
        ("task", _COST["task"] * (s.n_train + sum(n_q.values()))),
        ("teacher pretraining (FP32)", encode(s.n_train, s.teacher_steps, s.pretrain_batch_size)
         + _COST["teacher"] * s.teacher_steps),
        ("student pretraining (FP32)", encode(s.n_train, s.student_steps, s.pretrain_batch_size)
         + _COST["student"] * s.student_steps),
        (_trained_stage(s, names), k * sum(encode(s.n_qat_train, s.qat_steps, s.batch_size) + _COST["run"]
                                               + _COST["kd_step" if RUNS[n][2].get("kd", TrainConfig.kd) else "ce_step"]
                                               * s.qat_steps for n in names)),
        (_eval_stage(s, names, n_q), (len(BASELINES) + len(names) * k)
         * (_COST["eval"] * sum(n_q.values()) + _COST["load"])),
        ("report", _COST["report"] * (2 if ablation else 1)),
    ])


def predicted_seconds(s: DemoSettings, ablation: bool = False) -> float:
    """The demo's predicted wall time from scratch on an idle 2-core machine, in seconds: every stage's cost
    (:data:`_COST`) and the interpreter's start."""
    names = trained_runs(ablation)
    n_q = _n_questions(s)
    return _COST["start"] + sum(_stage_plan(s, names, n_q, ablation).predicted)


def _make_task(demo: _Demo) -> None:
    """Stage 1: the synthetic task's train, test and validation questions and their images."""
    from grace.demo.synthetic import write_task

    s, n_q = demo.s, demo.n_q
    demo.stages.start("task")
    demo.data = write_task(os.path.join(demo.out, "data"), s.n_train, n_q["test"], seed=s.seed, n_val=n_q["val"])
    _log(f"{s.n_train} training, {n_q['test']} test and {n_q['val']} validation questions (drawn apart from the "
         f"test ones) in {demo.data['image_folder']}")
    demo.stages.done()


def _pretrain(demo: _Demo) -> None:
    """Stages 2 and 3: the FP32 teacher and student, trained from scratch on the task."""
    from grace.demo.synthetic import IMAGE_SIZE, VOCAB
    from grace.demo.tiny import build_tiny_vlm

    s, inits = demo.s, os.path.join(demo.out, "init")
    for size, what, steps, dirname in (("teacher", "teacher pretraining (FP32)", s.teacher_steps, "teacher"),
                                       ("student", "student pretraining (FP32)", s.student_steps, "student-fp32")):
        demo.stages.start(what)
        init_dir = os.path.join(inits, f"{size}-{INIT}")   # named by the scheme: a new one is a new run
        if not os.path.exists(os.path.join(init_dir, "config.json")):
            build_tiny_vlm(init_dir, size=f"demo-{size}", vocab_words=VOCAB, seed=s.seed + 1, image_size=IMAGE_SIZE,
                           init=INIT)
        demo.paths[size], cached = _train_cached(
            _pretrain_config(s, init_dir, demo.data, os.path.join(demo.out, dirname), steps), what, demo.progress)
        demo.stages.done(cached)


def _train_students(demo: _Demo) -> None:
    """Stage 4: every trained row for every seed, each exported as it is served."""
    from grace.export import export_run
    from grace.objective import TeacherCache

    s, out = demo.s, demo.out
    demo.stages.start(_trained_stage(s, demo.names))
    qat_data = _qat_subset(demo.data, s.n_qat_train)
    demo.exports = {n: [] for n in demo.names}
    all_cached = True
    k = len(s.seeds)
    for i, seed in enumerate(s.seeds):
        # All runs of this seed draw the same micro-batches: the teacher's outputs are computed by the first run
        # that needs them and replayed to the others. A new seed draws new batches, so the cache starts empty.
        teacher_cache = TeacherCache()
        configs = _run_configs(s, demo.names, demo.paths["teacher"], demo.paths["student"], qat_data,
                               demo.data["image_folder"], os.path.join(out, "runs"), seed)
        for j, (name, cfg) in enumerate(configs.items()):
            n = i * len(configs) + j + 1
            final, was_cached = _train_cached(cfg, f"{name}, seed {seed} ({n}/{len(configs) * k})", demo.progress,
                                              teacher_cache)
            all_cached &= was_cached
            target = os.path.join(out, "models", os.path.basename(cfg.output_dir))
            if not (was_cached and os.path.exists(os.path.join(target, "config.json"))):
                export_run(os.path.dirname(final), target, overwrite=True)
            demo.exports[name].append(target)
    demo.stages.done(all_cached)


def _evaluate_all(demo: _Demo) -> None:
    """Stage 5: greedy decoding of every model (baselines and each trained row's exports) on both splits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.evaluate import evaluate
    from grace.load import load_model
    from grace.quantize import rtn_int4_model

    s, paths = demo.s, demo.paths
    demo.stages.start(_eval_stage(s, demo.names, demo.n_q))
    for split, file in SPLITS.items():
        with open(demo.data[file]) as f:
            demo.records[split] = json.load(f)
    processor = AutoProcessor.from_pretrained(paths["student"])

    def fp_model(path):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    candidates = [("teacher (larger)", None, lambda: fp_model(paths["teacher"])),
                  ("student", None, lambda: fp_model(paths["student"])),
                  ("RTN (PTQ)", None, lambda: rtn_int4_model(fp_model(paths["student"])))]
    for name in demo.names:
        candidates += [(name, seed, lambda p=p: load_model(p)[0]) for seed, p in zip(s.seeds, demo.exports[name],
                                                                                   strict=True)]
    for name, seed, load in candidates:
        model = load()
        run = {"weights": BASELINES.get(name) or RUNS[name][1], "seed": seed, "correct": {}}
        label = name if seed is None else f"{name}, seed {seed}"
        for split in SPLITS:
            res = evaluate(model, processor, demo.records[split], demo.data["image_folder"],
                           batch_size=s.eval_batch_size, max_new_tokens=4, progress=demo.progress)
            run["correct"][split] = "".join("1" if r["correct"] else "0" for r in res.predictions)
            run["weight_mb"] = res.weight_bytes / 2**20
            if split == "test":
                demo.timing["decode_tokens_per_s"][label] = round(res.tokens_per_s, 1)
        demo.evals.setdefault(name, []).append(run)
        _log(f"evaluated {label}: " + ", ".join(f"{split} {100 * _accuracy(c):.1f}%"
                                                 for split, c in run["correct"].items()))
        del model
    demo.stages.done()


def _write_report(demo: _Demo, t_start: float) -> dict:
    """Stage 6: rows, comparisons and their verdicts, the controller's summary and plots, one sample answer;
    results.json and results.md written, the report printed. Returns the result (run_demo's)."""
    from transformers import AutoProcessor

    from grace.evaluate import generate
    from grace.load import load_model

    s, out, evals, ablation = demo.s, demo.out, demo.evals, demo.ablation
    demo.stages.start("report")
    qtypes = [r["question_type"] for r in demo.records["test"]]
    rows = [_row(name, evals[name], qtypes) for name in MAIN_ROWS]
    comparisons = _comparisons(evals, [(a, b) for a, b, _ in COMPARISONS], s.replicates)
    for (a, b, what) in COMPARISONS:
        comparisons[f"{a} - {b}"] = {"what": what, **comparisons[f"{a} - {b}"]}
    ladder = None
    if ablation:
        rungs = [_row(row, evals[row], qtypes) | {"rung": label} for label, row in LADDER]
        steps = [(LADDER[i][1], LADDER[i - 1][1]) for i in range(1, len(LADDER))]
        ladder = {"rows": rungs, "comparisons": _comparisons(evals, steps, s.replicates)}
        for i, key in enumerate(ladder["comparisons"], start=1):
            ladder["comparisons"][key]["what"] = f"{LADDER[i][0]} (rung {i + 1} - rung {i})"
    grace_dirs = [os.path.join(out, "runs", f"{RUNS['GRACE'][0]}-seed{seed}") for seed in s.seeds]
    controller = _controller_summary(grace_dirs)
    conclusion = _conclusion(rows, comparisons, ladder, controller, s.quick)
    shutil.copyfile(os.path.join(grace_dirs[0], "controller.png"), os.path.join(out, "controller.png"))
    if ablation:
        from grace.plots import plot_ladder

        plot_ladder(ladder["rows"], ladder["comparisons"], os.path.join(out, "ablation.png"))
    sample = demo.records["test"][0]
    int4, int4_processor = load_model(demo.exports["GRACE"][0])
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    processor = int4_processor or AutoProcessor.from_pretrained(demo.paths["student"])
    answer = generate(int4, processor, os.path.join(demo.data["image_folder"], sample["image"]), question)
    demo.stages.done()
    timing = demo.timing
    timing["seconds"] = round(time.perf_counter() - t_start, 1)
    timing["stages"] = demo.stages.seconds
    result = {"settings": dataclasses.asdict(s), "machine": _machine(), "n_questions": demo.n_q,
              "n_eval_per_type": s.n_eval_per_type, "rows": rows, "comparisons": comparisons, "ablation": ladder,
              "conclusion": conclusion, "controller": controller,
              "sample": {"image": sample["image"], "question": question, "answer": answer, "truth": sample["answer"]},
              "per_question": {split: {n if r["seed"] is None else f"{n}, seed {r['seed']}": r["correct"][split]
                                       for n, runs in evals.items() for r in runs} for split in SPLITS},
              "timing": timing}
    report = _report(result)
    write_json(result, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report + "\n")
    print(f"INT4 GRACE student (seed {s.seeds[0]}), test image {sample['image']}:\n  Q: {question}\n"
          f"  A: {answer!r}   (ground truth: {sample['answer']!r})")
    written = "results.md, results.json, controller.png" + (", ablation.png" if ablation else "")
    print(f"\nwritten: {out}/{written}; the trained students in {out}/models/  ({timing['seconds']:.0f} s)")
    return result


# --- statistics -----------------------------------------------------------------------------------------------

def _mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _accuracy(correct: str, mask: list[bool] | None = None) -> float:
    picked = [c for c, keep in zip(correct, mask or [True] * len(correct), strict=True) if keep]
    return sum(c == "1" for c in picked) / len(picked) if picked else math.nan


def _row(name: str, runs: list[dict], qtypes: list[str]) -> dict:
    """A table row: per-type accuracy on the test split and the test and val averages, each the mean over the
    row's runs (its seeds) with the sample standard deviation."""
    row = {"method": name, "weights": runs[0]["weights"], "seeds": [r["seed"] for r in runs],
           "weight_mb": runs[0]["weight_mb"]}
    for t in (*QUESTION_TYPES, "average"):
        mask = None if t == "average" else [q == t for q in qtypes]
        row[t], row[f"{t}_sd"] = _mean_sd([_accuracy(r["correct"]["test"], mask) for r in runs])
    row["val"], row["val_sd"] = _mean_sd([_accuracy(r["correct"]["val"]) for r in runs])
    return row


def _comparisons(evals: dict[str, list[dict]], pairs: list[tuple[str, str]], replicates: int) -> dict:
    """For each (A, B) of ``pairs``, on each split: A - B with the paired bootstrap of grace.demo.stats over the
    split's questions and the seeds (runs of one seed are paired: they share its data order; a model without
    seeds pairs with every seed) and its verdict. Keys "A - B"."""
    import numpy as np

    from grace.demo.stats import paired_bootstrap, verdict

    out = {}
    for a, b in pairs:
        entry = {}
        for split in SPLITS:
            mats = [np.array([[c == "1" for c in r["correct"][split]] for r in evals[m]], dtype=np.float64)
                    for m in (a, b)]
            c = paired_bootstrap(*mats, replicates=replicates, seed=0)
            entry[split] = {**c, "verdict": verdict(c)}
        out[f"{a} - {b}"] = entry
    return out


def _controller_summary(run_dirs: list[str]) -> dict:
    """What the GRACE runs' controller, gate and RCKA did, averaged over seeds: beta at the first and last
    step and its range, the mean gate, the last step's CE, GDKD and RCKA terms (RCKA over the steps that measured
    it), and the KD convention GDKD and tau are on."""
    rows = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows.append([json.loads(line) for line in f if line.strip()])
    with open(os.path.join(run_dirs[0], "config.json")) as f:
        cfg = TrainConfig(**saved_settings(json.load(f)))

    def avg(f):
        return sum(f(r) for r in rows) / len(rows)

    def last_rcka(r):
        measured = [x["rcka"] for x in r if x["rcka"] is not None]
        return measured[-1] if measured else math.nan

    return {"beta_first": avg(lambda r: r[0]["beta"]), "beta_last": avg(lambda r: r[-1]["beta"]),
            "beta_min": min(x["beta"] for r in rows for x in r), "beta_max": max(x["beta"] for r in rows for x in r),
            "tau": rows[0][0]["tau"], "ema_gdkd_last": avg(lambda r: r[-1]["ema_gdkd"]),
            "gate_mean": avg(lambda r: sum(x["gate"] for x in r) / len(r)),
            "ce_last": avg(lambda r: r[-1]["ce"]), "gdkd_last": avg(lambda r: r[-1]["gdkd"]),
            "rcka_last": avg(last_rcka), "convention": cfg.kd_convention()}


def _points(c: dict) -> str:
    return f"{100 * c['mean']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def _both(c: dict) -> str:
    """A comparison on both splits, in words: "test +2.1 [+0.4, +3.9] better; val +1.6 [-0.2, +3.3] no resolved
    difference"."""
    return "; ".join(f"{split} {_points(c[split])} {c[split]['verdict']}" for split in SPLITS)


def _findings(comparisons: dict) -> tuple[list[str], list[str], list[str]]:
    """The comparisons split three ways: resolved the same way on every split (a finding), resolved on some
    split only, resolved on none."""
    found, partial, none = [], [], []
    for key, c in comparisons.items():
        verdicts = {c[split]["verdict"] for split in SPLITS}
        if len(verdicts) == 1 and verdicts != {"no resolved difference"}:
            found.append(f"{key}: {verdicts.pop()}")
        elif verdicts != {"no resolved difference"}:
            partial.append(key)
        else:
            none.append(key)
    return found, partial, none


def _conclusion(rows: list[dict], comparisons: dict, ladder: dict | None, ctl: dict, quick: bool) -> str:
    """What the numbers show, whichever way they fall: GRACE against QAT only on both splits; every comparison
    resolved the same way on test and validation (the findings), those resolved on one split only (not findings)
    and those resolved on none; with the ladder, which of GRACE's parts helped, hurt or showed nothing; and what
    the controller did."""
    by = {r["method"]: r for r in rows}
    vs_qat = comparisons["GRACE - QAT only"]
    p = 100
    text = (f"INT4 GRACE scored {p * by['GRACE']['average']:.1f}% on the test split and {p * by['GRACE']['val']:.1f}% "
            f"on the validation split, QAT only {p * by['QAT only']['average']:.1f}% and "
            f"{p * by['QAT only']['val']:.1f}% (GRACE - QAT only, points with 95% interval over questions and "
            f"seeds: {_both(vs_qat)}).")
    found, partial, none = _findings(comparisons)
    text += (" Resolved the same way on both splits: " + "; ".join(found) + "." if found
             else " No comparison is resolved the same way on both splits.")
    if partial:
        text += " Resolved on one split only, so not a finding: " + "; ".join(partial) + "."
    if none:
        text += " No resolved difference on either split: " + "; ".join(none) + "."
    if ladder is not None:
        parts = {"helped": [], "hurt": [], "showed no resolved effect": []}
        for c in ladder["comparisons"].values():
            label = c["what"].split(" (")[0]
            verdicts = {c[split]["verdict"] for split in SPLITS}
            kind = ("helped" if verdicts == {"better"} else "hurt" if verdicts == {"worse"}
                    else "showed no resolved effect")
            parts[kind].append(label.lstrip("+ "))
        text += " On the ladder of GRACE's parts (each rung against the one above, both splits): " + "; ".join(
            f"{', '.join(v)} {k}" for k, v in parts.items() if v) + "."
    text += (f" GRACE's controller ({ctl['convention']}) moved beta from {ctl['beta_first']:.3f} to "
             f"{ctl['beta_last']:.3f} (EMA of GDKD {ctl['ema_gdkd_last']:.3f} at the end), the gate kept "
             f"{ctl['gate_mean']:.2f} of the tokens' distillation weight on average, and at the last step RCKA was "
             f"{ctl['rcka_last']:.3f} next to CE {ctl['ce_last']:.3f} and GDKD {ctl['gdkd_last']:.3f} "
             "(controller.png).")
    if quick:
        text = "Pipeline check only (--quick), these numbers mean nothing: " + text
    return text


# --- output ---------------------------------------------------------------------------------------------------

def _table(rows: list[dict], first: str = "method") -> list[str]:
    head = f"| {first} | weights | " + " | ".join(QUESTION_TYPES) + " | test average | val average | weight MB |"
    lines = [head, "|" + "---|" * (len(QUESTION_TYPES) + 5)]
    for r in rows:
        def cell(t, r=r):
            v, sd = 100 * r[t], 100 * r[f"{t}_sd"]
            return f"{v:.1f} ± {sd:.1f}" if len(r["seeds"]) > 1 else f"{v:.1f}"
        accs = " | ".join(cell(t) for t in QUESTION_TYPES)
        name = r.get("rung", r["method"])
        lines.append(f"| {name} | {r['weights']} | {accs} | {cell('average')} | {cell('val')} | "
                     f"{r['weight_mb']:.2f} |")
    return lines


def _comparison_lines(comparisons: dict) -> list[str]:
    return [f"- {key} ({c['what']}): {_both(c)}" for key, c in comparisons.items()]


def _report(result: dict) -> str:
    s = result["settings"]
    k = len(s["seeds"])
    n = result["n_questions"]
    lines = []
    if s["quick"]:
        lines += ["**Pipeline check (--quick): a few training steps per stage; these numbers mean nothing.**", ""]
    lines += [f"Accuracy in % (exact match, greedy decoding) on {result['n_eval_per_type']} test questions per "
              f"type ({n['test']} in all) and on {n['val']} validation questions drawn apart from them. Trained "
              f"rows: mean ± standard deviation over {k} seeds ({', '.join(map(str, s['seeds']))}), each run "
              f"{s['qat_steps']} steps from the FP32 student; the teacher, the student and RTN are one model each. "
              "Weight MB: every parameter and buffer of the model as served (the vision tower, projector, "
              "embeddings and LM head stay FP32; INT4 and INT8 layers count their packed weights and scales).", ""]
    lines += _table(result["rows"])
    lines += ["", f"Differences A - B in points, 95% interval of a paired bootstrap over questions and seeds "
                  f"({s['replicates']} replicates); \"better\" or \"worse\" only where the interval excludes zero:", ""]
    lines += _comparison_lines(result["comparisons"])
    if result.get("ablation"):
        lines += ["", "The ladder of GRACE's parts (the paper's Table 3): each rung adds one part to the rung above "
                      "(fixed beta until the controller's rung).", ""]
        lines += _table(result["ablation"]["rows"], first="rung")
        lines += [""] + _comparison_lines(result["ablation"]["comparisons"])
    lines += ["", result["conclusion"]]
    return "\n".join(lines)


def _machine() -> str:
    import platform

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"
