"""Render engine events for a terminal: Rich progress on a TTY, plain lines otherwise, NDJSON with --json.

One renderer object per run; the engine calls it (an EventSink) for every event. Given the run's
`StopFlag`, a renderer keeps its progress counters current and says at once when a stop was asked
for ("stopping after batch 8/12…"). Below 100 columns the live display is one compact line per
stage (stage, bar, batch n/N, loss, tok/s, ETA) that fits 80 columns. A terminal that went away
(SIGHUP, EIO) silences the renderer instead of failing the run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from prune_core.events import (
    BatchDone,
    Checkpointed,
    Event,
    Notice,
    RunDone,
    StageDone,
    StageStarted,
)
from prune_core.events import (
    Progress as ProgressEvent,
)

NARROW = 100  # below this width the live display drops the elapsed time and shortens the bar
StopLike = Callable[[], bool]


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Guarded:
    """Shared by the renderers: stop-flag bookkeeping and silence once the terminal is gone."""

    stop: Any = None
    dead = False

    def _attach(self, stop: Any) -> None:
        self.stop = stop
        if stop is not None and hasattr(stop, "listen"):
            stop.listen(self._stopping)

    def _observe(self, event: Event) -> None:
        if self.stop is not None and hasattr(self.stop, "observe"):
            self.stop.observe(event)

    def _stopping(self, text: str) -> None:
        """News about stopping, called from the signal handler: one short line."""
        if not self.dead:
            try:
                self._say(text)
            except (OSError, ValueError):
                self.dead = True

    def _say(self, text: str) -> None:
        raise NotImplementedError

    def __call__(self, event: Event) -> None:
        self._observe(event)
        if self.dead:
            return
        try:
            self.render(event)
        except (OSError, ValueError):  # the terminal went away (SSH dropped): keep running, quietly
            self.dead = True

    def render(self, event: Event) -> None:
        raise NotImplementedError


class JsonRenderer(_Guarded):
    """Newline-delimited JSON: one object per event on stdout (for scripts); stop news goes to stderr."""

    def __init__(self, stream: TextIO | None = None, stop: Any = None) -> None:
        self.stream = stream or sys.stdout
        self._attach(stop)

    def render(self, event: Event) -> None:
        self.stream.write(json.dumps(event.to_dict(), allow_nan=False, default=str) + "\n")
        self.stream.flush()

    def _say(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def emit(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def batch_line(event: BatchDone) -> str:
    """`importance 3/12 loss 4.3522 (mean 4.4000) 31 tok/s ETA 0:49` — the plain progress line."""
    return (f"{event.stage} {event.batch}/{event.total} loss {event.loss:.4f} "
            f"(mean {event.mean_loss:.4f}) {event.tokens_per_s:,.0f} tok/s ETA {_eta(event.eta_s)}")


class PlainRenderer(_Guarded):
    """One line per stage and per batch; for logs, pipes and NO_COLOR terminals."""

    def __init__(self, console: Console, stop: Any = None) -> None:
        self.console = console
        self._last_progress: dict[str, float] = {}
        self._attach(stop)

    def _say(self, text: str) -> None:
        self.console.print(f"[stop]  {text}", markup=False, highlight=False, soft_wrap=True)

    def render(self, event: Event) -> None:
        c = self.console
        if isinstance(event, StageStarted):
            c.print(f"[stage] {event.stage}: {event.description}", markup=False, highlight=False)
        elif isinstance(event, StageDone):
            tag = " (cached)" if event.cached else ""
            c.print(f"[done]  {event.stage} in {event.seconds:.1f}s{tag} {event.summary}".rstrip(),
                    markup=False, highlight=False)
        elif isinstance(event, BatchDone):
            c.print(f"[batch] {batch_line(event)}", markup=False, highlight=False)
        elif isinstance(event, ProgressEvent):
            # at most one line per 10 % of a step
            if event.total:
                frac = event.done / event.total
                last = self._last_progress.get(event.stage + event.message, -1.0)
                if frac < 1.0 and frac - last < 0.1:
                    return
                self._last_progress[event.stage + event.message] = frac
                c.print(f"[...]   {event.stage}: {event.message} {frac:.0%}", markup=False, highlight=False)
        elif isinstance(event, Notice):
            c.print(f"[{event.level}] {event.message}", markup=False, highlight=False)
        elif isinstance(event, Checkpointed):
            c.print(f"[ckpt]  {event.stage} checkpointed at {event.unit} {event.batch}", markup=False, highlight=False)
        elif isinstance(event, RunDone):
            pass

    def close(self) -> None:
        pass


class _InfoColumn(ProgressColumn):
    """The task's info (loss · tok/s · ETA), or "stopping after batch n/N…" once a stop was asked for."""

    def __init__(self, stop: StopLike | None, width: int | None) -> None:
        super().__init__()
        self.stop, self.width = stop, width

    def render(self, task: Task) -> Text:
        info = str(task.fields.get("info", ""))
        if self.stop is not None and self.stop() and not task.finished:
            total = int(task.total or 0)
            done = int(task.completed)
            info = f"stopping after batch {done + 1}/{total}…" if total and done < total else "stopping…"
        text = Text(info, no_wrap=True, overflow="ellipsis")
        if self.width:
            text.truncate(self.width, overflow="ellipsis")
        return text


class RichRenderer(_Guarded):
    """A live Rich progress display: stage, bar, batch i/N, loss, tokens/s, ETA (and time, when wide)."""

    def __init__(self, console: Console, stop: Any = None) -> None:
        self.console = console
        self._attach(stop)
        width = console.width
        narrow = width < NARROW
        stage_w = 12
        bar_w = 10 if narrow else 30
        # stage, bar, "12/12", info (and elapsed when wide), separated by single spaces
        info_w = max(width - stage_w - bar_w - 7 - 4 - (0 if narrow else 9), 10)
        columns: list[ProgressColumn | str] = [
            TextColumn("[bold]{task.description}", table_column=None),
            BarColumn(bar_width=bar_w),
            MofNCompleteColumn(),
            _InfoColumn(stop if callable(stop) else None, info_w),
        ]
        if not narrow:
            columns.append(TimeElapsedColumn())
        self.progress = Progress(*columns, console=console, transient=False, expand=False)
        self._stage_w = stage_w
        self.tasks: dict[str, TaskID] = {}
        self.progress.start()

    def _task(self, stage: str, total: float | None, description: str = "") -> TaskID:
        if stage not in self.tasks:
            name = (description or stage)[:self._stage_w]
            self.tasks[stage] = self.progress.add_task(escape(f"{name:<{self._stage_w}}"), total=total, info="")
        return self.tasks[stage]

    def _say(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, style="yellow")

    def render(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self._task(event.stage, event.total, f"{event.stage}")
        elif isinstance(event, StageDone):
            tid = self._task(event.stage, 1)
            task = self.progress.tasks[self.progress.task_ids.index(tid)]
            total = task.total if task.total else 1
            info = ("cached " if event.cached else "") + event.summary
            self.progress.update(tid, total=total, completed=total, info=info)
        elif isinstance(event, BatchDone):
            tid = self._task(event.stage, event.total)
            self.progress.update(tid, total=event.total, completed=event.batch,
                                 info=f"loss {event.loss:.4f} · {event.tokens_per_s:,.0f} tok/s · ETA {_eta(event.eta_s)}")
        elif isinstance(event, ProgressEvent):
            tid = self._task(event.stage, event.total)
            self.progress.update(tid, total=event.total, completed=event.done, info=event.message)
        elif isinstance(event, Notice):
            self.progress.console.print(f"{event.level}: {event.message}", markup=False, highlight=False,
                                        style="yellow" if event.level == "warning" else None)
        elif isinstance(event, Checkpointed):
            pass

    def close(self) -> None:
        try:
            self.progress.stop()
        except (OSError, ValueError):
            self.dead = True


def make_renderer(console: Console, json_mode: bool, stop: Any = None) -> Any:
    """NDJSON with --json, a live Rich display on a colour terminal, plain lines otherwise."""
    if json_mode:
        return JsonRenderer(stop=stop)
    if console.is_terminal and not os.environ.get("NO_COLOR") and not console.is_dumb_terminal:
        return RichRenderer(console, stop)
    return PlainRenderer(console, stop)
