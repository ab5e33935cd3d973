"""Chart data for the 3-panel gradient analysis (seed 002), independent of any plotting library.

`gradient_panels()` turns per-layer statistics, the per-layer pruning summary and the group table into
three `Panel`s — (1) per-layer mean / std / norm (log scale), (2) per-layer max / min (log scale),
(3) normalized statistic, normalized importance and the attention / MLP pruning rates — which three
renderers draw: `prune_core.visualize` (matplotlib PNG, or a plain-text fallback built with
`panels_to_text()` here), `cli.charts` (plotext, terminal) and the TUI (textual-plotext).
Missing values are NaN; on log panels non-positive values are NaN too (renderers skip them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from prune_core.diagnosis import Stats, num_layers, primary_block

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Panel:
    """One chart: per-layer series sharing a y axis."""

    title: str
    ylabel: str
    log: bool
    series: dict[str, list[float]]
    x: list[int] = field(default_factory=list)   # layer indices; empty = 0..n-1
    xlabel: str = "layer"
    hlines: dict[str, float] = field(default_factory=dict)  # named horizontal reference lines
    ylim: tuple[float, float] | None = None                 # fixed y range (the normalized panel: 0..1.05)

    def xs(self) -> list[int]:
        n = max((len(v) for v in self.series.values()), default=0)
        return list(self.x) if self.x else list(range(n))

    def points(self, name: str) -> tuple[list[int], list[float]]:
        """(x, y) of one series without the values a renderer cannot draw (NaN; ≤ 0 on log panels)."""
        xs: list[int] = []
        ys: list[float] = []
        for x, y in zip(self.xs(), self.series[name], strict=False):
            if y is None or not math.isfinite(y) or (self.log and y <= 0):
                continue
            xs.append(x)
            ys.append(float(y))
        return xs, ys

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return float(v) if v is not None and math.isfinite(v) else None

        return {"title": self.title, "ylabel": self.ylabel, "xlabel": self.xlabel, "log": self.log,
                "x": self.xs(), "series": {k: [clean(v) for v in vals] for k, vals in self.series.items()},
                "hlines": dict(self.hlines), "ylim": list(self.ylim) if self.ylim else None}


def _vals(values: Sequence[Any] | None, n: int, log: bool = False) -> list[float]:
    out: list[float] = []
    for v in list(values or [])[:n]:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f) or (log and f <= 0):
            f = math.nan
        out.append(f)
    return out + [math.nan] * (n - len(out))


def _scaled(values: list[float]) -> list[float]:
    """values / max (or min–max scaled when some are negative); NaN kept."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return list(values)
    lo, hi = min(finite), max(finite)
    if lo >= 0:
        return [v / hi if hi > 0 else (0.0 if math.isfinite(v) else v) for v in values]
    span = hi - lo
    return [(v - lo) / span if span > 0 else 0.0 for v in values]


def _rates_from_table(table: pd.DataFrame, n: int) -> dict[str, list[float]]:
    out = {}
    for block in ("attention", "mlp"):
        rows = table[table["group_type"] == block]
        grouped = rows.groupby("layer_idx")["pruned"].mean() if len(rows) else pd.Series(dtype=float)
        out[block] = [float(grouped.get(layer, math.nan)) for layer in range(n)]
    return out


def gradient_panels(stats: Stats, stats_label: str, summary: pd.DataFrame | None,
                    table: pd.DataFrame | None, *, extreme_rate: float | None = None) -> list[Panel]:
    """The seed's three panels as data. `stats_label` is "gradient" or "activation" (wanda)."""
    from prune_core.importance.registry import stats_noun

    stats = stats or {}
    noun = stats_noun(stats_label).capitalize()
    n = num_layers(stats)
    if summary is not None and len(summary):
        n = max(n, int(pd.to_numeric(summary["layer_idx"]).max()) + 1)
    if table is not None and len(table):
        n = max(n, int(pd.to_numeric(table["layer_idx"]).max()) + 1)
    block = primary_block(stats) or "layer"
    blk = stats.get(block, {})
    which = "" if block == "layer" else f" ({block})"
    x = list(range(n))

    p1 = Panel(title=f"{noun} statistics per layer{which}", ylabel=f"|{noun.lower()}| (log)", log=True,
               series={s: _vals(blk.get(s), n, log=True) for s in ("mean", "std", "norm")}, x=x)
    p2 = Panel(title=f"{noun} range per layer{which}", ylabel=f"|{noun.lower()}| (log)", log=True,
               series={s: _vals(blk.get(s), n, log=True) for s in ("max", "min")}, x=x)

    series: dict[str, list[float]] = {
        (f"{noun.lower()} / max" if noun.lower().endswith("norm") else f"{noun.lower()} norm / max"):
            _scaled(_vals(blk.get("norm"), n)),
    }
    if table is not None and len(table) and "importance" in table:
        imp = pd.to_numeric(table["importance"], errors="coerce").groupby(table["layer_idx"]).mean()
        series["importance / max"] = _scaled([float(imp.get(layer, math.nan)) for layer in range(n)])
    rates: dict[str, list[float]] = {}
    if summary is not None and len(summary):
        by_layer = summary.set_index("layer_idx")
        for b in ("attention", "mlp"):
            col = f"{b}_rate"
            rates[b] = [float(by_layer[col].get(layer, math.nan)) if col in by_layer else math.nan
                        for layer in range(n)]
    elif table is not None and len(table) and "pruned" in table:
        rates = _rates_from_table(table, n)
    if rates:
        series["attention pruning rate"] = _vals(rates.get("attention"), n)
        series["MLP pruning rate"] = _vals(rates.get("mlp"), n)
    hlines = {"extreme rate": float(extreme_rate)} if extreme_rate is not None else {}
    p3 = Panel(title=f"{noun} vs importance vs pruning rate", ylabel="fraction (normalized)", log=False,
               series=series, x=x, hlines=hlines, ylim=(0.0, 1.05))
    return [p1, p2, p3]


def panels_from_view(report: Any) -> list[Panel]:
    """The panels of a run (a `prune_core.report.RunReport`: stats, summary, table, session)."""
    extreme = ((getattr(report, "diagnosis", None) or {}).get("thresholds") or {}).get("extreme_rate")
    if extreme is None and getattr(report, "session", None) is not None:
        extreme = report.session.diagnosis.extreme_rate
    return gradient_panels(report.stats, report.stats_label, report.summary, report.table, extreme_rate=extreme)


# ------------------------------------------------------------------------------------------ text output


def sparkline(values: Sequence[float], log: bool = False) -> str:
    """One character per value (▁..█), '·' for a missing one; log panels are scaled in log10."""
    vals = [(math.log10(v) if v > 0 else math.nan) if log else v
            for v in (float(x) if x is not None else math.nan for x in values)]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return "·" * len(vals)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("·")
        else:
            k = round((v - lo) / span * (len(SPARK) - 1)) if span > 0 else len(SPARK) // 2
            out.append(SPARK[k])
    return "".join(out)


def _cell(v: float, log: bool) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if log or v == 0 or abs(v) < 1e-2 or abs(v) >= 1e4:
        return f"{v:.3e}" if v != 0 else "0"
    return f"{v:.4f}"


def panels_to_text(panels: Sequence[Panel]) -> str:
    """The panels as plain text: per series a sparkline with its range, then a table per layer."""
    blocks: list[str] = []
    for i, panel in enumerate(panels, 1):
        lines = [f"({i}) {panel.title}" + ("  [log scale]" if panel.log else ""),
                 f"    y: {panel.ylabel}   x: {panel.xlabel}"]
        names = list(panel.series)
        width = max((len(nm) for nm in names), default=4)
        for name in names:
            vals = panel.series[name]
            finite = [v for v in vals if v is not None and math.isfinite(v) and (v > 0 or not panel.log)]
            rng = f"{_cell(min(finite), panel.log)} .. {_cell(max(finite), panel.log)}" if finite else "no data"
            lines.append(f"    {name:<{width}}  {sparkline(vals, panel.log)}  {rng}")
        for name, value in panel.hlines.items():
            lines.append(f"    {name:<{width}}  = {value:g}")
        header = ["layer", *names]
        rows = [[str(x)] + [_cell(panel.series[nm][j] if j < len(panel.series[nm]) else math.nan, panel.log)
                            for nm in names] for j, x in enumerate(panel.xs())]
        widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in enumerate(header)]
        lines.append("")
        lines.append("    " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            lines.append("    " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
