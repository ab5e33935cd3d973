"""Background jobs of the workbench app: every engine call runs in a thread worker, one at a time.

The engine talks back only through `post_message` (EngineEvent for its events, JobDone / JobFailed
for the outcome); the `should_stop` flag it polls after every batch is a threading.Event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work

from prune_core.errors import Interrupted, PruneError
from prune_core.events import Event
from sessions import Session
from tui import engine
from tui.messages import EngineEvent, JobDone, JobFailed
from tui.results_model import ResultsData, from_results_view, from_workbench
from tui.screens.dialogs import ConfirmScreen

if TYPE_CHECKING:
    from tui.app import PruneApp

JOB_LABELS = {
    "run": "the run", "allocate": "re-allocation", "evaluate": "evaluation", "save_model": "saving the model",
    "generate": "text generation", "check": "looking for a checkpoint", "open": "opening results",
}


def printable(text: object) -> str:
    """Model output made safe to show: control characters (escape sequences!) become '�'."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in str(text))


class JobsMixin:
    """Mixed into PruneApp: start, run and finish engine jobs."""

    busy: str | None
    workbench: Any
    _stop: threading.Event
    _pending_alloc: tuple[Session, str] | None

    def sink(self: PruneApp, event: Event) -> None:  # type: ignore[misc]
        """The EventSink handed to the engine: called on the worker thread, so it only posts."""
        self.post_message(EngineEvent(event))

    def start_job(self: PruneApp, name: str, fn: Callable[[], Any]) -> bool:  # type: ignore[misc]
        if self.busy is not None:
            self.notify(f"Wait for {JOB_LABELS.get(self.busy, self.busy)} to finish.", severity="warning")
            return False
        self.busy = name
        self._stop.clear()
        self._engine_worker(name, fn)
        self.refresh_bindings()
        return True

    @work(thread=True, group="engine", exit_on_error=False, name="engine")
    def _engine_worker(self: PruneApp, name: str, fn: Callable[[], Any]) -> None:  # type: ignore[misc]
        try:
            result = fn()
        except Interrupted as exc:
            self.post_message(JobFailed(name, exc, interrupted=True))
            return
        except BaseException as exc:  # reported in the UI, never raised into Textual
            self.post_message(JobFailed(name, exc))
            return
        self.post_message(JobDone(name, result))

    # -- the workbench -------------------------------------------------------------------------
    def _new_workbench(self: PruneApp, session: Session, fresh: bool = False) -> Any:  # type: ignore[misc]
        folder = self.results_path if self.results is not None and self.results.from_folder else None
        return self.workbench_factory(session, folder, on_event=self.sink, should_stop=self._stop.is_set,
                                      fresh=fresh)

    def _ensure_workbench(self: PruneApp) -> Any:  # type: ignore[misc]
        """(Worker thread) the live workbench, built from the cached importance if there is none."""
        wb = self.workbench
        if wb is None:
            wb = self._new_workbench(self.session)
            wb.prepare()
            wb.compute_importance()
            wb.allocate()
            wb.diagnose()
            self._job_workbench = wb
        return wb

    def job_run(self: PruneApp, *, fresh: bool = False, resume: bool = False) -> bool:  # type: ignore[misc]
        session = self.session
        reuse = self.workbench if resume and self.workbench is not None else None

        def run() -> Any:
            wb = reuse if reuse is not None else self._new_workbench(session, fresh=fresh)
            self._job_workbench = wb
            if getattr(wb, "loaded", None) is None:
                wb.prepare()
            wb.compute_importance()
            wb.allocate()
            wb.diagnose()
            path = wb.save_results()
            return wb, path

        return self.start_job("run", run)

    def job_allocate(self: PruneApp, session: Session, reason: str) -> bool:  # type: ignore[misc]
        def allocate() -> Any:
            wb = self._ensure_workbench()
            wb.allocate(session)
            wb.diagnose()
            return wb, session, reason

        return self.start_job("allocate", allocate)

    def job_simple(self: PruneApp, name: str, call: Callable[[Any], Any]) -> bool:  # type: ignore[misc]
        def job() -> Any:
            wb = self._ensure_workbench()
            return wb, call(wb)

        return self.start_job(name, job)

    @work(thread=True, exclusive=True, group="check", exit_on_error=False)
    def job_check_checkpoint(self: PruneApp) -> None:  # type: ignore[misc]
        """Look for an interrupted importance pass (outside the job lock: a run may start meanwhile)."""
        session = self.session
        try:
            wb = self._new_workbench(session)
            has = bool(wb.has_checkpoint())
        except Exception:
            return
        self.post_message(JobDone("check", (session, wb, has)))

    def job_open_results(self: PruneApp, path: Path) -> bool:  # type: ignore[misc]
        return self.start_job("open", lambda: (path, engine.open_results(path)))

    # -- engine messages -------------------------------------------------------------------------
    def on_engine_event(self: PruneApp, message: EngineEvent) -> None:  # type: ignore[misc]
        self.run_state.apply(message.event)

    def on_job_done(self: PruneApp, message: JobDone) -> None:  # type: ignore[misc]
        name, result = message.job, message.result
        if name == "check":
            self._checked(*result)
            return
        self.busy = None
        if name == "run":
            wb, path = result
            self.workbench, self.results_path = wb, Path(path)
            self.results = from_workbench(wb)
            self.run_state.results_dir = str(path)
            self.run_state.finish("done")
            self.broadcast("run_finished")
            if self.screen.id == "run":
                self.switch_screen("results")
        elif name == "allocate":
            wb, session, reason = result
            self.workbench = wb
            self.set_session(session)
            self.results = self._refreshed(wb)
            a = self.results.allocation
            self.notify(f"{reason}: achieved {a.achieved_ratio:.1%}" if a else reason)
            if self._pending_alloc is not None:
                pending, self._pending_alloc = self._pending_alloc, None
                if pending[0] != self.session:
                    self.job_allocate(*pending)
        elif name in ("evaluate", "save_model", "generate"):
            wb, value = result
            self.workbench = wb
            self.results = self._refreshed(wb)
            if name == "save_model":
                self.saved_model_path = Path(value)
                self.notify(f"Saved the pruned model to {value}")
            elif name == "generate":
                self.samples = (printable(value[0]), printable(value[1]))
        elif name == "open":
            path, view = result
            self.results, self.results_path = from_results_view(view, path), path
            self.workbench, self.samples, self.saved_model_path = None, ("", ""), None
            if isinstance(self.results.session, Session):
                self.session_path, self.saved_text = None, None
                self.set_session(self.results.session, saved=True)
            if self.screen.id != "results" and not self.screen.is_modal:
                self.switch_screen("results")
        self.refresh_bindings()
        self.broadcast("results")

    def _checked(self: PruneApp, session: Session, wb: Any, has: bool) -> None:  # type: ignore[misc]
        """Offer to resume an interrupted pass, unless the user already moved on."""
        if not has or self.busy is not None or session != self.session:
            return

        def answer(yes: bool | None) -> None:
            if yes and self.busy is None:
                self.workbench = wb
                self.action_run(resume=True)

        self.push_screen(ConfirmScreen("Resume the interrupted run?", "This session's importance pass was "
                                       "interrupted and checkpointed. Resume it now?", "Resume", "Not now"), answer)

    def _refreshed(self: PruneApp, wb: Any) -> ResultsData:  # type: ignore[misc]
        data = from_workbench(wb)
        if self.results is not None and self.results.from_folder:
            data.results_dir = self.results.results_dir
        return data

    def on_job_failed(self: PruneApp, message: JobFailed) -> None:  # type: ignore[misc]
        self.busy = None
        error = message.error
        if message.job == "run":
            self.workbench = self._job_workbench if message.interrupted else None
            self.run_state.finish("interrupted" if message.interrupted else "failed", str(error))
            self.broadcast("run_finished")
        if message.interrupted and message.job == "run":
            self.notify("Interrupted: the importance pass was checkpointed; press r on the run screen to resume.",
                        severity="warning", timeout=8)
        elif message.interrupted:
            self.notify(f"Stopped {JOB_LABELS.get(message.job, message.job)}.", severity="warning")
        else:
            text = str(error) if isinstance(error, PruneError) else f"{type(error).__name__}: {error}"
            self.notify(text, title=f"{message.job} failed", severity="error", timeout=12)
        self._pending_alloc = None
        self.refresh_bindings()
        self.broadcast("results")
