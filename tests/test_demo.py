"""``grace demo --quick``: every stage runs and writes its files; a second run reuses the cached stages."""

import json
import os

from grace.cli import main


def test_quick_demo_writes_table_plot_and_int4_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRACE_KERNELS_BACKEND", "reference")   # kernels are parity-tested in their own files
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["teacher (larger)", "student", "RTN (PTQ)", "QAT only", "QAT + naive KD", "GRACE"]
    for row in result["rows"]:
        assert 0.0 <= row["average"] <= 1.0 and row["weight_mb"] > 0
    by_name = {r["method"]: r for r in result["rows"]}
    # INT4 weights are smaller than the same student's FP32 weights, and equal across the INT4 methods
    assert by_name["GRACE"]["weight_mb"] < by_name["student"]["weight_mb"] < by_name["teacher (larger)"]["weight_mb"]
    assert by_name["GRACE"]["weight_mb"] == by_name["QAT only"]["weight_mb"]
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 7   # header + 6 methods
    assert "| GRACE | INT4 |" in table and table.splitlines()[0] in printed
    assert os.path.getsize(out / "controller.png") > 1000
    config = json.loads((out / "int4" / "grace" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert result["sample"]["truth"] and "ground truth" in printed

    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0   # second run: all stages cached
    assert capsys.readouterr().out.count("cached in") == 5
