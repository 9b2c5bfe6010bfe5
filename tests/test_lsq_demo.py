import json

from grace.cli import main
from grace.demo.lsq import run_lsq_demo


def test_training_the_scales_improves_on_their_initialisation(reference_backend):
    s = run_lsq_demo(out_features=128, in_features=256, steps=60, progress=False)
    r = s["output_sqnr_db"]
    assert r["lsq_trained"] > r["lsq_init_p99"] + 1.0
    assert all(v > 5.0 for v in r.values())  # every INT4 variant is far from noise


def test_cli_writes_summary(tmp_path, capsys, reference_backend):
    assert main(["lsq-demo", "--out", str(tmp_path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "| lsq_trained |" in out
    assert json.loads((tmp_path / "lsq_demo.json").read_text())["steps"] == 5
    assert main(["lsq-demo", "--steps", "-1"]) == 2
