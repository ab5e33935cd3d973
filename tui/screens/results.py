"""The results screen: per-layer allocation (chart + table), diagnosis, what-if, importance, actions.

It shows the `ResultsData` of the `WorkbenchState` the app hands it; every action (fix, what-if,
evaluate, save model, sample) is a request message to the app, which runs it in its engine worker.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, OptionList, Static, TabbedContent, TabPane

from prune_core.verify import why_not
from tui.estimate import human_count
from tui.messages import (
    CancelRequested,
    EvaluateRequested,
    FixRequested,
    SampleRequested,
    SaveModelRequested,
    SaveRequested,
    StateChanged,
)
from tui.results_model import ResultsData, perplexities
from tui.screens.whatif import WhatIfPanel
from tui.state import WorkbenchState
from tui.widgets.charts import LayerStatsChart, RatesChart
from tui.widgets.findings import FindingDetail, FindingsList
from tui.widgets.tables import AllocationTable

TABS = ("allocation", "diagnosis", "whatif", "importance", "actions")


def headline(results: ResultsData | None) -> Text:
    text = Text()
    if results is None or results.allocation is None:
        text.append("No results yet: run a session (ctrl+r) or open a results folder (ctrl+o).", style="dim")
        return text
    a = results.allocation
    text.append(f"{results.session.session.name}", style="bold")
    text.append(f" · {results.session.model.id} · target {a.target_ratio:.0%} → ")
    gap = a.ratio_gap()
    text.append(f"achieved {a.achieved_ratio:.1%}" + (" (!)" if gap else ""), style="bold yellow" if gap else "")
    totals = results.totals
    before, after = totals if totals else (a.params_before, a.params_after)
    text.append(f" · params {human_count(before)} → {human_count(after)}")
    before, after = perplexities(results.metrics)
    if before is not None or after is not None:
        b = f"{before:.2f}" if before is not None else "?"
        f = f"{after:.2f}" if after is not None else "?"
        text.append(f" · PPL {b} → {f}")
    else:
        text.append(" · PPL not evaluated (e)", style="dim")
    if gap:
        text.append(f"\n(!) {gap}", style="yellow")
    elif results.from_folder:
        text.append(f"\nfrom {results.results_dir}", style="dim")
    return text


class ResultsScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "apply_fix", "Apply fix", id="results.fix",
                tooltip="Apply the selected finding's fix and re-allocate (Diagnosis tab)."),
        Binding("e", "evaluate", "Evaluate", id="results.evaluate",
                tooltip="Perplexity before and after pruning on the held-out split."),
        Binding("m", "save_model", "Save model", show=False, id="results.save_model",
                tooltip="Prune a copy of the model and save it in the results folder."),
        Binding("g", "generate", "Sample", id="results.generate",
                tooltip="Generate a short text from the original and the pruned model."),
        Binding("w", "tab('whatif')", "What-if", show=False, id="results.whatif", tooltip="Open the what-if panel."),
        Binding("d", "tab('diagnosis')", "Diagnosis", show=False, id="results.diagnosis",
                tooltip="Open the diagnosis findings."),
        Binding("a", "tab('allocation')", "Allocation", show=False, id="results.allocation",
                tooltip="Open the per-layer allocation."),
        Binding("x", "cancel", "Stop job", id="results.cancel",
                tooltip="Stop the running job (evaluation, re-allocation) after its current step (asks first)."),
        Binding("escape", "leave_input", "Leave field", show=False, id="results.escape",
                tooltip="Leave a text field so single-key commands work again."),
        Binding("s", "cycle_stat", "Stat", show=False, id="results.stat",
                tooltip="Importance chart: cycle norm / mean / std / max."),
        Binding("b", "toggle_block", "Attn/MLP", show=False, id="results.block",
                tooltip="Importance chart: switch attention / MLP."),
    ]

    def __init__(self, state: WorkbenchState) -> None:
        super().__init__(id="results")
        self.state = state
        self._was_busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="results-headline")
        with TabbedContent(id="results-tabs", initial="tab-allocation"):
            with TabPane("Allocation", id="tab-allocation"), Vertical(id="alloc-box"):
                yield RatesChart(id="alloc-chart")
                yield AllocationTable(id="alloc-table")
            with TabPane("Diagnosis", id="tab-diagnosis"), Vertical():
                yield FindingsList(id="findings")
                with VerticalScroll(id="finding-detail-box"):
                    yield FindingDetail("", id="finding-detail")
            with TabPane("What-if", id="tab-whatif"):
                yield WhatIfPanel(self.state, id="whatif")
            with TabPane("Importance", id="tab-importance"):
                yield LayerStatsChart(id="importance-chart")
            with TabPane("Actions", id="tab-actions"), VerticalScroll():
                with Horizontal(id="action-buttons"):
                    yield Button("Evaluate e", id="act-evaluate", compact=True)
                    yield Button("Save model m", id="act-save-model", compact=True)
                    yield Button("Save session ^s", id="act-save", compact=True)
                yield Static("", id="action-status")
                with Horizontal(id="prompt-row"):
                    yield Input("Once upon a time", id="prompt", compact=True, placeholder="prompt for a sample")
                    yield Button("Sample g", id="act-generate", compact=True)
                with Horizontal(id="samples"):
                    yield Static("", id="sample-original", classes="sample")
                    yield Static("", id="sample-pruned", classes="sample")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sync()
        self.set_interval(0.5, self._tick_status, name="results-status")

    def _tick_status(self) -> None:
        """While a job runs, keep its progress line current (throttled like the run view)."""
        if self.state.busy is not None or self._was_busy:
            self._was_busy = self.state.busy is not None
            self.query_one("#action-status", Static).update(Text(self.state.status_text()))
            self.refresh_bindings()

    def on_screen_resume(self) -> None:
        self.sync()
        self.query_one("#whatif", WhatIfPanel).load_values()

    def on_state_changed(self, message: StateChanged) -> None:
        self.sync()
        if message.what in ("session", "opened"):
            self.query_one("#whatif", WhatIfPanel).load_values()

    def sync(self) -> None:
        state = self.state
        r = state.results
        self.query_one("#results-headline", Static).update(headline(r))
        cur, prev = (r.allocation, r.previous) if r else (None, None)
        self.query_one("#alloc-chart", RatesChart).show(cur)
        self.query_one("#alloc-table", AllocationTable).show(cur, prev)
        findings = self.query_one("#findings", FindingsList)
        findings.show(r.findings if r else [])
        self.query_one("#finding-detail", FindingDetail).show(findings.selected)
        self.query_one("#whatif", WhatIfPanel).show(r)
        chart = self.query_one("#importance-chart", LayerStatsChart)
        if r is not None and r.stats:
            chart.update_stats(r.stats, r.stats_label, now=True)
        self.query_one("#action-status", Static).update(Text(state.status_text()))
        orig, pruned = state.samples
        self.query_one("#sample-original", Static).update(Text.assemble(("original\n", "bold"), orig or ""))
        self.query_one("#sample-pruned", Static).update(Text.assemble(("pruned\n", "bold"), pruned or ""))

    @on(OptionList.OptionHighlighted, "#findings")
    def _highlight(self) -> None:
        self.query_one("#finding-detail", FindingDetail).show(self.query_one("#findings", FindingsList).selected)
        self.refresh_bindings()

    @on(OptionList.OptionSelected, "#findings")
    def _selected(self) -> None:
        self._highlight()

    @property
    def tab(self) -> str:
        return (self.query_one("#results-tabs", TabbedContent).active or "tab-allocation").removeprefix("tab-")

    def action_tab(self, name: str) -> None:
        self.query_one("#results-tabs", TabbedContent).active = f"tab-{name}"
        # the what-if form, not its ratio field: a text field with its text selected would swallow the next
        # single-key command (a, d, e, ...); Tab enters the fields
        focus = {"diagnosis": "#findings", "whatif": "#whatif-form", "allocation": "#alloc-table",
                 "actions": "#act-evaluate"}.get(name)
        if focus:
            self.call_after_refresh(lambda: self.query_one(focus).focus())

    def action_apply_fix(self) -> None:
        if self.tab != "diagnosis":
            self.action_tab("diagnosis")
            return
        finding = self.query_one("#findings", FindingsList).selected
        if finding is None or not finding.fix:
            self.notify("This finding has no automatic fix.", severity="warning")
            return
        if not finding.recommended:
            why = why_not(finding.verdict) + (" (its lower loss is not like for like)"
                                              if finding.verdict == "smaller" else "")
            self.notify(f"This fix was tried in a what-if and {why}; it is not applied.", severity="warning",
                        markup=False)
            return
        self.post_message(FixRequested(finding.issue, finding.fix))

    def action_evaluate(self) -> None:
        self.post_message(EvaluateRequested())

    def action_save_model(self) -> None:
        self.post_message(SaveModelRequested())

    def action_generate(self) -> None:
        self.post_message(SampleRequested(self.query_one("#prompt", Input).value))

    def action_leave_input(self) -> None:
        self.query_one("#results-tabs", TabbedContent).query_one("Tabs").focus()

    def action_cycle_stat(self) -> None:
        self.query_one("#importance-chart", LayerStatsChart).cycle_stat()

    def action_toggle_block(self) -> None:
        self.query_one("#importance-chart", LayerStatsChart).toggle_block()

    @on(TabbedContent.TabActivated, "#results-tabs")
    def _tab_changed(self) -> None:
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "apply_fix":  # on the diagnosis tab; dimmed for a finding without a fix (a tried-and-worse
            if self.tab != "diagnosis":  # fix stays pressable: the action says why it is not applied)
                return False
            try:
                finding = self.query_one("#findings", FindingsList).selected
            except NoMatches:
                return None
            return True if finding is not None and finding.fix else None
        if action in ("cycle_stat", "toggle_block"):
            return self.tab == "importance"
        if action == "cancel":
            return self.state.busy is not None
        return True

    def action_cancel(self) -> None:
        self.post_message(CancelRequested())

    @on(Button.Pressed, "#act-evaluate")
    def _evaluate(self) -> None:
        self.action_evaluate()

    @on(Button.Pressed, "#act-save-model")
    def _save_model(self) -> None:
        self.action_save_model()

    @on(Button.Pressed, "#act-save")
    def _save(self) -> None:
        self.post_message(SaveRequested())

    @on(Button.Pressed, "#act-generate")
    @on(Input.Submitted, "#prompt")
    def _generate(self) -> None:
        self.action_generate()
