"""``fewer distill``: dry run, a tiny end-to-end toy run writing its CSVs, and the tour section."""

import csv
import json

import pytest

from fewer.cli import main


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["distill", "digits", "--preset", "gpu", "--dry-run", "--seeds", "2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["testbed"] == "digits" and cfg["seeds"] == 2 and cfg["dit_dim"] == 128


def test_bad_lambda_sweep_is_rejected():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        main(["distill", "toy", "--lam-sweep", "0.1,-1", "--dry-run"])
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        main(["distill", "digits", "--lam", "-0.5", "--dry-run"])


def test_tiny_toy_run_writes_tables(tmp_path, capsys):
    rc = main(["distill", "toy", "--method", "rcm", "--seeds", "2", "--steps", "2", "--init-steps", "5",
               "--num-samples", "40", "--ref-steps", "5", "--batch-size", "16", "--teacher-steps", "5", "--student-steps", "1,2",
               "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "distill_toy.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["method"], r["steps"]) for r in rows}
    assert {("rcm", "1"), ("rcm", "2"), ("analytic teacher", "5")} <= got
    assert all(r["seeds"] == "2" for r in rows)
    assert (tmp_path / "distill_toy_samples.csv").exists()
    assert "| method |" in capsys.readouterr().out


def test_tour_section_writes_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import torch

    from fewer.report.sections import distill as section
    from fewer.report.tour import TourContext

    ctx = TourContext(out_dir=tmp_path, device=torch.device("cpu"), scale="cpu")
    section.run(ctx)
    text = "\n".join(ctx.markdown)
    assert "analytic teacher" in text and "energy distance to data" in text
    if (section.RESULTS / "distill_toy_samples.csv").exists():
        assert (tmp_path / "distill_toy_samples.png").exists()
