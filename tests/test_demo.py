"""``grace demo --quick``: every stage runs and writes its files, two fresh runs give the same results bit for
bit, a second run in the same directory reuses every trained stage, and ``--ablation`` adds the ladder of GRACE's
parts on top of the same runs."""

import dataclasses
import importlib
import json
import os

import pytest

from grace.cli import main
from grace.config import TrainConfig
from grace.demo.run import (
    BASELINES,
    COMPARISONS,
    FULL,
    LADDER,
    MAIN_ROWS,
    QUICK,
    RUNS,
    SPLITS,
    _conclusion,
    _train_cached,
    predicted_seconds,
    run_demo,
)

TRAINED = [n for n in MAIN_ROWS if n in RUNS]
VERDICTS = {"better", "worse", "no resolved difference"}


def _reproducible_part(out) -> dict:
    result = json.loads((out / "results.json").read_text())
    result.pop("timing")   # wall times and decode speed: the only fields allowed to differ
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRACE_KERNELS_BACKEND", "reference")   # kernels are parity-tested in their own files
    out = tmp_path_factory.mktemp("demo") / "a"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    yield out
    mp.undo()


def test_quick_demo_writes_table_plot_and_models(first_run):
    out = first_run
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == list(MAIN_ROWS)
    by_name = {r["method"]: r for r in result["rows"]}
    n_seeds = len(QUICK.seeds)
    for row in result["rows"]:
        assert 0.0 <= row["average"] <= 1.0 and 0.0 <= row["val"] <= 1.0 and row["weight_mb"] > 0
        assert len(row["seeds"]) == (n_seeds if row["method"] in RUNS else 1)
        assert row["weights"] == (RUNS[row["method"]][1] if row["method"] in RUNS else BASELINES[row["method"]])
    # served sizes: INT4 < INT8 < the FP32 student (and its FP32 continuations) < the teacher
    mb = {n: r["weight_mb"] for n, r in by_name.items()}
    assert mb["GRACE"] == mb["QAT only"] == mb["RTN (PTQ)"] < mb["GRACE (INT8)"] < mb["student"]
    assert mb["student"] < mb["teacher (larger)"]
    assert mb["student + CE (same steps)"] == mb["student + GRACE losses (unquantized)"] == mb["student"]
    n_q = {"test": 4 * QUICK.n_eval_per_type, "val": 4 * QUICK.n_val_per_type}
    assert result["n_questions"] == n_q
    for split in SPLITS:
        per_q = result["per_question"][split]
        assert len(per_q) == len(BASELINES) + len(TRAINED) * n_seeds
        assert all(len(v) == n_q[split] and set(v) <= {"0", "1"} for v in per_q.values())
    # the table's averages are the means over seeds of each run's accuracy on its per-question record
    for split, key in (("test", "average"), ("val", "val")):
        runs = [v for k, v in result["per_question"][split].items() if k.startswith("GRACE, seed")]
        assert by_name["GRACE"][key] == pytest.approx(sum(v.count("1") / n_q[split] for v in runs) / n_seeds)
    assert list(result["comparisons"]) == [f"{a} - {b}" for a, b, _ in COMPARISONS]
    for c in result["comparisons"].values():
        for split in SPLITS:
            assert c[split]["n_questions"] == n_q[split] and c[split]["n_seeds"] == n_seeds
            assert c[split]["lo"] <= c[split]["mean"] <= c[split]["hi"] and c[split]["verdict"] in VERDICTS
    assert result["ablation"] is None and not (out / "ablation.png").exists()
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(MAIN_ROWS)
    assert "| GRACE (INT8) | INT8 |" in table and "mean nothing" in table
    assert f"on {QUICK.n_eval_per_type} test questions per type" in table and "drawn apart from them" in table
    assert result["conclusion"].startswith("Pipeline check only (--quick)")
    assert "paper convention" in result["controller"]["convention"]
    assert os.path.getsize(out / "controller.png") > 1000
    # every trained student is exported as it would be served: INT4 and INT8 pack-quantized, FP32 plain
    bits = {}
    for name in TRAINED:
        config = json.loads((out / "models" / f"{RUNS[name][0]}-seed0" / "config.json").read_text())
        q = config.get("quantization_config")
        bits[name] = None if q is None else q["config_groups"]["group_0"]["weights"]["num_bits"]
        assert q is None or q["format"] == "pack-quantized"
    assert bits == {n: {"FP32": None, "INT4": 4, "INT8": 8}[RUNS[n][1]] for n in TRAINED}
    assert result["sample"]["truth"]
    stages = result["timing"]["stages"]   # each stage's wall time, in the order the counter shows them
    assert list(stages)[:3] == ["task", "teacher pretraining (FP32)", "student pretraining (FP32)"]
    assert len(stages) == 6 and all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= result["timing"]["seconds"] + 0.1 * len(stages)


def test_two_fresh_runs_give_the_same_results(first_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRACE_KERNELS_BACKEND", "reference")
    assert main(["demo", "--quick", "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert _reproducible_part(tmp_path / "b") == _reproducible_part(first_run)
    # what a user sees: a stage counter with a time estimate, bars labelled by stage, no transformers noise
    assert "stage 1/6: task (about" in captured.out and "stage 6/6: report" in captured.out
    assert "pipeline check" in captured.out and "ground truth" in captured.out
    assert "teacher pretraining (FP32)" in captured.err and "GRACE (INT8), seed 1" in captured.err
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert "quantize_model:" not in captured.out   # the trainer's messages go to each run's log.txt


def test_second_run_reuses_every_trained_stage(first_run, monkeypatch, capsys):
    monkeypatch.setenv("GRACE_KERNELS_BACKEND", "reference")
    before = _reproducible_part(first_run)
    assert main(["demo", "--quick", "--out", str(first_run), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("cached in") == 2 + len(TRAINED) * len(QUICK.seeds)
    assert _reproducible_part(first_run) == before


def test_conclusion_names_findings_only_where_both_splits_agree():
    def c(test, val):
        return {s: {"mean": m, "lo": m - 0.01, "hi": m + 0.01, "verdict": v}
                for s, (m, v) in zip(SPLITS, (test, val), strict=True)}

    up, down, flat = (0.05, "better"), (-0.05, "worse"), (0.0, "no resolved difference")
    rows = [{"method": "GRACE", "average": 0.8, "val": 0.79}, {"method": "QAT only", "average": 0.7, "val": 0.72}]
    comparisons = {"GRACE - QAT only": c(up, up), "GRACE - student": c(down, flat),
                   "QAT only - RTN (PTQ)": c(flat, flat), "GRACE (INT8) - GRACE": c(down, down)}
    ladder = {"comparisons": {"a": {**c(up, up), "what": "+ DKD (rung 2 - rung 1)"},
                              "b": {**c(up, flat), "what": "+ gate (rung 3 - rung 2)"},
                              "c": {**c(down, down), "what": "+ RCKA (rung 4 - rung 3)"}}}
    ctl = {"beta_first": 1.0, "beta_last": 0.5, "ema_gdkd_last": 0.2, "tau": 0.35, "gate_mean": 0.6,
           "rcka_last": 0.01, "ce_last": 0.3, "gdkd_last": 0.2, "convention": "paper convention: KD without T^2"}
    text = _conclusion(rows, comparisons, ladder, ctl, quick=False)
    assert "scored 80.0% on the test split and 79.0% on the validation split" in text
    assert "Resolved the same way on both splits: GRACE - QAT only: better; GRACE (INT8) - GRACE: worse." in text
    assert "Resolved on one split only, so not a finding: GRACE - student." in text
    assert "No resolved difference on either split: QAT only - RTN (PTQ)." in text
    assert "DKD helped; RCKA hurt; gate showed no resolved effect" in text
    assert "beta from 1.000 to 0.500" in text and "paper convention" in text and "Pipeline" not in text
    none = _conclusion(rows, {"GRACE - QAT only": c(flat, up)}, None, ctl, quick=True)
    assert none.startswith("Pipeline check only") and "No comparison is resolved the same way" in none
    assert "ladder" not in none


def test_a_run_interrupted_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    # Killed after logging steps but before any checkpoint: the trainer would refuse to resume it, so the demo,
    # which owns the directory, starts the run again; with a checkpoint it resumes (the directory is kept).
    seen = []
    monkeypatch.setattr(importlib.import_module("grace.train"), "train",
                        lambda cfg, **kw: seen.append(sorted(os.listdir(cfg.output_dir))))
    for checkpoint in (False, True):
        out = tmp_path / f"run-{checkpoint}"
        cfg = TrainConfig(output_dir=str(out), max_steps=4)
        out.mkdir()
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, resume=True))))
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        if checkpoint:
            (out / "checkpoint").mkdir()
        assert _train_cached(cfg, "run", progress=False) == (str(out / "final"), False)
    assert seen == [["log.txt"], ["checkpoint", "config.json", "log.txt", "metrics.jsonl"]]


def test_ablation_adds_the_ladder_on_the_same_runs(first_run, monkeypatch, capsys):
    # Last in this file: it adds the ladder's runs to first_run. Only the three middle rungs are new; QAT only and
    # GRACE are the main table's runs, and the main table does not change.
    monkeypatch.setenv("GRACE_KERNELS_BACKEND", "reference")
    before = _reproducible_part(first_run)
    assert main(["demo", "--quick", "--ablation", "--out", str(first_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("cached in") == 2 + len(TRAINED) * len(QUICK.seeds)
    after = _reproducible_part(first_run)
    assert after["rows"] == before["rows"] and after["comparisons"] == before["comparisons"]
    ladder = after["ablation"]
    assert [r["rung"] for r in ladder["rows"]] == [label for label, _ in LADDER]
    assert [r["method"] for r in ladder["rows"]] == [row for _, row in LADDER]
    assert list(ladder["comparisons"]) == [f"{LADDER[i][1]} - {LADDER[i - 1][1]}" for i in range(1, len(LADDER))]
    assert all(c[s]["verdict"] in VERDICTS for c in ladder["comparisons"].values() for s in SPLITS)
    table = (first_run / "results.md").read_text()
    assert "| + controller | INT4 |" in table and "ladder of GRACE's parts" in table
    assert os.path.getsize(first_run / "ablation.png") > 1000


def test_full_settings_fit_the_time_budget_with_margin():
    # grace demo must take at most 10 minutes on an idle 2-core machine and --ablation 30 (issue 27); the stage
    # costs of the calibrated table (measured under a light load) must leave a fifth of that as margin.
    assert predicted_seconds(FULL) <= 0.8 * 600
    assert predicted_seconds(FULL, ablation=True) <= 0.8 * 1800
    # the prediction grows with the work: more steps or another seed cost more
    assert predicted_seconds(dataclasses.replace(FULL, qat_steps=2 * FULL.qat_steps)) > predicted_seconds(FULL)
    assert predicted_seconds(dataclasses.replace(FULL, seeds=(*FULL.seeds, 99))) > predicted_seconds(FULL)


@pytest.mark.parametrize("bad", [{"seeds": ()}, {"seeds": (0, 0)}, {"threads": 0}, {"replicates": 99}])
def test_settings_that_cannot_run_are_refused_before_out_is_created(tmp_path, bad):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=f"settings.{next(iter(bad))} must be"):
        run_demo(str(out), dataclasses.replace(QUICK, **bad), progress=False)
    assert not out.exists()
