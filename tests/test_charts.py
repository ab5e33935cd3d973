"""Gradient-analysis panels: the data, the PNG (three labelled panels), the text fallback, plotext."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prune_core.charts import Panel, gradient_panels, panels_to_text, sparkline
from prune_core.diagnosis import diagnose, write_reports
from prune_core.visualize import INSTALL_HINT, build_figure, text_fallback_path, write_gradient_png
from sessions import Session
from tests.test_diagnosis import L, make_stats, make_summary, make_table


def seed_inputs():
    means = [1e-3] * L
    means[2] = 1e-3 / 2847.3
    stats = make_stats(means)
    stats["layer"]["min"][4] = 0.0  # not drawable on a log axis
    mlp = [0.2] * L
    mlp[2] = 0.99
    summary = make_summary(mlp=mlp)
    return stats, summary, make_table(summary)


def test_panels_hold_the_seed_series():
    stats, summary, table = seed_inputs()
    panels = gradient_panels(stats, "gradient", summary, table, extreme_rate=0.9)
    assert len(panels) == 3
    p1, p2, p3 = panels
    assert p1.log and p2.log and not p3.log
    assert list(p1.series) == ["mean", "std", "norm"]
    assert list(p2.series) == ["max", "min"]
    assert p1.series["mean"][2] == pytest.approx(1e-3 / 2847.3)
    assert math.isnan(p2.series["min"][4])  # 0 on a log panel → not drawn
    assert p1.xs() == list(range(L))
    names = list(p3.series)
    assert names == ["gradient norm / max", "importance / max", "attention pruning rate", "MLP pruning rate"]
    assert max(p3.series["gradient norm / max"]) == pytest.approx(1.0)
    assert p3.series["gradient norm / max"][2] == pytest.approx(1 / 2847.3)
    assert max(p3.series["importance / max"]) == pytest.approx(1.0)
    assert p3.series["MLP pruning rate"][2] == pytest.approx(0.99)
    assert p3.series["attention pruning rate"][0] == pytest.approx(0.25)
    assert p3.hlines == {"extreme rate": 0.9}
    xs, ys = p2.points("min")
    assert 4 not in xs and len(ys) == L - 1
    d = p3.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["x"] == list(range(L))


def test_activation_label_and_missing_inputs():
    panels = gradient_panels(make_stats(), "activation", None, None)
    assert panels[0].title.startswith("Activation norm")
    assert list(panels[2].series) == ["activation norm / max"]
    empty = gradient_panels({}, "gradient", None, None)
    assert len(empty) == 3 and all(len(v) == 0 for p in empty for v in p.series.values())


def test_png_has_three_labelled_panels(tmp_path: Path):
    pytest.importorskip("matplotlib")
    stats, summary, table = seed_inputs()
    panels = gradient_panels(stats, "gradient", summary, table, extreme_rate=0.9)
    fig = build_figure(panels)
    axes = fig.axes
    assert len(axes) == 3
    for ax, panel in zip(axes, panels, strict=True):
        assert ax.get_title() == panel.title
        assert ax.get_xlabel() == "layer"
        assert ax.get_ylabel() == panel.ylabel
        assert ax.get_yscale() == ("log" if panel.log else "linear")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert set(panel.series) <= set(legend)
    path = tmp_path / "visualization" / "gradient_analysis.png"
    assert write_gradient_png(panels, path) is None
    assert path.stat().st_size > 30_000
    from matplotlib import image

    img = image.imread(path)
    height, width = img.shape[:2]
    assert (width, height) == (1200, 1200)
    assert not text_fallback_path(path).exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_text_fallback_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stats, summary, table = seed_inputs()
    panels = gradient_panels(stats, "gradient", summary, table, extreme_rate=0.9)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    path = tmp_path / "visualization" / "gradient_analysis.png"
    message = write_gradient_png(panels, path)
    assert message is not None
    assert INSTALL_HINT in message and "pip install 'prune-workbench[charts]'" in message
    assert not path.exists()
    txt = text_fallback_path(path)
    assert txt == tmp_path / "visualization" / "gradient_analysis.txt"
    text = txt.read_text(encoding="utf-8")
    for panel in panels:
        assert panel.title in text
        for name in panel.series:
            assert name in text
    assert "2.847e+03" not in text  # values, not ratios
    assert "3.512e-07" in text  # layer 2's mean |g|
    assert "0.9900" in text  # layer 2's MLP rate


def test_sparkline_and_text_format():
    assert sparkline([1, 2, 3, math.nan]) == "▁▅█·"
    assert sparkline([1e-6, 1e-3, 1.0], log=True) == "▁▅█"
    assert sparkline([]) == ""
    text = panels_to_text([Panel("t", "y", False, {"a": [0.5, math.nan]})])
    assert "(1) t" in text and "0.5000" in text and "-" in text


def test_plotext_render_and_plot_panel():
    from cli.charts import plot_panel, render_panels

    stats, summary, table = seed_inputs()
    panels = gradient_panels(stats, "gradient", summary, table, extreme_rate=0.9)
    out = render_panels(panels, width=100, height=20, color=False)
    assert "\x1b[" not in out
    for panel in panels:
        assert panel.title in out
    assert "1e-03" in out and "1e-07" in out  # decade labels of the log panel
    assert "MLP pruning rate" in out

    from textual_plotext.plot import Plot  # the object PlotextPlot.plt is

    plt = Plot()
    plt.plotsize(80, 20)
    plot_panel(plt, panels[2])
    built = plt.build()
    assert "MLP pruning rate" in plt.uncolorize(built)


def test_load_panels_from_results_folder(tmp_path: Path):
    stats, summary, table = seed_inputs()
    s = Session()
    found = diagnose(stats=stats, stats_label="gradient", summary=summary, session=s)
    write_reports(tmp_path, findings=found, stats=stats, stats_label="gradient", summary=summary, table=table,
                  session=s)
    summary.to_csv(tmp_path / "analysis" / "pruning_summary_by_layer.csv", index=False)
    table.to_csv(tmp_path / "analysis" / "global_group_table.csv", index=False)
    import sessions
    from cli.charts import render_results_charts
    from prune_core.charts import panels_from_view
    from prune_core.report import RunReport

    sessions.save(s, tmp_path / "session.toml", extra_tables={"provenance": {"device": "cpu"}})
    (tmp_path / "metrics.json").write_text("{}")
    loaded = panels_from_view(RunReport.read(tmp_path))
    direct = gradient_panels(stats, "gradient", summary, table, extreme_rate=s.diagnosis.extreme_rate)
    assert [p.to_dict() for p in loaded] == [p.to_dict() for p in direct]

    # `prune show --charts`: the same panels from an opened results folder
    view = RunReport.read(tmp_path)
    assert [p.to_dict() for p in panels_from_view(view)] == [p.to_dict() for p in direct]
    text = render_results_charts(view, width=90, height=18, color=False)
    assert all(p.title in text for p in direct)


def test_prune_core_imports_no_ui_libraries():
    code = (
        "import sys\n"
        "import prune_core.diagnosis, prune_core.charts, prune_core.visualize, prune_core.compare, prune_core.fixes\n"
        "bad = [m for m in ('plotext', 'rich', 'textual', 'typer', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
        "raise SystemExit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
