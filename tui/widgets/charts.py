"""Per-layer charts drawn with textual-plotext: live importance statistics and pruning rates.

`LayerStatsChart` takes `BatchDone.layer_stats` as often as they arrive but rebuilds the plot at most
every `interval` seconds (coalescing), so a fast importance pass cannot starve the event loop.
"""

from __future__ import annotations

import math
from typing import ClassVar

from textual.app import RenderResult
from textual_plotext import PlotextPlot

from prune_core.events import LayerStats
from tui.results_model import AllocationView

STATS = ("norm", "mean", "std", "max")
ATTN_COLOR = (95, 175, 215)   # xterm-256 colour 74
MLP_COLOR = (215, 175, 95)    # xterm-256 colour 179
# attention and MLP differ by glyph too, so they stay apart under NO_COLOR and 16 colours
ATTN_MARKER = "hd"            # solid half-block bars
MLP_MARKER = "▒"              # shaded bars
MARKERS = {"attention": ATTN_MARKER, "mlp": MLP_MARKER}
BLOCKS = ("attention", "mlp")


def _positive(values: list[float]) -> list[float]:
    """Log scale needs positive values: replace zeros, NaN and negatives by a floor below the data."""
    good = [v for v in values if isinstance(v, int | float) and math.isfinite(v) and v > 0]
    floor = min(good) / 10 if good else 1e-12
    return [v if isinstance(v, int | float) and math.isfinite(v) and v > 0 else floor for v in values]


def _ticks(ticks: list[int], rows: int) -> list[int]:
    """Ticks at least two plot rows apart, always keeping the last one.

    plotext resolves labels that land on the same row differently from run to run, so a chart that
    must look the same every time (snapshots, tmux captures) never gives it two labels for one row.
    """
    most = max(2, (max(rows, 1) - 1) // 2 + 1)
    if len(ticks) <= most:
        return ticks
    step = -(-(len(ticks) - 1) // (most - 1))
    return ticks[::-step][::-1]


class _ReplottedChart(PlotextPlot):
    """A plotext chart rebuilt from scratch on every render (plotext keeps state between builds)."""

    redraws = 0  # times the plot was asked to rebuild

    def render(self) -> RenderResult:
        # each frame re-plots from scratch: same input, same output
        self._replot()
        return super().render()

    def _draw(self) -> None:
        self.redraws += 1
        self.refresh()

    def _replot(self) -> None:
        raise NotImplementedError


class LayerStatsChart(_ReplottedChart):
    """Gradient (or activation) statistic per decoder layer, log scale, for one block type."""

    DEFAULT_CSS = """
    LayerStatsChart { height: 1fr; min-height: 6; }
    """
    interval: ClassVar[float] = 0.5

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.stat = "norm"
        self.block = "attention"
        self.label = "gradient"
        self.stats: LayerStats | None = None
        self.received = 0   # update_stats calls (BatchDone data handed to the chart)
        self.redraws = 0    # times the plot was rebuilt
        self.note = "waiting for the first batch"  # shown while there are no statistics
        self._dirty = False

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(self.interval, self._tick, name="chart-throttle")
        self._draw()

    def update_stats(self, stats: LayerStats | None, label: str = "gradient", now: bool = False) -> None:
        """Hand over new statistics; the plot is rebuilt on the next throttle tick (or now)."""
        if stats is None:
            return
        self.stats = stats
        self.label = label
        self.received += 1
        self._dirty = True
        if now:
            self._tick()

    def clear(self, note: str = "waiting for the first batch") -> None:
        """Drop the statistics shown (a new run, a failed one) and say why the chart is empty."""
        if self.stats is None and self.note == note:
            return
        self.stats, self.note = None, note
        self._dirty = True
        self._tick()

    def set_view(self, stat: str | None = None, block: str | None = None) -> None:
        if stat is not None:
            self.stat = stat
        if block is not None:
            self.block = block
        self._dirty = True
        self._tick()

    def cycle_stat(self) -> str:
        self.set_view(stat=STATS[(STATS.index(self.stat) + 1) % len(STATS)] if self.stat in STATS else STATS[0])
        return self.stat

    def toggle_block(self) -> str:
        self.set_view(block=BLOCKS[(BLOCKS.index(self.block) + 1) % len(BLOCKS)] if self.block in BLOCKS else BLOCKS[0])
        return self.block

    def _tick(self) -> None:
        if self._dirty and self.is_mounted:
            self._dirty = False
            self._draw()

    def _replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        title = f"{self.label} {self.stat} per layer · {self.block} · log"
        values = ((self.stats or {}).get(self.block) or {}).get(self.stat) or []
        if values:
            ys = _positive([float(v) if v is not None else float("nan") for v in values])
            xs = list(range(len(ys)))
            # log scale done here (plotext's own log scale re-applies itself on every re-render)
            logs = [math.log10(v) for v in ys]
            lo = math.floor(min(logs) - 1e-9)
            hi = max(lo + 1, math.ceil(max(logs)))
            plt.bar(xs, logs, marker=MARKERS.get(self.block, ATTN_MARKER),
                    color=ATTN_COLOR if self.block == "attention" else MLP_COLOR, minimum=lo)
            decades = _ticks(list(range(lo, hi + 1)), self.size.height - 5)
            plt.yticks(decades, [f"1e{k}" for k in decades])
            plt.ylim(lo, hi)
            plt.xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 8)])
        else:
            title += f" · {self.note}"
        plt.title(title)
        plt.xlabel("layer")


class RatesChart(_ReplottedChart):
    """Pruned share per layer for attention and MLP (grouped bars) of one allocation."""

    DEFAULT_CSS = """
    RatesChart { height: 1fr; min-height: 6; }
    """

    def __init__(self, title: str = "pruned % per layer", *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.current: AllocationView | None = None
        self.redraws = 0

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def show(self, current: AllocationView | None) -> None:
        self.current = current
        if self.is_mounted:
            self._draw()

    def _replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        cur = self.current
        if cur is None or not cur.rows:
            plt.title(f"{self.title} · none yet")
        else:
            xs = [r.layer for r in cur.rows]
            plt.multiple_bar(xs, [[100 * r.attention_rate for r in cur.rows], [100 * r.mlp_rate for r in cur.rows]],
                             labels=["attn █", "mlp ▒"], marker=[ATTN_MARKER, MLP_MARKER],
                             color=[ATTN_COLOR, MLP_COLOR])
            plt.ylim(0, 100)
            plt.yticks(_ticks([0, 25, 50, 75, 100], self.size.height - 4))
            plt.xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 8)])
            plt.title(f"{self.title} · target {cur.target_ratio:.0%} · achieved {cur.achieved_ratio:.1%}")
