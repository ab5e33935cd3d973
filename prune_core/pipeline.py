"""The headless orchestrator: run a whole session from its file, emitting events, leaving a results folder.

    load model → calibration data → importance pass → (block/layer losses when T or tau ≠ 0)
    → table, correction, normalization → selection → surgery (+ compensation)
    → evaluation before/after → diagnosis → save

`run()` is what `prune run` calls; the TUI drives the same `Workbench` step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core.events import EventSink, RunDone, null_sink
from prune_core.workbench import Workbench, ensure_writable, results_dir_for
from sessions import Session


@dataclass
class RunResult:
    results_dir: Path
    metrics: dict[str, Any]
    workbench: Workbench


def run(
    session: Session,
    *,
    out_dir: Path | None = None,
    fresh: bool = False,
    on_event: EventSink = null_sink,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Run every stage of `session`; stages whose inputs are unchanged come from the cache."""
    results_dir = results_dir_for(session, out_dir)
    ensure_writable(results_dir)
    wb = Workbench(session, results_dir, on_event=on_event, should_stop=should_stop, fresh=fresh,
                   keep_original=False)
    metrics = wb.run_all()
    on_event(RunDone(results_dir=str(results_dir), metrics=metrics))
    return RunResult(results_dir=results_dir, metrics=metrics, workbench=wb)
