"""The per-layer allocation table (DataTable), with the previous allocation's rates beside it."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from tui.estimate import human_count
from tui.results_model import AllocationView


def _pct(rate: float) -> str:
    return f"{100 * rate:5.1f}%"


def _right(text: str) -> Text:
    return Text(text, justify="right")


def _delta(new: float, old: float | None) -> Text:
    if old is None:
        return Text("")
    d = 100 * (new - old)
    if abs(d) < 0.05:
        return Text("=", style="dim", justify="right")
    return Text(f"{d:+.1f}", style="bold" if abs(d) >= 10 else "", justify="right")


class AllocationTable(DataTable):
    """One row per decoder layer: groups pruned / total and rate for attention and MLP."""

    DEFAULT_CSS = """
    AllocationTable { height: 1fr; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True

    def show(self, current: AllocationView | None, previous: AllocationView | None = None) -> None:
        key = (current, previous)
        if key == getattr(self, "_shown", None):
            return
        self._shown = key
        self.clear(columns=True)
        with_prev = previous is not None and bool(previous.rows)
        columns = ["layer", "attn", "attn %", "mlp", "mlp %", "params after"]
        if with_prev:
            columns[3:3] = ["Δ attn"]
            columns[6:6] = ["Δ mlp"]
        for name in columns:
            self.add_column(name, key=name)
        if current is None:
            return
        prev = {r.layer: r for r in previous.rows} if with_prev and previous is not None else {}
        for r in current.rows:
            p = prev.get(r.layer)
            cells: list[str | Text] = [
                _right(str(r.layer)),
                _right(f"{r.attention_pruned}/{r.attention_groups}"),
                _right(_pct(r.attention_rate)),
                _right(f"{r.mlp_pruned}/{r.mlp_groups}"),
                _right(_pct(r.mlp_rate)),
                _right(human_count(r.params_after)),
            ]
            if with_prev:
                cells[3:3] = [_delta(r.attention_rate, p.attention_rate if p else None)]
                cells[6:6] = [_delta(r.mlp_rate, p.mlp_rate if p else None)]
            self.add_row(*cells, key=str(r.layer))
        self.refresh(layout=True)
