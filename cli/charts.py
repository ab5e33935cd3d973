"""Terminal charts of the gradient-analysis panels with plotext (`prune show --charts`, the TUI).

`plot_panel(plt, panel)` draws one `prune_core.charts.Panel` on anything with plotext's plotting API:
the `plotext` module itself or textual-plotext's `PlotextPlot.plt` (a plotext figure). It only adds
data and labels; the caller clears (`plt.clear_data()`) before redrawing. `render_panels()` builds the
three panels with the plotext module into one string for printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prune_core.charts import Panel

COLORS = ("cyan", "orange", "green", "magenta", "blue", "red")


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Decade ticks (in log10 units, as plotext plots them) and their labels 1e-05, 1e-04, ..."""
    a, b = math.floor(lo), math.ceil(hi)
    if b == a:
        b = a + 1
    step = max(1, (b - a + 5) // 6)
    ticks = [float(e) for e in range(a, b + 1, step)]
    return ticks, [f"1e{int(e):+03d}" for e in ticks]


def _linear_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], list[str]]:
    if not hi > lo:
        hi = lo + 1.0
    ticks = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return ticks, [f"{t:.3g}" for t in ticks]


def plot_panel(plt: Any, panel: Panel, *, markers: bool = True) -> None:
    """Draw `panel` on a plotext-like object (module or textual-plotext figure).

    Axis settings an earlier panel may have left on a reused figure (ticks, limits) are reset first;
    the data itself is not: call `plt.clear_data()` before redrawing.
    """
    plt.ylim()
    plt.title(panel.title)
    plt.xlabel(panel.xlabel)
    plt.ylabel(panel.ylabel)
    log_values: list[float] = []
    drawn = 0
    for i, name in enumerate(panel.series):
        xs, ys = panel.points(name)
        if not ys:
            continue
        if panel.log:
            # plotext's own log scale mislabels small values; plot log10 and label decades instead
            ys = [math.log10(y) for y in ys]
            log_values += ys
        plt.plot(xs, ys, label=name, color=COLORS[i % len(COLORS)], marker="braille" if markers else None)
        drawn += 1
    lin_values: list[float] = []
    if not panel.log:
        for name in panel.series:
            lin_values += panel.points(name)[1]
        for value in panel.hlines.values():
            plt.hline(value, "gray")
        if panel.hlines:  # plotext hlines carry no legend entry: name them in the title
            refs = ", ".join(f"{name} {value:g}" for name, value in panel.hlines.items())
            plt.title(f"{panel.title}  (── {refs})")
        lo, hi = panel.ylim if panel.ylim is not None else (
            (min(lin_values), max(lin_values)) if lin_values else (0.0, 1.0))
        if panel.ylim is not None:
            plt.ylim(lo, hi)
        # explicit ticks every time: a reused figure must not keep the previous panel's ticks
        plt.yticks(*_linear_ticks(lo, hi))
    else:
        ticks, labels = _log_ticks(min(log_values), max(log_values)) if log_values else ([0.0, 1.0], ["1e+00", "1e+01"])
        plt.ylim(ticks[0], ticks[-1])  # span whole decades so every tick label sits on the axis
        plt.yticks(ticks, labels)
    xs_all = panel.xs()
    if xs_all:
        step = max(1, -(-len(xs_all) // 32))
        plt.xticks(xs_all[::step])
    if not drawn:
        plt.title(f"{panel.title} (no data)")


def render_panels(panels: Sequence[Panel], *, width: int | None = None, height: int | None = None,
                  color: bool = True) -> str:
    """The panels one under the other as a string (plotext `build()`), optionally without ANSI colors."""
    import plotext as plt

    out: list[str] = []
    for panel in panels:
        plt.clear_figure()
        if width or height:
            plt.plotsize(width or 100, height or 20)
        if not color:
            plt.theme("clear")
        plot_panel(plt, panel)
        text = plt.build()
        out.append(plt.uncolorize(text) if not color else text)
    plt.clear_figure()
    return "\n".join(out)


def render_results_charts(view: Any, *, width: int | None = None, height: int | None = None,
                          color: bool = False) -> str:
    """The three panels of an opened results folder (a `prune_core.report.RunReport`) as a string.

    Plain text by default, safe to print through a Rich console with markup=False (Rich does not
    interpret raw ANSI codes in a str); with color=True wrap the result in `rich.text.Text.from_ansi`.
    """
    from prune_core.charts import panels_from_view

    if not getattr(view, "statistics", None):
        return "no gradient statistics in this results folder (analysis/gradient_statistics.json is missing)"
    return render_panels(panels_from_view(view), width=width, height=height, color=color)
