"""``--help`` explains every option (its field's documentation, choices, required, what 0 or none means), and
an explicit ``none`` on the command line reaches the configuration (``--bits none`` trains in full precision)."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from grace.cli import build_parser
from grace.config import FIELD_CHOICES, PRESETS, TrainConfig, field_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grace(*argv, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grace", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_train_config_field_is_documented():
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert missing == [], f"TrainConfig fields without a docstring under them: {missing}"
    assert docs["save_every"].startswith("Write a checkpoint every N optimizer steps")


def test_train_help_shows_each_fields_documentation_choices_defaults_and_required():
    proc = _grace("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())   # argparse wraps lines: compare with whitespace collapsed
    for name, doc in field_docs().items():
        assert doc.split(":")[0][:40] in text, f"--{name}'s documentation is not in --help"
    assert "--kd-type {dkd,kl}" in text and "--bits {4,8,none}" in text and "--init-method {percentile,mse}" in text
    assert "(0: only at the end)" in text                        # what 0 means
    assert "(default: 0.35; --preset released: 3.0)" in text      # tau under each preset
    options = text.split("options:")[1]
    assert "[required]" in options.split("--student STUDENT")[1].split("--data")[0]
    assert "[required]" in options.split("--data DATA")[1].split("--image-folder")[0]
    assert "[required]" not in options.split("--teacher TEACHER")[1].split("--student")[0]


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export", "plan", "demo", "lsq-demo", "info"])
def test_every_option_of_every_command_has_help(command):
    parser = _subparsers()[command]
    bare = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert bare == [], f"grace {command}: options without help: {bare}"
    text = parser.format_help().split("options:")[1]
    for action in parser._actions:
        shown = action.default not in (None, argparse.SUPPRESS, False, "")
        if shown and action.option_strings and command != "train":
            flag = action.option_strings[0]
            entry = text.split(f"  {flag}", 1)[1].split("\n  -")[0]
            assert "default" in entry, f"grace {command} {flag}: default hidden"


def test_choices_are_the_ones_validate_accepts():
    for name, choices in FIELD_CHOICES.items():
        for value in choices:
            TrainConfig(**{name: value}).validate(check_paths=False)
    assert set(FIELD_CHOICES["preset"]) == set(PRESETS)


@pytest.mark.parametrize("argv, says", [
    (["--lr", "none"], "argument --lr: none is not allowed here"),   # only fields that may be None take none
    (["--bits", "3"], "argument --bits: invalid choice"),
    (["--kd-type", "mse"], "argument --kd-type: invalid choice"),
])
def test_bad_values_are_refused_by_the_parser_naming_the_option(argv, says):
    proc = _grace("train", "--student", "s", "--data", "d.json", *argv)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bits_none_on_the_command_line_trains_full_precision(tmp_path, color_task, tiny_pair):
    """`--bits none` (the paper's Table 1, full-precision distillation) reaches the run's configuration; before,
    every option whose value parsed to None was dropped and the run trained INT4."""
    data, img = color_task(tmp_path, 2)
    teacher, student = tiny_pair(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "GRACE_KERNELS_BACKEND": "reference"}
    proc = _grace("train", "--teacher", teacher, "--student", student, "--data", data, "--image-folder", img,
                  "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
                  "--bits", "none", "--scale-lr", "none", "--num-workers", "0", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["bits"] is None and saved["scale_lr"] is None
    from safetensors import safe_open

    weights = [os.path.join(out, "final", f) for f in os.listdir(out / "final") if f.endswith(".safetensors")]
    keys = [k for w in weights for k in safe_open(w, "pt").keys()]
    assert keys and not any("log_scale" in k for k in keys), "a full-precision run saved LSQ scales"
