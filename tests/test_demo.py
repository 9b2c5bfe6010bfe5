"""``grace demo --quick``: every stage runs and writes its files, two fresh runs give the same results bit for
bit, and a second run in the same directory reuses every trained stage."""

import json
import os

import pytest

from grace.cli import main
from grace.demo.run import INT4_METHODS, QUICK, _conclusion, _interval, _t95

METHODS = ["teacher (larger)", "student", "RTN (PTQ)", *INT4_METHODS]


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


def test_quick_demo_writes_table_plot_and_int4_model(first_run, capsys):
    out = first_run
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == METHODS
    by_name = {r["method"]: r for r in result["rows"]}
    n_seeds = len(QUICK.seeds)
    for row in result["rows"]:
        assert 0.0 <= row["average"] <= 1.0 and row["weight_mb"] > 0
        assert len(row["seeds"]) == (n_seeds if row["method"] in INT4_METHODS else 1)
    # INT4 weights are smaller than the same student's FP32 weights, and equal across the INT4 methods
    assert by_name["GRACE"]["weight_mb"] < by_name["student"]["weight_mb"] < by_name["teacher (larger)"]["weight_mb"]
    assert by_name["GRACE"]["weight_mb"] == by_name["QAT only"]["weight_mb"] == by_name["RTN (PTQ)"]["weight_mb"]
    n_questions = 4 * QUICK.n_eval_per_type
    assert len(result["per_question"]) == 3 + len(INT4_METHODS) * n_seeds
    assert all(len(v) == n_questions and set(v) <= {"0", "1"} for v in result["per_question"].values())
    # the table's average is the mean over seeds of each run's accuracy on its per-question record
    grace_runs = [v for k, v in result["per_question"].items() if k.startswith("GRACE, seed")]
    assert by_name["GRACE"]["average"] == pytest.approx(sum(v.count("1") / n_questions for v in grace_runs) / n_seeds)
    assert result["comparisons"]["GRACE - QAT only"]["n"] == n_seeds
    assert result["comparisons"]["GRACE - student (FP32)"]["n"] == n_questions
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 7   # header + 6 methods
    assert "| GRACE | INT4 |" in table and "mean nothing" in table
    assert f"on {QUICK.n_eval_per_type} held-out questions per type" in table
    assert result["conclusion"].startswith("Pipeline check only (--quick)")
    assert os.path.getsize(out / "controller.png") > 1000
    config = json.loads((out / "int4" / "grace-seed0" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert result["sample"]["truth"]
    stages = result["timing"]["stages"]   # each stage's wall time, in the order the counter shows them
    assert list(stages)[:3] == ["task", "teacher pretraining (FP32)", "student pretraining (FP32)"]
    assert len(stages) == 6 and all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= result["timing"]["seconds"] + 0.1 * len(stages)


def test_two_fresh_runs_give_the_same_results(first_run, tmp_path, capsys, reference_backend):
    assert main(["demo", "--quick", "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert _reproducible_part(tmp_path / "b") == _reproducible_part(first_run)
    # what a user sees: a stage counter with a time estimate, bars labelled by stage, no transformers noise
    assert "stage 1/6: task (about" in captured.out and "stage 6/6: report" in captured.out
    assert "pipeline check" in captured.out and "ground truth" in captured.out
    assert "teacher pretraining (FP32)" in captured.err and "INT4 GRACE, seed 1" in captured.err
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert "quantize_model:" not in captured.out   # the trainer's messages go to each run's log.txt


def test_second_run_reuses_every_trained_stage(first_run, capsys, reference_backend):
    before = _reproducible_part(first_run)
    assert main(["demo", "--quick", "--out", str(first_run), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("cached in") == 2 + len(INT4_METHODS) * len(QUICK.seeds)
    assert _reproducible_part(first_run) == before


def test_interval_and_conclusion_follow_the_numbers():
    assert _t95(2) == pytest.approx(4.303) and _t95(1000) == pytest.approx(1.96)
    assert _t95(12) == _t95(10) > _t95(15)   # between tabulated values: the wider interval
    c = _interval([0.10, 0.12, 0.14])
    half = 4.303 * 0.02 / 3 ** 0.5
    assert c["mean"] == pytest.approx(0.12) and c["lo"] == pytest.approx(0.12 - half) and c["n"] == 3
    rows = [{"method": "GRACE", "average": 0.8}, {"method": "QAT only", "average": 0.7},
            {"method": "student", "average": 0.85}]
    ctl = {"beta_first": 1.0, "beta_last": 0.5, "ema_gdkd_last": 0.2, "tau": 0.35, "gate_mean": 0.6,
           "rcka_last": 0.01, "ce_last": 0.3, "gdkd_last": 0.2}
    lower = {"mean": -0.05, "lo": -0.08, "hi": -0.02, "n": 800}
    text = _conclusion(rows, {"GRACE - QAT only": c, "GRACE - student (FP32)": lower}, ctl, quick=False)
    assert "over 3 seeds: better" in text and "over 800 questions: worse" in text and "did not beat" not in text
    tie = {"mean": 0.01, "lo": -0.03, "hi": 0.05, "n": 3}
    text = _conclusion(rows, {"GRACE - QAT only": tie, "GRACE - student (FP32)": lower}, ctl, quick=False)
    assert "not distinguishable" in text and "GRACE did not beat QAT only" in text
    assert "beta from 1.000 to 0.500" in text
