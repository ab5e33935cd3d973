"""Render engine events for a terminal: Rich progress on a TTY, plain lines otherwise, NDJSON with --json.

One renderer object per run; the engine calls it (an EventSink) for every event.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

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


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JsonRenderer:
    """Newline-delimited JSON: one object per event on stdout (for scripts)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        self.stream.write(json.dumps(event.to_dict(), allow_nan=False, default=str) + "\n")
        self.stream.flush()

    def emit(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class PlainRenderer:
    """One line per stage and per batch; for logs, pipes and NO_COLOR terminals."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._last_progress: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        c = self.console
        if isinstance(event, StageStarted):
            c.print(f"[stage] {event.stage}: {event.description}", markup=False, highlight=False)
        elif isinstance(event, StageDone):
            tag = " (cached)" if event.cached else ""
            c.print(f"[done]  {event.stage} in {event.seconds:.1f}s{tag} {event.summary}".rstrip(),
                    markup=False, highlight=False)
        elif isinstance(event, BatchDone):
            c.print(f"[batch] {event.stage} {event.batch}/{event.total} loss {event.loss:.4f} "
                    f"(mean {event.mean_loss:.4f}) {event.tokens_per_s:,.0f} tok/s ETA {_eta(event.eta_s)}",
                    markup=False, highlight=False)
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
            c.print(f"[ckpt]  {event.stage} checkpointed at batch {event.batch}", markup=False, highlight=False)
        elif isinstance(event, RunDone):
            pass

    def close(self) -> None:
        pass


class RichRenderer:
    """A live Rich progress display: stage, batch i/N, tokens/s, ETA and loss."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.progress.start()

    def _task(self, stage: str, total: float | None, description: str = "") -> TaskID:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(description or stage, total=total, info="")
        return self.tasks[stage]

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self._task(event.stage, event.total, f"{event.stage}")
        elif isinstance(event, StageDone):
            tid = self._task(event.stage, 1)
            task = self.progress.tasks[self.progress.task_ids.index(tid)]
            total = task.total if task.total else 1
            info = ("cached " if event.cached else "") + event.summary
            self.progress.update(tid, total=total, completed=total, info=info[:70])
        elif isinstance(event, BatchDone):
            tid = self._task(event.stage, event.total)
            self.progress.update(tid, total=event.total, completed=event.batch,
                                 info=f"loss {event.loss:.4f} · {event.tokens_per_s:,.0f} tok/s · ETA {_eta(event.eta_s)}")
        elif isinstance(event, ProgressEvent):
            tid = self._task(event.stage, event.total)
            self.progress.update(tid, total=event.total, completed=event.done, info=event.message[:70])
        elif isinstance(event, Notice):
            self.progress.console.print(f"[yellow]{event.level}:[/] {event.message}", highlight=False)
        elif isinstance(event, Checkpointed):
            pass

    def close(self) -> None:
        self.progress.stop()


def make_renderer(console: Console, json_mode: bool) -> Any:
    if json_mode:
        return JsonRenderer()
    if console.is_terminal and not os.environ.get("NO_COLOR") and not console.is_dumb_terminal:
        return RichRenderer(console)
    return PlainRenderer(console)
