"""Bookkeeping of one run for display: stages with timings, the newest batch, notices.

Pure Python (no widgets): the app folds every engine event into a `RunState`; the run screen reads
it on a timer, so redraws are throttled no matter how fast events arrive.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal

from prune_core.events import (
    BatchDone,
    Checkpointed,
    Event,
    LayerStats,
    Notice,
    Progress,
    RunDone,
    StageDone,
    StageStarted,
)

_RESUMED = re.compile(r"resuming from batch (\d+)/(\d+)")
Status = Literal["idle", "running", "done", "interrupted", "failed"]


@dataclass
class StageInfo:
    name: str
    description: str = ""
    status: Literal["running", "done", "cached", "failed"] = "running"
    seconds: float | None = None
    summary: str = ""
    done: float = 0.0
    total: float | None = None
    unit: str = ""
    message: str = ""
    started: float = field(default_factory=time.monotonic)


@dataclass
class RunState:
    status: Status = "idle"
    stages: dict[str, StageInfo] = field(default_factory=dict)
    batch: BatchDone | None = None
    batches_received: int = 0      # BatchDone events folded in (after queue coalescing)
    layer_stats: LayerStats | None = None
    stats_label: str = "gradient"
    notices: list[Notice] = field(default_factory=list)
    checkpoint: Checkpointed | None = None
    error: str = ""
    results_dir: str = ""
    stopping: bool = False         # a stop was asked for: the job ends after its current step
    version: int = 0               # bumps on every change; views redraw when it moved

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
        self.status = "running"

    @property
    def current(self) -> StageInfo | None:
        running = [s for s in self.stages.values() if s.status == "running"]
        return running[-1] if running else None

    def apply(self, event: Event) -> None:
        """Fold one engine event in."""
        self.version += 1
        if isinstance(event, StageStarted):
            self.stages[event.stage] = StageInfo(event.stage, event.description, total=event.total)
        elif isinstance(event, StageDone):
            info = self.stages.setdefault(event.stage, StageInfo(event.stage))
            info.status = "cached" if event.cached else "done"
            info.seconds = event.seconds
            info.summary = event.summary
        elif isinstance(event, Progress):
            info = self.stages.setdefault(event.stage, StageInfo(event.stage))
            info.done, info.total, info.unit, info.message = event.done, event.total, event.unit, event.message
        elif isinstance(event, BatchDone):
            self.batch = event
            self.batches_received += 1
            self.layer_stats = event.layer_stats
            self.stats_label = event.stats_label
            info = self.stages.setdefault(event.stage, StageInfo(event.stage))
            info.done, info.total, info.unit = event.batch, event.total, "batches"
        elif isinstance(event, Checkpointed):
            self.checkpoint = event
        elif isinstance(event, Notice):
            self.notices.append(event)
            resumed = _RESUMED.match(event.message)
            if resumed and event.stage:  # a resumed pass starts where its checkpoint ended, not at 0/N
                info = self.stages.setdefault(event.stage, StageInfo(event.stage))
                info.done, info.total, info.unit = float(resumed[1]), float(resumed[2]), "batches"
        elif isinstance(event, RunDone):
            self.results_dir = event.results_dir

    def finish(self, status: Status, error: str = "") -> None:
        self.version += 1
        self.status = status
        self.error = error
        for info in self.stages.values():
            if info.status == "running":
                info.status = "failed" if status in ("failed", "interrupted") else "done"
