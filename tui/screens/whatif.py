"""The what-if panel: change ratio, normalization, clipping, T/tau or rate limits and see the new
per-layer allocation at once, next to the previous one. Importance is reused: the panel posts a
`WhatIfRequested` with the changed session and the app re-allocates in its engine worker."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Select, Static

from sessions import SessionError
from tui.estimate import human_count
from tui.messages import WhatIfRequested
from tui.results_model import AllocationView, ResultsData
from tui.state import WorkbenchState
from tui.widgets.charts import RatesChart
from tui.widgets.fields import FieldRow, FieldSpec

WHATIF_FIELDS = (
    FieldSpec("pruning.ratio", "ratio", "float"),
    FieldSpec("normalization.level", "normalize", "choice"),
    FieldSpec("normalization.method", "method", "choice"),
    FieldSpec("pruning.blocks", "blocks", "choice"),
    FieldSpec("pruning.allocation", "budget", "choice"),
    FieldSpec("normalization.clip", "clip %", "floats", placeholder="none"),
    FieldSpec("correction.temperature", "T", "float"),
    FieldSpec("correction.tau", "tau", "float"),
    FieldSpec("pruning.min_rate", "min rate", "float"),
    FieldSpec("pruning.max_rate", "max rate", "float"),
)
DEBOUNCE_S = 0.6


def compare_text(cur: AllocationView | None, prev: AllocationView | None) -> Text:
    text = Text()
    if cur is None:
        return Text("No allocation yet.", style="dim")
    text.append(f"target {cur.target_ratio:.1%} · achieved {cur.achieved_ratio:.1%}", style="bold")
    text.append(f" · removes {human_count(cur.removed)} of {human_count(cur.prunable)}")
    if cur.proxy is not None:
        dense = f" (dense {cur.dense_proxy:.4f})" if cur.dense_proxy is not None else ""
        text.append(f" · proxy loss {cur.proxy:.4f}{dense}")
        if cur.final_proxy is not None:
            text.append(f" · saved model {cur.final_proxy:.4f}")
    text.append("\n")
    if prev is not None:
        text.append(f"previous: target {prev.target_ratio:.1%} · achieved {prev.achieved_ratio:.1%} · "
                    f"removes {human_count(prev.removed)}", style="dim")
    else:
        text.append("previous: none yet (change a value to compare)", style="dim")
    if not cur.reachable:
        text.append(f"\n{cur.message or 'target not reachable under the limits'}", style="yellow")
    elif cur.ratio_gap():
        text.append(f"\n(!) {cur.ratio_gap()}", style="yellow")
    return text


class WhatIfPanel(Horizontal):
    """Controls on the left, the new vs previous per-layer rates on the right."""

    def __init__(self, state: WorkbenchState, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state = state

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="whatif-form"):
            yield Static("Tab enters the form; Enter applies; selects at once.", classes="hint")
            for spec in WHATIF_FIELDS:
                yield FieldRow(spec, None)
        with Vertical(id="whatif-view"):
            yield RatesChart("new", id="whatif-chart")
            yield RatesChart("previous", id="whatif-previous")
            yield Static("", id="whatif-summary")

    def on_mount(self) -> None:
        self._timer: Any = None
        self._loading = False
        self.load_values()

    def load_values(self) -> None:
        """Show the current session's values in the controls (without triggering an apply)."""
        self._loading = True
        data = self.state.session.model_dump()
        for row in self.query(FieldRow):
            section, _, key = row.spec.key.partition(".")
            row.set_value(data[section][key])
            row.set_error(None)
        self.call_after_refresh(self._done_loading)

    def _done_loading(self) -> None:
        self._loading = False

    def show(self, results: ResultsData | None) -> None:
        cur = results.allocation if results else None
        prev = results.previous if results else None
        self.query_one("#whatif-chart", RatesChart).show(cur)
        self.query_one("#whatif-previous", RatesChart).show(prev)
        summary = compare_text(cur, prev)
        if results is not None and results.from_folder and not self.state.engine_ready:
            summary.append("\nfirst change loads the model and cached importance (a few seconds)", style="dim")
        self.query_one("#whatif-summary", Static).update(summary)

    def updates(self) -> dict[str, Any]:
        return {row.spec.key: row.get_value() for row in self.query(FieldRow)}

    def apply(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        current = self.state.session
        try:
            new = current.with_updates(self.updates())
        except SessionError as exc:
            problems = dict(exc.problems)
            for row in self.query(FieldRow):
                row.set_error(row.format_problem() or problems.get(row.spec.key))
            return
        for row in self.query(FieldRow):
            row.set_error(None)
        if new != current:
            self.post_message(WhatIfRequested(new))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.apply()

    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        event.stop()
        if self._loading:
            return
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(DEBOUNCE_S, self.apply)

    @on(Select.Changed)
    def _selected(self, event: Select.Changed) -> None:
        event.stop()
        if not self._loading:
            self.apply()
