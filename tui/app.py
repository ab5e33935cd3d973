"""PruneApp: the Textual workbench — guided set-up, live run view, results with diagnosis and what-if.

The app owns one `WorkbenchState` (the session being edited, its file, the run, the results shown)
and hands it to the screens it builds; screens render it and post request messages
(`tui.messages.Request`) for everything else. Every engine action (run, resume, what-if, fix,
evaluate, save model, sample, inspect, open results) is one `pipeline.run(...)` with the app's
`Memo`, or one `RunReport.read`, on the app's one engine worker thread (`tui.jobs`); the worker
talks back only through `post_message`.

Signals, Ctrl+C and quitting during a run are handled like `prune run` (checkpoint, then exit 129, 143
or 130) by the `ExitHandling` mixin, tui/exiting.py.
A path (command line or ctrl+o) is read one way (`tui.runfolder.classify`): on a results folder that
another process is writing, the app follows that run's event log on the run screen (`jobs.follow`; x
asks that run to stop, checkpointed); on a run folder that stopped, it says how to resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import BindingType
from textual.theme import Theme

import sessions
import tui.engine as engine
import tui.jobs as jobs
import tui.keys as keys
import tui.runfolder as runfolder
from prune_core.errors import Interrupted, PruneError
from prune_core.events import Event
from sessions import Session, SessionError
from tui.commands import PruneCommands
from tui.engine import Pipeline
from tui.exiting import EXIT_QUIT_RUN, ExitHandling
from tui.jobs import JobContext
from tui.messages import (
    CancelRequested,
    EngineEvent,
    EvaluateRequested,
    FixRequested,
    FormEdited,
    HelpRequested,
    InspectRequested,
    JobDone,
    JobFailed,
    Measured,
    OpenRequested,
    RecoverRequested,
    RunRequested,
    SampleRequested,
    SaveModelRequested,
    SaveRequested,
    ShowRequested,
    StateChanged,
    TuneRequested,
    WhatIfRequested,
)
from tui.results_model import from_report, serious_findings
from tui.screens.dialogs import ConfirmScreen, HelpScreen, PathScreen
from tui.screens.results import ResultsScreen
from tui.screens.run import RunScreen
from tui.screens.setup import SetupScreen
from tui.state import WorkbenchState, job_label

# Colours picked from the xterm-256 palette, so a 256-colour terminal shows exactly these.
PRUNE_THEME = Theme(
    name="prune", primary="#5f87d7", secondary="#87afaf", accent="#d7af5f", warning="#d7af00",
    error="#ff5f5f", success="#5faf5f", foreground="#d0d0d0", background="#1c1c1c", surface="#262626",
    panel="#303030", dark=True,
)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _same_dense(a: Any, b: Any) -> bool:
    """The dense model's perplexity of `a` holds for `b` (same model, evaluation text and window length)."""
    return (a is not None and a.model == b.model and a.eval_dataset == b.eval_dataset
            and a.evaluation.seq_len == b.evaluation.seq_len and a.evaluation.max_tokens == b.evaluation.max_tokens)


class PruneApp(ExitHandling, App[int]):
    """The prune workbench."""

    CSS_PATH = "app.tcss"
    TITLE = "prune"
    COMMANDS = App.COMMANDS | {PruneCommands}
    BINDINGS: ClassVar[list[BindingType]] = keys.APP_BINDINGS

    def __init__(self, path: Path | None = None, *, cpu_flops: float | None = None,
                 pipeline: Pipeline | None = None, show_timings: bool = True) -> None:
        super().__init__()
        self.start_path = path
        self.pipeline = pipeline or Pipeline()
        self.memo = self.pipeline.new_memo()   # stage values kept between this app's jobs
        self.state = WorkbenchState(cpu_flops=cpu_flops, show_timings=show_timings)
        self._stop = threading.Event()
        self._leave = threading.Event()     # stop following another process's run (it goes on)
        self._pending_alloc: tuple[Session, str] | None = None
        self._exit_after_job: int | None = None  # exit with this code once the running job has stopped
        self._warned_at = 0.0
        self._quitting = False
        self._signals: list[tuple[asyncio.AbstractEventLoop, int]] = []
        self._run_session: Session | None = None  # the session of the last run started here
        self.stop_at_once = False             # the user confirmed stopping without a checkpoint
        self.exit_note = ""                   # one line for the terminal once the app has exited
        self._open_after_follow: Path | None = None  # ctrl+o while following: opened once that has stopped
        self._asking_interrupt = False

    # -- start-up --------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self._install_signal_handlers()
        self.register_theme(PRUNE_THEME)
        self.theme = "prune"
        target = runfolder.classify(self.start_path, self.pipeline) if self.start_path is not None else None
        initial = (self._read_target(target, starting=True) if target is not None else None) or "model"
        self.install_screen(SetupScreen(self.state, initial), "setup")
        self.install_screen(RunScreen(self.state), "run")
        self.install_screen(ResultsScreen(self.state), "results")
        self.push_screen("setup")
        self.update_title()
        if self.state.cpu_flops is None:
            self._measure()
        if target is not None:
            self._start_target(target)

    def _read_target(self, target: runfolder.Target, *, starting: bool) -> str | None:
        """Make what `target` names the current session; return the set-up step to show (None: not opened).

        The one reading of a path, at start-up and for ctrl+o: a session file (invalid ones open with
        their problems inline), a results folder (read by a job), a run folder (its session file when known).
        """
        path, state = target.path, self.state
        if target.kind == "results":
            return "model"  # `_start_target` reads it; its session becomes the current one
        if target.kind == "folder":
            self.notify(f"{path} is a folder, but not a results folder (no session.toml) and holds no run: "
                        "open a session .toml or a results folder", severity="error", timeout=10, markup=False)
            return None
        if target.kind in ("follow", "stopped"):
            if target.session is None or target.session_file is None:
                return "model"
            state.session_path = target.session_file
            state.saved_text = target.session_file.read_text(encoding="utf-8-sig")
            self.set_session(target.session, saved=True)
            return "review"
        if not path.exists():
            if not starting:
                self.notify(f"{path} does not exist", severity="error", timeout=10, markup=False)
                return None
            state.session_path = path
            with contextlib.suppress(SessionError):  # a new file: name the session after it if that is valid
                state.set_session(state.session.with_updates({"session.name": path.stem}), saved=True)
            return "model"
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the TOML
        except (OSError, UnicodeDecodeError) as exc:
            self.notify(f"Cannot read {path}: {exc}", severity="error", timeout=10, markup=False)
            return None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            if not starting:  # ctrl+o on something that is no TOML at all: keep the session (ctrl+s would overwrite it)
                self.notify(f"{path} is not a session file: {exc}", severity="error", timeout=10, markup=False)
                return None
            raw = {}
        state.session_path, state.saved_text = path, text
        try:
            self.set_session(sessions.parse_text(text, source=str(path)), saved=True)
        except SessionError as exc:
            state.form_data = _deep_merge(Session().model_dump(), raw)
            state.saved_form = copy.deepcopy(state.form_data)
            state.problems = list(exc.problems)
            self.update_title()
        return "review"

    def _start_target(self, target: runfolder.Target) -> None:
        """The job an opened path starts: follow a live run, read results, offer to resume a checkpoint."""
        state = self.state
        if target.kind == "follow":
            if self.job_follow(target.path) and target.session is None:
                self.notify(f"Following the run in {target.path}. Its session file was not found (not recorded in the "
                            "run's lock, none here writes to that folder): the set-up shows a new session, "
                            "not the run's.", timeout=10, markup=False)
        elif target.kind == "results":
            self.job_open_results(target.path)
        elif target.kind == "stopped":
            self.notify(runfolder.stopped_message(target), severity="warning", timeout=30, markup=False)
            if target.resumes_here:
                self.job_check_checkpoint()
        elif state.session_path is not None and state.session_path.is_file() and not state.problems:
            self.job_check_checkpoint()

    @work(thread=True, group="measure", exit_on_error=False)
    def _measure(self) -> None:
        self.post_message(Measured(engine.measure_cpu_flops(), engine.cuda_available()))

    def on_measured(self, message: Measured) -> None:
        self.state.cpu_flops, self.state.has_cuda = message.cpu_flops, message.cuda
        self.broadcast("estimate")

    # -- session state ---------------------------------------------------------------------------
    def update_title(self) -> None:
        self.title = self.state.title()
        self.sub_title = self.state.sub_title()

    def broadcast(self, what: str) -> None:
        """Tell the active screen to re-read the state (inactive ones re-read when shown)."""
        self.screen.post_message(StateChanged(what))

    def set_session(self, session: Session, *, saved: bool = False) -> None:
        self.state.set_session(session, saved=saved)
        self.update_title()
        if self.is_running:
            self.broadcast("session")

    def on_form_edited(self, message: FormEdited) -> None:
        self.update_title()

    # -- requests from screens and the palette ----------------------------------------------------
    def on_run_requested(self, message: RunRequested) -> None:
        self.action_run(fresh=message.fresh, resume=message.resume)

    def on_cancel_requested(self, message: CancelRequested) -> None:
        self.action_cancel_run()

    def on_fix_requested(self, message: FixRequested) -> None:
        try:
            new = self.state.session.with_updates(message.updates)
        except SessionError as exc:
            self.notify(f"The fix does not apply: {exc.problems}", severity="error", markup=False)
            return
        self.request_allocation(new, reason=f"fix for {message.issue}")

    def on_what_if_requested(self, message: WhatIfRequested) -> None:
        if message.session != self.state.session:
            self.request_allocation(message.session, reason="what-if")

    def on_tune_requested(self, message: TuneRequested) -> None:
        if self._need_results():
            ctx, session = self._jobs(), self.state.session
            self._start("tune", lambda: jobs.tune_knobs(ctx, session))

    def on_evaluate_requested(self, message: EvaluateRequested) -> None:
        self.action_evaluate()

    def on_save_model_requested(self, message: SaveModelRequested) -> None:
        self.action_save_model()

    def on_recover_requested(self, message: RecoverRequested) -> None:
        if self._need_results():
            ctx, session, fresh = self._jobs(), self.state.session, message.fresh
            self._start("recover", lambda: jobs.recover(ctx, session, fresh=fresh))

    def on_sample_requested(self, message: SampleRequested) -> None:
        self.action_generate(message.prompt)

    def on_save_requested(self, message: SaveRequested) -> None:
        if message.ask:
            self.action_save_as()
        else:
            self.action_save()

    def on_open_requested(self, message: OpenRequested) -> None:
        self.action_open()

    def on_show_requested(self, message: ShowRequested) -> None:
        if message.step is not None:
            self.action_step(message.step)
        else:
            self.action_show(message.view)

    def on_help_requested(self, message: HelpRequested) -> None:
        self.action_help()

    def on_inspect_requested(self, message: InspectRequested) -> None:
        self.inspect_model()

    # -- actions ---------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "run":  # shown (and active) where it makes sense: set-up and run views
            return self.screen.id in ("setup", "run")
        return True

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(keys.markdown()))

    def action_show(self, name: str) -> None:
        if name == "results" and self.state.results is None:
            self.notify("No results yet: run the session (ctrl+r) or open a results folder (ctrl+o).", markup=False)
            return
        if self.screen.id != name and not self.screen.is_modal:
            self.switch_screen(name)

    def action_step(self, key: str) -> None:
        self.action_show("setup")
        setup = self.get_screen("setup")
        assert isinstance(setup, SetupScreen)
        self.call_after_refresh(setup.go, key)

    def _refuse_invalid(self) -> bool:
        if self.state.problems:
            n = len(self.state.problems)
            self.notify(f"The session has {n} problem{'s' if n != 1 else ''}: see step 6 Review.", severity="error", markup=False)
            self.action_step("review")
            return True
        return False

    def action_save(self) -> None:
        if self._refuse_invalid():
            return
        if self.state.session_path is None:
            self.action_save_as()
            return
        self.write_session(self.state.session_path)

    def write_session(self, path: Path) -> None:
        try:
            sessions.save(self.state.session, path)
        except (OSError, PruneError) as exc:
            self.notify(f"Cannot save {path}: {exc}", severity="error", markup=False)
            return
        self.state.session_path = path
        self.state.mark_saved(path.read_text(encoding="utf-8-sig"))
        self.update_title()
        self.notify(f"Saved {path}", markup=False)
        self.broadcast("saved")

    def action_save_as(self) -> None:
        if self._refuse_invalid():
            return
        default = str(self.state.session_path or Path(f"{self.state.session.session.name}.toml"))

        def chosen(value: str | None) -> None:
            if value:
                self.write_session(Path(value).expanduser())

        self.push_screen(PathScreen("Save the session as", default), chosen)

    def action_open(self) -> None:
        def chosen(value: str | None) -> None:
            if value:
                self.open_path(Path(value).expanduser())

        self.push_screen(PathScreen("Open a session file or a results folder", str(self.state.session_path or "")),
                         chosen)

    def open_path(self, path: Path) -> None:
        """Open a session file, a results folder or a run folder, as `prune tui PATH` does at start-up.

        Unsaved changes are never dropped silently: the app asks first, as it does on quit.
        """
        if self.state.busy not in (None, "follow"):
            self.notify(f"Wait for {job_label(self.state.busy)} to finish (x stops it), then open {path}.",
                        severity="warning", markup=False)
            return
        if not self.state.dirty:
            self._open(path)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._open(path)

        self.push_screen(ConfirmScreen("Discard unsaved changes?", f"The session has unsaved changes. Opening "
                                       f"{path} discards them (ctrl+s saves them first).", "Open", "Stay"), answer)

    def _open(self, path: Path) -> None:
        if self.state.busy == "follow":  # stop following first (that run goes on in its own process)
            self._open_after_follow = path
            self._leave.set()
            return
        target = runfolder.classify(path, self.pipeline)
        step = self._read_target(target, starting=False)
        if step is None:
            return
        if target.kind in ("session", "follow") or target.session is not None:
            state = self.state  # the results shown so far belong to the session being replaced
            state.results, state.results_path, state.samples = None, None, ("", "")
            state.set_saved_model(None, None)
        self.broadcast("session")
        self.refresh_bindings()
        if target.kind == "session" or (target.kind == "stopped" and target.session is not None):
            self.action_step(step)
        self._start_target(target)

    def action_run(self, fresh: bool = False, resume: bool = False) -> None:
        if self._refuse_invalid():
            return
        if self.state.busy is not None:
            self.notify(f"Wait for {job_label(self.state.busy)} to finish.", severity="warning", markup=False)
            return
        if resume and not self.pipeline.has_checkpoint(self.state.session):
            self.notify("Nothing to resume: this session has no interrupted importance pass (ctrl+r runs it).",
                        severity="warning", markup=False)
            return
        self.state.run_state.reset()
        if self.job_run(fresh=fresh):
            if self.screen.id != "run" and not self.screen.is_modal:
                self.switch_screen("run")
            self.broadcast("run_started")

    def action_cancel_run(self) -> None:
        """Ask, then set the should_stop flag: the engine stops after its current step."""
        job = self.state.busy
        if job is None:
            self.notify("Nothing is running.", markup=False)
            return

        def answer(yes: bool | None) -> None:
            if yes and self.state.busy == job:
                self._stop.set()
                self.state.run_state.stopping = job in ("run", "follow")
                self.state.run_state.version += 1
                self.notify(self._stopping_text(), markup=False)

        if job == "run":
            title, text = "Cancel the run?", ("The importance pass stops after the current batch and is "
                                              "checkpointed: you can resume it later (r).")
        elif job == "follow":
            title, text = "Stop the run?", ("The run in the other process stops after its current batch and is "
                                            "checkpointed: run the same command again to resume it.")
        else:
            title, text = f"Stop {job_label(job)}?", "It stops after its current step."
        self.push_screen(ConfirmScreen(title, text, "Stop", "Keep running"), answer)

    def request_allocation(self, session: Session, reason: str) -> None:
        if self.state.busy == "allocate":
            self._pending_alloc = (session, reason)
        elif self.state.busy is None:
            self.job_allocate(session, reason)
        else:
            self.notify(f"Wait for {job_label(self.state.busy)} to finish.", severity="warning", markup=False)

    def action_evaluate(self) -> None:
        if self._need_results():
            ctx, session = self._jobs(), self.state.session
            self._start("evaluate", lambda: jobs.evaluate(ctx, session))

    def action_save_model(self) -> None:
        if self._need_results():
            ctx, session = self._jobs(), self.state.session
            self._start("save_model", lambda: jobs.save_model(ctx, session))

    def action_generate(self, prompt: str | None = None) -> None:
        if self._need_results():
            ctx, session, text = self._jobs(), self.state.session, prompt or "Once upon a time"
            self._start("generate", lambda: jobs.sample(ctx, session, text))

    def _need_results(self) -> bool:
        if self.state.results is None:
            self.notify("Run the session first (ctrl+r) or open a results folder.", severity="warning", markup=False)
            return False
        return True

    async def action_quit(self) -> None:
        state = self.state
        if not (state.dirty or state.busy):
            self.exit(0)
            return
        why = []
        if state.dirty:
            why.append("the session has unsaved changes")
        if state.busy == "follow":
            self._leave_followed_run()
            self.exit(0)  # the followed run goes on in its own process
            return
        if state.busy:
            why.append(f"{state.busy} is still running (it will be stopped and checkpointed)")

        def answer(yes: bool | None) -> None:
            if yes:
                self._quitting = True
                self._stop_then_exit(EXIT_QUIT_RUN if state.busy == "run" else 0)

        self.push_screen(ConfirmScreen("Quit?", "; ".join(why).capitalize() + ".", "Quit", "Stay"), answer)

    # -- model inspection (Model step) -----------------------------------------------------------
    def inspect_model(self) -> None:
        state = self.state
        spec = str((state.form_data.get("model") or {}).get("id") or "")
        if not spec or (state.problems and any(p.startswith("model.") for p, _ in state.problems)):
            return
        session = state.session
        if session.model.id != spec:
            try:
                session = session.with_updates({"model.id": spec})
            except SessionError:
                return
        ctx = self._jobs()
        if self._start("inspect", lambda: (spec, jobs.inspect(ctx, session))):
            state.model_busy, state.model_error = spec, ""
            self.broadcast("model")

    def _inspected(self, spec: str, info: Any, error: str) -> None:
        state = self.state
        state.model_busy = None
        if spec == (state.form_data.get("model") or {}).get("id"):  # else the user moved on to another model
            state.model_info, state.model_error = info, error
        self.broadcast("model")

    # -- engine jobs -----------------------------------------------------------------------------
    def sink(self, event: Event) -> None:
        """The EventSink handed to the engine: called on the worker thread, so it only posts."""
        self.post_message(EngineEvent(event))

    def _jobs(self) -> JobContext:
        """The context of a job started now: the results folder shown, the memo, the sink and stop flag."""
        folder = self.state.results_path if self.state.results is not None else None
        return JobContext(self.pipeline, self.memo, self.sink, self._stop.is_set, out_dir=folder)

    def _start(self, name: str, fn: Callable[[], Any]) -> bool:
        if self.state.busy is not None:
            self.notify(f"Wait for {job_label(self.state.busy)} to finish.", severity="warning", markup=False)
            return False
        self.state.busy = name
        self._stop.clear()
        self._engine_worker(name, fn)
        self.refresh_bindings()
        return True

    @work(thread=True, group="engine", exit_on_error=False, name="engine")
    def _engine_worker(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except Interrupted as exc:
            self.post_message(JobFailed(name, exc, interrupted=True))
            return
        except BaseException as exc:  # reported in the UI, never raised into Textual
            self.post_message(JobFailed(name, exc))
            return
        self.post_message(JobDone(name, result))

    def job_run(self, *, fresh: bool = False) -> bool:
        """The whole session (a resume is the same call: the pass continues from its checkpoint)."""
        ctx, session = self._jobs(), self.state.session
        self._run_session = session
        return self._start("run", lambda: jobs.run_session(ctx, session, fresh=fresh))

    def job_allocate(self, session: Session, reason: str) -> bool:
        ctx = self._jobs()
        return self._start("allocate", lambda: (jobs.reallocate(ctx, session), session, reason))

    @work(thread=True, exclusive=True, group="check", exit_on_error=False)
    def job_check_checkpoint(self) -> None:
        """Look for an interrupted pass or finished results of the session (outside the job lock)."""
        session = self.state.session
        try:
            has, report = jobs.look_for_results(self.pipeline, session)
            folder = self.pipeline.results_dir_for(session)
            holder = engine.run_holder(folder) if folder.is_dir() else None
        except Exception:
            return
        self.post_message(JobDone("check", (session, has, report, holder, folder)))

    def job_follow(self, path: Path) -> bool:
        """Follow the run another process is writing into `path` (its event log) on the run screen."""
        ctx, leave = self._jobs(), self._leave.is_set
        self._leave.clear()
        self.state.run_state.reset()
        self.state.run_state.results_dir = str(path)
        started = self._start("follow", lambda: (path, jobs.follow(ctx, path, leave)))
        if started:
            self.call_after_refresh(self.action_show, "run")
        return started

    def job_open_results(self, path: Path) -> bool:
        pipeline = self.pipeline
        return self._start("open", lambda: (path, pipeline.read(path)))

    def on_engine_event(self, message: EngineEvent) -> None:
        self.state.run_state.apply(message.event)

    def on_job_done(self, message: JobDone) -> None:
        name, result, state = message.job, message.result, self.state
        if name == "check":
            self._checked(*result)
            return
        state.busy = None
        state.run_state.stopping = False
        if self._exit_after_job is not None:
            self.exit(return_code=0 if self._quitting else self._exit_after_job)  # finished: nothing lost
            return
        old = state.results
        if name == "run":
            self._remember_speed(state.session)
            state.results = from_report(result)
            state.results_path = state.results.results_dir
            state.engine_ready, state.samples = True, ("", "")
            state.set_saved_model(result.model_dir, result.session)
            state.run_state.results_dir = str(state.results_path or "")
            state.run_state.finish("done")
            self.broadcast("run_finished")
            if self.screen.id == "run":
                self.switch_screen("results")
        elif name in ("allocate", "tune"):
            report, session, reason = result
            self.set_session(session)
            state.results = from_report(report, previous=old.allocation if old else None,
                                        results_dir=state.results_path, from_folder=bool(old and old.from_folder))
            dense = (old.metrics.get("perplexity") or {}).get("before") if old else None
            if dense and _same_dense(old.session, session):  # the dense model's: still true
                state.results = replace(state.results, metrics={**state.results.metrics,
                                                                "perplexity": {"before": dense}})
            state.engine_ready = True
            a = state.results.allocation
            serious = serious_findings(state.results.findings)
            warn = f"; diagnosis: {serious} (d shows them)" if serious else ""
            self.notify((f"{reason}: achieved {a.achieved_ratio:.1%}" if a else reason) + warn, markup=False,
                        severity="warning" if serious else "information")
            if self._pending_alloc is not None:
                pending, self._pending_alloc = self._pending_alloc, None
                if pending[0] != state.session:
                    self.job_allocate(*pending)
        elif name == "evaluate":
            state.engine_ready = True
            if old is not None:
                state.results = replace(old, metrics={**old.metrics, "perplexity": result.perplexity})
        elif name == "save_model":
            report, folder, new_folder = result
            state.engine_ready = True
            state.set_saved_model(report.model_dir or folder / "model", report.session)
            if new_folder:  # a what-if: its own results folder, the one shown before stays as it was
                previous = state.results_path
                state.results = from_report(report, previous=old.allocation if old else None)
                state.results_path = state.results.results_dir or folder
                self.notify(f"Saved this what-if as a new results folder {folder} (model, metrics, session); "
                            f"{previous} is unchanged", timeout=10, markup=False)
            else:
                self.notify(f"Saved the pruned model to {state.saved_model_path}", markup=False)
        elif name == "recover":
            self.notify(f"Recovery: {result.summary()}; merged model in {result.out_dir}", timeout=12, markup=False)
        elif name == "generate":
            state.engine_ready, state.samples = True, result
        elif name == "inspect":
            spec, info = result
            self._inspected(spec, info, "")
        elif name == "follow":
            path, end = result
            kind, text = end
            pending, self._open_after_follow = self._open_after_follow, None
            if kind == "run_done" and pending is None:
                state.run_state.finish("done")
                self.broadcast("run_finished")
                self.refresh_bindings()
                self.job_open_results(path)
                return
            state.run_state.finish({"run_done": "done", "run_interrupted": "interrupted"}.get(kind, "failed"), text)
            self.broadcast("run_finished")
            if kind not in ("left", "run_done"):
                self.notify(f"The followed run ended: {text}", severity="warning", timeout=10, markup=False)
            if pending is not None:
                self.call_after_refresh(self._open, pending)
        elif name == "open":
            path, report = result
            self._show_report(report, path)
            if self.screen.id != "results" and not self.screen.is_modal:
                self.switch_screen("results")
        self.refresh_bindings()
        self.broadcast("results")

    def _remember_speed(self, session: Session) -> None:
        """The tokens/s of the pass that just ran calibrates the set-up's time estimate."""
        b = self.state.run_state.batch
        if b is not None and b.tokens_per_s > 0:
            key = self.state.speed_key(session.model.id, session.importance.method, session.model.device)
            self.state.speeds[key] = (float(b.tokens_per_s), int(session.data.seq_len))

    def _show_report(self, report: Any, path: Path) -> None:
        """Results read back from a folder become the shown results (and their session the current one)."""
        state = self.state
        state.results, state.results_path = from_report(report, from_folder=True, results_dir=path), path
        state.samples, state.engine_ready = ("", ""), False
        state.set_saved_model(report.model_dir, report.session)
        if isinstance(state.results.session, Session):
            state.session_path, state.saved_text = None, None
            self.set_session(state.results.session, saved=True)

    def _checked(self, session: Session, has: bool, report: Any, holder: Any = None,
                 folder: Path | None = None) -> None:
        """Offer to resume an interrupted pass, or show the session's finished results at once.

        A folder another live process is writing is never resumed here: the app offers to follow it.
        """
        state = self.state
        if state.busy is not None or session != state.session:
            return  # the user already moved on
        if holder is not None and folder is not None:
            def follow(yes: bool | None) -> None:
                if yes and self.state.busy is None:
                    self.job_follow(folder)

            self.push_screen(ConfirmScreen("This session is running elsewhere",
                                           f"{folder} is in use by {holder.describe()}. Resuming here would "
                                           "start a second pass into the same folder. Follow that run instead?",
                                           "Follow", "Not now"), follow)
            return
        if report is not None and state.results is None:
            state.results, state.results_path = from_report(report, from_folder=True), report.results_dir
            state.set_saved_model(report.model_dir, report.session)
            same = report.session.resolved().model_dump() == session.resolved().model_dump()
            if same and not self.screen.is_modal:
                self.switch_screen("results")
            else:
                self.notify(f"This session's last results ({report.results_dir}) are one key away: F4. "
                            "They were written with other settings.", markup=False)
            self.refresh_bindings()
            self.broadcast("results")
        if not has:
            return

        def answer(yes: bool | None) -> None:
            if yes and self.state.busy is None:
                self.action_run(resume=True)

        self.push_screen(ConfirmScreen("Resume the interrupted run?", "This session's importance pass was "
                                       "interrupted and checkpointed. Resume it now?", "Resume", "Not now"), answer)

    def on_job_failed(self, message: JobFailed) -> None:
        state, error = self.state, message.error
        state.busy = None
        state.run_state.stopping = False
        if self._exit_after_job is not None:
            if message.job == "run":
                state.run_state.finish("interrupted" if message.interrupted else "failed", str(error))
                if message.interrupted:
                    what = error.message if isinstance(error, PruneError) else str(error)
                    self.exit_note = self._resume_note(f"interrupted: {what}")
            self.exit(return_code=self._exit_after_job)
            return
        text = str(error) if isinstance(error, PruneError) else f"{type(error).__name__}: {error}"
        if message.job == "run":
            state.run_state.finish("interrupted" if message.interrupted else "failed", str(error))
            self.broadcast("run_finished")
        if message.job == "inspect":
            self._inspected(str(state.model_busy or ""), None, text)
        elif message.interrupted and message.job == "run":
            self.notify("Interrupted: the importance pass was checkpointed; press r on the run screen to resume.",
                        severity="warning", timeout=8, markup=False)
        elif message.interrupted:
            self.notify(f"Stopped {job_label(message.job)}.", severity="warning", markup=False)
        else:
            self.notify(text, title=f"{message.job} failed", severity="error", timeout=12, markup=False)
        self._pending_alloc = None
        self.refresh_bindings()
        self.broadcast("results")
