import pytest

from fewer.report import tour
from fewer.report.tour import TourContext, discover_sections, markdown_table


def test_markdown_table_formats_and_unions_columns():
    text = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": "x"}], title="T")
    lines = text.strip().splitlines()
    assert lines[0] == "**T**" and lines[2] == "| a | b | c |"
    assert "| 1 | 0.1235 |  |" in text and "| 2 |  | x |" in text


def test_sections_are_ordered_and_well_formed():
    modules = discover_sections()
    orders = [m.ORDER for m in modules]
    assert orders == sorted(orders)
    for m in modules:
        assert isinstance(m.TITLE, str) and callable(m.run)


def test_tour_writes_report_and_reports_failing_parts(tmp_path, monkeypatch):
    import types

    good = types.SimpleNamespace(__name__="fewer.report.sections.good", ORDER=1, TITLE="Good",
                                 run=lambda ctx: ctx.add_table([{"x": 1}]))
    bad = types.SimpleNamespace(__name__="fewer.report.sections.bad", ORDER=2, TITLE="Bad",
                                run=lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(tour, "discover_sections", lambda: [good, bad])
    with pytest.raises(SystemExit, match="1 failed part"):
        tour.run_tour(tmp_path, device="cpu")
    report = (tmp_path / "README.md").read_text()
    assert "## Good" in report and "| x |" in report
    assert "This part failed" in report and "RuntimeError: boom" in report


def test_context_figure_is_written(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    ctx = TourContext(out_dir=tmp_path, device=torch.device("cpu"), scale="cpu")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = ctx.add_figure(fig, "line", "a line")
    assert path.exists() and path.stat().st_size > 0 and "![a line](line.png)" in ctx.markdown[-1]


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    from fewer.core import MissingDependency

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"fewer\[report\]"):
        tour.run_tour(tmp_path, device="cpu")
