"""Typed events the engine emits while it works; renderers (Rich, NDJSON, Textual) consume them.

Every event is a frozen dataclass with a `kind` tag and `to_dict()` for JSON. The engine calls an
`EventSink` (a plain callable) synchronously from the thread doing the work: a sink must be quick
and must not raise. `layer_stats` in `BatchDone` maps block ("attention", "mlp", "layer") to a
statistic ("mean", "std", "norm", "max", "min") to one float per decoder layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

LayerStats = dict[str, dict[str, list[float]]]
Severity = Literal["info", "warning", "high", "critical"]


def _clean(value: Any) -> Any:
    """Make floats JSON-safe (NaN/Inf become None) recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class Event:
    kind: str = field(init=False, default="event")

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass(frozen=True)
class StageStarted(Event):
    stage: str
    description: str = ""
    total: int | None = None  # number of steps when known (batches, windows)
    kind: str = field(init=False, default="stage_started")


@dataclass(frozen=True)
class StageDone(Event):
    stage: str
    seconds: float
    cached: bool = False  # True when the stage's output came from the stage cache (disk or memory)
    summary: str = ""
    result: dict[str, Any] = field(default_factory=dict)  # the stage's outcome in numbers (typed per stage)
    kind: str = field(init=False, default="stage_done")


@dataclass(frozen=True)
class Progress(Event):
    """Progress of a step that is not a gradient batch: downloads, conversion, evaluation windows."""

    stage: str
    done: float
    total: float | None = None
    unit: str = ""
    message: str = ""
    kind: str = field(init=False, default="progress")


@dataclass(frozen=True)
class BatchDone(Event):
    """One calibration batch of the importance pass has finished."""

    stage: str
    batch: int  # 1-based index of the batch just finished
    total: int
    loss: float
    mean_loss: float
    tokens_per_s: float
    eta_s: float
    layer_stats: LayerStats  # the latest statistics: a gradient pass takes them every stats_every-th batch
    stats_label: str = "gradient"  # "gradient" (taylor*) or "activation" (wanda)
    resumed_from: int = 0  # batches restored from a checkpoint at the start of this pass
    kind: str = field(init=False, default="batch_done")


@dataclass(frozen=True)
class Checkpointed(Event):
    stage: str
    batch: int  # the next batch (or step, see `unit`) to run on resume
    path: str
    unit: str = "batch"
    kind: str = field(init=False, default="checkpointed")


@dataclass(frozen=True)
class Notice(Event):
    """A warning or information the user should see (not an error: errors are raised)."""

    message: str
    level: Literal["info", "warning"] = "warning"
    stage: str = ""
    kind: str = field(init=False, default="notice")


@dataclass(frozen=True)
class FindingEvent(Event):
    issue: str
    severity: Severity
    description: str
    recommendation: str
    fix: dict[str, Any]
    proxy_before: float | None = None
    proxy_after: float | None = None
    verdict: str = "untested"
    kind: str = field(init=False, default="finding")


@dataclass(frozen=True)
class StagePlan(Event):
    """Before a run (or a what-if) starts: the stages that will compute, with estimated seconds."""

    recompute: tuple[str, ...]
    estimates: dict[str, float] = field(default_factory=dict)  # stage -> estimated seconds (when known)
    reused: tuple[str, ...] = ()
    kind: str = field(init=False, default="stage_plan")


@dataclass(frozen=True)
class RunDone(Event):
    """The run is over; `report` is the typed `prune_core.report.RunReport` (not part of the JSON)."""

    results_dir: str
    metrics: dict[str, Any]
    report: Any = field(default=None, compare=False, repr=False)
    kind: str = field(init=False, default="run_done")

    def to_dict(self) -> dict[str, Any]:
        return _clean({"kind": self.kind, "results_dir": self.results_dir, "metrics": self.metrics})


EventSink = Callable[[Event], None]


def null_sink(event: Event) -> None:
    """An EventSink that ignores everything."""
