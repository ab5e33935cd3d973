"""The run screen: stage list with timings, importance progress (batch i/N, tokens/s, ETA, loss) and a
live per-layer chart. It re-reads the state's RunState on a timer, so redraws are throttled; its keys
post request messages (cancel, resume, show results) to the app."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static

from tui.estimate import human_seconds
from tui.messages import CancelRequested, RunRequested, ShowRequested, StateChanged
from tui.runstate import RunState
from tui.state import WorkbenchState
from tui.widgets.charts import LayerStatsChart

ICONS = {"running": ("▶", "bold cyan"), "done": ("✓", "green"), "cached": ("✓", "green"), "failed": ("✗", "red")}
REFRESH_S = 0.5


STAGE_LINES = 9  # what #run-top shows; earlier stages fold into one line beyond that


def stage_lines(state: RunState, *, timings: bool = True, limit: int = STAGE_LINES) -> Text:
    """One line per stage in the order the pipeline reported them; the earliest fold when there are many."""
    text = Text()
    if not state.stages:
        if state.status == "failed":  # before any stage started (a bad session, a locked folder)
            text.append(f"The run failed before its first stage: {state.error or 'see the message above'}",
                        style="red")
        else:
            text.append("No run yet: set up a session and press ctrl+r.", style="dim")
        return text
    infos = list(state.stages.values())
    if limit and len(infos) > limit:
        cut = len(infos) - limit + 1
        head, infos = infos[:cut], infos[cut:]
        failed = any(i.status == "failed" for i in head)
        icon, style = ICONS["failed" if failed else "done"]
        text.append(f"{icon} ", style=style)
        text.append(f"{f'{cut} earlier stages':<18}")
        seconds = sum(i.seconds or 0.0 for i in head)
        if timings:
            text.append(f" {seconds:6.2f} s" if seconds < 10 else f" {seconds:6.1f} s", style="dim")
        text.append("\n")
    for info in infos:
        icon, style = ICONS.get(info.status, ("·", ""))
        text.append(f"{icon} ", style=style)
        text.append(f"{info.name:<18}", style="bold" if info.status == "running" else "")
        if info.status == "cached":
            text.append(" cached", style="dim")
        elif info.seconds is not None and timings:
            text.append(f" {info.seconds:6.2f} s" if info.seconds < 10 else f" {info.seconds:6.1f} s", style="dim")
        elif info.status == "running" and info.total:
            text.append(f" {info.done:g}/{info.total:g} {info.unit}", style="dim")
        text.append("\n")
    return text


def progress_lines(state: RunState) -> Text:
    b = state.batch
    text = Text()
    if b is None:
        cur = state.current
        if cur is not None:
            what = cur.message or cur.description or "working"
            head, colon, rest = what.partition(":")
            if colon and head.split()[-1:] == [cur.name]:  # "taylor importance: 16×128" under "importance"
                what = rest.strip() or what
            text.append(f"{cur.name}: {what}…", style="dim")
        return text
    text.append(f"{b.stage}  batch {b.batch}/{b.total}", style="bold")
    if b.resumed_from:
        text.append(f" (resumed at {b.resumed_from})", style="dim")
    text.append(f"\nloss {b.loss:.4f}   mean {b.mean_loss:.4f}\n")
    if state.status == "running" and state.stopping and b.batch < b.total:
        text.append(f"stopping after batch {b.batch + 1}/{b.total}…", style="bold yellow")
    elif state.status == "running" or b.batch >= b.total:
        text.append(f"{b.tokens_per_s:,.0f} tokens/s   ETA {human_seconds(b.eta_s) if b.batch < b.total else 'done'}")
    else:  # interrupted or failed: no estimate of a pass that is not running
        text.append(f"stopped at batch {b.batch}/{b.total}", style="dim")
    return text


STATUS = {
    "idle": ("Idle", "dim"),
    "running": ("Running: x cancels (checkpointed, resumable)", "bold cyan"),
    "done": ("Done: F4 or Enter shows the results", "bold green"),
    "interrupted": ("Interrupted: the pass was checkpointed; r resumes", "bold yellow"),
    "failed": ("Failed", "bold red"),
}


def chart_note(state: RunState) -> str:
    """What the per-layer chart says while it has no statistics of this run."""
    imp = state.stages.get("importance")
    if imp is not None and imp.status == "cached":
        return "importance reused from the cache: no batches in this run"
    if state.status == "failed":
        return "the run failed before the first batch"
    if state.status == "interrupted":
        return "stopped before the first batch"
    if state.status == "done":
        return "no batches in this run"
    return "waiting for the first batch"


class RunScreen(Screen):
    """Progress of the importance pass and the stages around it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "cycle_stat", "Stat", id="run.stat", tooltip="Chart: cycle norm / mean / std / max."),
        Binding("b", "toggle_block", "Attn/MLP", id="run.block", tooltip="Chart: switch attention / MLP."),
        Binding("x", "cancel", "Cancel", id="run.cancel",
                tooltip="Stop the run after this batch (asks first); the pass stays resumable."),
        Binding("r", "resume", "Resume", id="run.resume", tooltip="Resume an interrupted importance pass."),
        Binding("enter", "results", "Results", id="run.results", tooltip="Show the results of a finished run."),
    ]

    def __init__(self, state: WorkbenchState) -> None:
        super().__init__(id="run")
        self.state = state
        self._seen = -1
        self._batches_seen = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="run-top"):
            yield Static("", id="run-stages")
            with Vertical(id="run-progress-box"):
                yield ProgressBar(id="run-progress", show_eta=False)
                yield Static("", id="run-stats")
        yield LayerStatsChart(id="run-chart")
        yield Static("", id="run-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.set_interval(REFRESH_S, self.sync, name="run-refresh")
        self.sync()

    def on_screen_resume(self) -> None:
        self._seen = -1
        self.sync()

    def on_state_changed(self, message: StateChanged) -> None:
        if message.what in ("run_finished", "run_started"):
            self.sync()
            self.refresh_bindings()

    def sync(self) -> None:
        """Redraw from the RunState if it moved since the last redraw."""
        state = self.state.run_state
        if state.version == self._seen:
            return
        try:  # every widget first: the app tears a screen down one child at a time
            stages = self.query_one("#run-stages", Static)
            stats_widget = self.query_one("#run-stats", Static)
            bar = self.query_one("#run-progress", ProgressBar)
            chart = self.query_one("#run-chart", LayerStatsChart)
            status_widget = self.query_one("#run-status", Static)
        except NoMatches:  # a timer's tick while the app tears the screen down: nothing left to draw
            return
        self._seen = state.version
        stages.update(stage_lines(state, timings=self.state.show_timings))
        stats = progress_lines(state)
        stats_widget.update(stats if self.state.show_timings else _masked(state))
        cur = state.current
        if cur is not None and cur.total:
            bar.update(total=cur.total, progress=cur.done)
        elif state.batch is not None:
            bar.update(total=state.batch.total, progress=state.batch.batch)
        elif state.status == "done":
            bar.update(total=1, progress=1)
        else:
            bar.update(total=None)
        if state.batches_received != self._batches_seen and state.layer_stats is not None:
            self._batches_seen = state.batches_received
            chart.update_stats(state.layer_stats, state.stats_label)
        elif state.layer_stats is None:  # this run has no batches (yet): never the previous run's chart
            self._batches_seen = 0
            chart.clear(chart_note(state))
        label, style = STATUS[state.status]
        status = Text()
        if state.status == "running" and state.stopping:
            label, style = "Stopping: the pass is checkpointed after the batch in flight", "bold yellow"
        status.append(label, style=style)
        if state.status == "interrupted" and state.checkpoint is not None:
            status.append(f" (checkpoint after {state.checkpoint.unit} {state.checkpoint.batch})", style="yellow")
        if state.error and state.status == "failed":
            status.append(f"  {state.error}", style="red")
        for notice in state.notices[-2:]:
            status.append(f"\n[{notice.level.upper()[:4]}] {notice.message}",
                          style="yellow" if notice.level == "warning" else "dim")
        status_widget.update(status)
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        status = self.state.run_state.status
        if action == "cancel":
            return status == "running"
        if action == "resume":
            return status == "interrupted"
        if action == "results":
            return status == "done"
        return True

    def action_cycle_stat(self) -> None:
        self.query_one("#run-chart", LayerStatsChart).cycle_stat()

    def action_toggle_block(self) -> None:
        self.query_one("#run-chart", LayerStatsChart).toggle_block()

    def action_cancel(self) -> None:
        self.post_message(CancelRequested())

    def action_resume(self) -> None:
        self.post_message(RunRequested(resume=True))

    def action_results(self) -> None:
        self.post_message(ShowRequested("results"))


def _masked(state: RunState) -> Text:
    """Progress without throughput and timings (for reproducible screenshots)."""
    b = state.batch
    if b is None:
        return progress_lines(state)
    text = Text()
    text.append(f"{b.stage}  batch {b.batch}/{b.total}", style="bold")
    text.append(f"\nloss {b.loss:.4f}   mean {b.mean_loss:.4f}\n")
    text.append("tokens/s and ETA hidden", style="dim")
    return text
