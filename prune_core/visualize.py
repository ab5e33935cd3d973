"""Write the 3-panel gradient analysis chart: a matplotlib PNG, or a plain-text file without matplotlib.

matplotlib is the optional extra `prune-workbench[charts]`; it is imported lazily and used through its
object-oriented API with the Agg canvas (no pyplot, no global backend switch). Without it the same
panels go to `gradient_analysis.txt` next to the requested PNG path, and the returned message says how
to get the PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune_core.atomic import write_text, write_with
from prune_core.charts import Panel, panels_to_text

INSTALL_HINT = "pip install 'prune-workbench[charts]' (or pip install matplotlib)"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_figure(panels: Sequence[Panel], dpi: int = 100) -> Any:
    """A matplotlib Figure (Agg canvas) with one labelled subplot per panel, stacked vertically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4 * max(1, len(panels))), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes: Any = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=False):
        drawn = False
        for name in panel.series:
            if not panel.points(name)[1]:
                continue
            xs = panel.xs()
            # undrawable values (NaN, ≤ 0 on a log axis) become NaN: a visible gap, not a bridged line
            ys = [v if v is not None and math.isfinite(v) and (v > 0 or not panel.log) else math.nan
                  for v in panel.series[name]][: len(xs)]
            ax.plot(xs[: len(ys)], ys, marker="o", markersize=3, linewidth=1.4, label=name)
            drawn = True
        for i, (name, value) in enumerate(panel.hlines.items()):
            ax.axhline(value, linestyle="--", linewidth=1.0, color=f"C{7 + i}", label=name)
        if panel.log and drawn:
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        xs_all = panel.xs()
        if xs_all and len(xs_all) <= 40:
            ax.set_xticks(xs_all)
        ax.grid(True, which="major", alpha=0.3)
        if drawn or panel.hlines:
            ax.legend(loc="best", fontsize="small")
    return fig


def text_fallback_path(path: Path) -> Path:
    """Where the text charts go when the PNG cannot be drawn: gradient_analysis.png → .txt."""
    return Path(path).with_suffix(".txt")


def write_gradient_png(panels: Sequence[Panel], path: Path, *, dpi: int = 100) -> str | None:
    """Draw `panels` into the PNG at `path` (atomically) and return None.

    Without matplotlib, write the same charts as text to `text_fallback_path(path)` and return a message
    saying so and how to install the extra.
    """
    path = Path(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        txt = text_fallback_path(path)
        write_text(txt, panels_to_text(panels))
        return (f"matplotlib is not installed: wrote the charts as text to {txt}; "
                f"for {path.name}: {INSTALL_HINT}")
    fig = build_figure(panels, dpi)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    text_fallback_path(path).unlink(missing_ok=True)  # a stale fallback from an earlier run
    return None

