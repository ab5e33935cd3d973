"""The event log of a run: `<results>/events.ndjson`, one JSON event per line, appended as it happens.

A writing `pipeline.run` tees every event it emits into the log (`tee`), so another process can
replay and follow the run (`prune attach`, `prune tui RESULTS`, `prune ps`). Each event is one
line-buffered append (microseconds; a batch of the importance pass takes far longer). The log is
started afresh by each writing run that rewrites the results (a partial one, such as saving the model
alone, appends to it), and closed with an end record when the run does not finish:
`{"kind": "run_interrupted", ...}` or `{"kind": "run_failed", ...}` (a finished run ends with
`run_done`). `read_events` turns the lines back into the typed events of `prune_core.events`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from prune_core.errors import Interrupted
from prune_core.events import (
    BatchDone,
    Checkpointed,
    Event,
    EventSink,
    FindingEvent,
    Notice,
    Progress,
    RunDone,
    StageDone,
    StagePlan,
    StageStarted,
)

LOG_NAME = "events.ndjson"
END_KINDS = ("run_done", "run_interrupted", "run_failed")
_TYPES: dict[str, type[Event]] = {
    "stage_started": StageStarted, "stage_done": StageDone, "progress": Progress, "batch_done": BatchDone,
    "checkpointed": Checkpointed, "notice": Notice, "finding": FindingEvent, "stage_plan": StagePlan,
    "run_done": RunDone,
}


def log_path(folder: Path) -> Path:
    return Path(folder) / LOG_NAME


class EventLog:
    """An open event log: call it with events (an EventSink); `end()` writes the closing record."""

    def __init__(self, folder: Path, *, append: bool = False) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(log_path(folder), "a" if append else "w", encoding="utf-8",  # noqa: SIM115
                                          buffering=1)

    def write(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError, ValueError):  # a full disk must not stop the run
            self._file.write(json.dumps(obj, default=str, allow_nan=False) + "\n")

    def __call__(self, event: Event) -> None:
        self.write({**event.to_dict(), "t": round(time.time(), 3)})

    def end(self, kind: str, message: str) -> None:
        self.write(end_record(kind, message))

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def end_record(kind: str, message: str) -> dict[str, object]:
    """The last line of a log (and of `prune run --json`): one of END_KINDS, its message and the time."""
    return {"kind": kind, "message": message, "t": round(time.time(), 3)}


@contextlib.contextmanager
def tee(folder: Path, sink: EventSink, *, append: bool = False) -> Iterator[EventSink]:
    """An EventSink that logs every event to `<folder>/events.ndjson` and passes it on to `sink`."""
    log = EventLog(folder, append=append)

    def both(event: Event) -> None:
        log(event)
        sink(event)

    try:
        yield both
    except Interrupted as exc:
        log.end("run_interrupted", str(exc))
        raise
    except KeyboardInterrupt:
        log.end("run_interrupted", "stopped at once; the last periodic checkpoint is kept")
        raise
    except BaseException as exc:
        log.end("run_failed", str(exc) or type(exc).__name__)
        raise
    finally:
        log.close()


def from_dict(obj: dict[str, Any]) -> Event | None:
    """The typed event of one log line (None for end records and unknown kinds)."""
    cls = _TYPES.get(str(obj.get("kind")))
    if cls is None:
        return None
    names = {f.name for f in fields(cls) if f.init}
    kw = {k: v for k, v in obj.items() if k in names}
    for key in ("recompute", "reused"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    for key, value in list(kw.items()):
        if value is None and key in ("loss", "mean_loss", "tokens_per_s", "eta_s"):
            kw[key] = float("nan")
    try:
        return cls(**kw)
    except TypeError:
        return None


def read_lines(folder: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of the log from byte `offset`: (objects, the offset after the last complete line).

    A log shorter than `offset` was started afresh by a new run: reading starts over from 0.
    """
    path = log_path(folder)
    try:
        size = path.stat().st_size
    except OSError:
        return [], offset
    if size < offset:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    objs = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                objs.append(obj)
    return objs, offset + end


def read_events(folder: Path) -> list[dict[str, Any]]:
    """Every complete line of the log (dicts, in order)."""
    return read_lines(folder)[0]


@dataclass(frozen=True)
class LogSummary:
    """Where a run stands by its log (or a tail of it): the one reading `prune ps` and the workbench share."""

    stage: str = ""                  # the latest stage started
    batch: int | None = None         # the latest importance batch done (1-based), of `total`
    total: int = 0
    checkpoint: int | None = None    # the batch a resume starts from, by the latest batch checkpoint
    end: str = ""                    # one of END_KINDS, or "" when the log has no end record (still running, or killed)
    end_message: str = ""
    updated: float | None = None     # the time of the latest line
    lines: int = 0


def summarize(objs: list[dict[str, Any]]) -> LogSummary:
    """The LogSummary of log lines (`read_events`, or a tail of them), read through the typed events."""
    stage, batch, total, checkpoint, end, message = "", None, 0, None, "", ""
    for obj in objs:
        kind = str(obj.get("kind"))
        if kind in END_KINDS:
            end, message = kind, str(obj.get("message", ""))
            continue
        event = from_dict(obj)
        if isinstance(event, StageStarted):
            stage, batch = event.stage, None
        elif isinstance(event, BatchDone):
            batch, total = event.batch, event.total
        elif isinstance(event, Checkpointed) and event.unit == "batch":
            checkpoint = event.batch
    last = objs[-1].get("t") if objs else None
    return LogSummary(stage, batch, total, checkpoint, end, message,
                      float(last) if isinstance(last, int | float) else None, len(objs))
