"""PruneApp: the Textual workbench — guided set-up, live run view, results with diagnosis and what-if.

The app holds one session's state (the session being edited, its file, the live Workbench, the
results shown) and runs every engine call in a thread worker (see `tui.jobs`). Screens render that
state; they never call the engine themselves.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import tomlkit
from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.theme import Theme

import sessions
from prune_core.errors import PruneError
from sessions import Session, SessionError, check_against_model, validate_dict
from tui import engine, keys
from tui.commands import PruneCommands
from tui.jobs import JOB_LABELS, JobsMixin
from tui.messages import StateChanged
from tui.results_model import FindingView, ResultsData, perplexities
from tui.runstate import RunState
from tui.screens.dialogs import ConfirmScreen, HelpScreen, PathScreen
from tui.screens.results import ResultsScreen
from tui.screens.run import RunScreen
from tui.screens.setup import SetupScreen

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


class PruneApp(JobsMixin, App[int]):
    """The prune workbench."""

    CSS_PATH = "app.tcss"
    TITLE = "prune"
    COMMANDS = App.COMMANDS | {PruneCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1,question_mark", "help", "Help", key_display="F1", id="app.help",
                tooltip="Every key and a short guide (also ?)."),
        Binding("ctrl+s", "save", "Save", id="app.save", tooltip="Save the session file (asks for a name once)."),
        Binding("ctrl+r", "run", "Run", id="app.run",
                tooltip="Run the importance pass, allocation and diagnosis for this session."),
        Binding("ctrl+o", "open", "Open", show=False, id="app.open",
                tooltip="Open a session .toml or a results folder."),
        Binding("f2", "show('setup')", "Set-up", show=False, id="app.setup", tooltip="Show the set-up steps."),
        Binding("f3", "show('run')", "Run view", show=False, id="app.runview", tooltip="Show the run progress."),
        Binding("f4", "show('results')", "Results", show=False, id="app.results",
                tooltip="Show results, diagnosis and what-if."),
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit",
                tooltip="Quit (asks first when there are unsaved changes or a job is running)."),
    ]

    def __init__(self, path: Path | None = None, *, cpu_flops: float | None = None,
                 workbench_factory: Any = None, show_timings: bool = True) -> None:
        super().__init__()
        self.start_path = path
        self.workbench_factory = workbench_factory or engine.new_workbench
        self.show_timings = show_timings
        self.cpu_flops = cpu_flops
        self.has_cuda = False
        self.session = Session()
        self.form_data: dict[str, Any] = self.session.model_dump()
        self.problems: list[tuple[str, str]] = []
        self.session_path: Path | None = None
        self.saved_dump: dict[str, Any] = self.session.model_dump()
        self.saved_form: dict[str, Any] = copy.deepcopy(self.form_data)
        self.saved_text: str | None = None
        self.builtin_models: list[dict[str, Any]] = []
        self.model_info: engine.ModelInfo | None = None
        self.model_busy: str | None = None
        self.model_error = ""
        self.run_state = RunState()
        self.workbench: Any = None
        self._job_workbench: Any = None
        self.results: ResultsData | None = None
        self.results_path: Path | None = None
        self.saved_model_path: Path | None = None
        self.samples: tuple[str, str] = ("", "")
        self.busy: str | None = None
        self._stop = threading.Event()
        self._pending_alloc: tuple[Session, str] | None = None

    # -- start-up --------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.register_theme(PRUNE_THEME)
        self.theme = "prune"
        initial = self._load_start_path()
        self.install_screen(SetupScreen(initial), "setup")
        self.install_screen(RunScreen(), "run")
        self.install_screen(ResultsScreen(), "results")
        self.push_screen("setup")
        self.update_title()
        if self.cpu_flops is None:
            self._measure()
        path = self.start_path
        if path is not None and engine.is_results_folder(path):
            self.job_open_results(path)
        elif self.session_path is not None and self.session_path.is_file() and not self.problems:
            self.job_check_checkpoint()

    def _load_start_path(self) -> str:
        """Read the path given on the command line; return the set-up step to start at."""
        path = self.start_path
        if path is None or engine.is_results_folder(path):
            return "model"
        if path.is_dir():
            self.notify(f"{path} is not a results folder (no session.toml)", severity="error")
            return "model"
        if not path.exists():
            self.session_path = path
            with contextlib.suppress(SessionError):  # a new file: name the session after it if that is valid
                self.set_session(self.session.with_updates({"session.name": path.stem}), saved=True)
            return "model"
        self.session_path = path
        self.saved_text = path.read_text(encoding="utf-8")
        try:
            self.set_session(sessions.parse_text(self.saved_text, source=str(path)), saved=True)
        except SessionError as exc:
            try:
                raw = tomllib.loads(self.saved_text)
            except tomllib.TOMLDecodeError:
                raw = {}
            self.form_data = _deep_merge(Session().model_dump(), raw)
            self.saved_form = copy.deepcopy(self.form_data)
            self.problems = list(exc.problems)
        return "review"

    @work(thread=True, group="measure", exit_on_error=False)
    def _measure(self) -> None:
        flops, cuda = engine.measure_cpu_flops(), engine.cuda_available()
        self.call_from_thread(self._measured, flops, cuda)

    def _measured(self, flops: float, cuda: bool) -> None:
        self.cpu_flops, self.has_cuda = flops, cuda
        self.broadcast("estimate")

    def gpu_for(self, device: str) -> bool:
        return device.startswith("cuda") or (device == "auto" and self.has_cuda)

    # -- session state ---------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        if self.problems:
            return self.form_data != self.saved_form
        return self.session.model_dump() != self.saved_dump

    def update_title(self) -> None:
        name = (self.form_data.get("session") or {}).get("name") or self.session.session.name
        self.title = f"prune — {name}{' *' if self.dirty else ''}"
        self.sub_title = str(self.session_path) if self.session_path else "not saved"

    def broadcast(self, what: str) -> None:
        """Tell the active screen to re-read the app state (inactive ones re-read when shown)."""
        self.screen.post_message(StateChanged(what))

    def set_session(self, session: Session, *, saved: bool = False) -> None:
        self.session = session
        self.form_data = session.model_dump()
        self.problems = []
        if saved:
            self.saved_dump = session.model_dump()
            self.saved_form = copy.deepcopy(self.form_data)
        self.update_title()
        if self.is_running:
            self.broadcast("session")

    def apply_form(self, data: dict[str, Any]) -> None:
        """Validate the set-up form; a valid form becomes the session, problems are kept for display."""
        self.form_data = data
        try:
            session: Session | None = validate_dict(copy.deepcopy(data), source="form")
            problems: list[tuple[str, str]] = []
        except SessionError as exc:
            session, problems = None, list(exc.problems)
        info = self.model_info
        if session is not None and info is not None and info.spec == session.model.id and info.layers:
            problems += check_against_model(session, info.layers)
        self.problems = problems
        if session is not None:
            self.session = session
        self.update_title()

    def draft_toml(self) -> str:
        """The session as it will be saved (or, while invalid, the form's raw values)."""
        if not self.problems:
            return sessions.dumps(self.session, self.saved_text)
        try:
            return "# not valid yet: see the problems above\n" + tomlkit.dumps(self.form_data)
        except Exception:
            return "# not valid yet: see the problems above\n"

    def action_status(self) -> str:
        lines = []
        if self.busy:
            cur = self.run_state.current
            step = ""
            if cur is not None:
                step = f" · {cur.name}"
                if cur.total:
                    step += f" {cur.done:g}/{cur.total:g} {cur.unit}".rstrip()
            lines.append(f"Working: {JOB_LABELS.get(self.busy, self.busy)}{step}… (x stops it)")
        if self.results is not None:
            before, after = perplexities(self.results.metrics)
            if before is not None or after is not None:
                b = f"{before:.2f}" if before is not None else "?"
                a = f"{after:.2f}" if after is not None else "?"
                lines.append(f"Perplexity before {b} → after {a}")
            if self.results.results_dir:
                lines.append(f"Results folder: {self.results.results_dir}")
        if self.saved_model_path:
            lines.append(f"Pruned model saved to {self.saved_model_path}")
        return "\n".join(lines) or "Evaluate, save the pruned model, or generate a sample below."

    # -- actions ---------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "run":  # shown (and active) where it makes sense: set-up and run views
            return self.screen.id in ("setup", "run")
        return True

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(keys.markdown()))

    def action_show(self, name: str) -> None:
        if name == "results" and self.results is None:
            self.notify("No results yet: run the session (ctrl+r) or open a results folder (ctrl+o).")
            return
        if self.screen.id != name and not self.screen.is_modal:
            self.switch_screen(name)

    def action_step(self, key: str) -> None:
        self.action_show("setup")
        self.call_after_refresh(lambda: self.get_screen("setup").go(key))  # type: ignore[attr-defined]

    def _refuse_invalid(self) -> bool:
        if self.problems:
            n = len(self.problems)
            self.notify(f"The session has {n} problem{'s' if n != 1 else ''}: see step 6 Review.", severity="error")
            self.action_step("review")
            return True
        return False

    def action_save(self) -> None:
        if self._refuse_invalid():
            return
        if self.session_path is None:
            self.action_save_as()
            return
        self.write_session(self.session_path)

    def write_session(self, path: Path) -> None:
        try:
            sessions.save(self.session, path)
        except (OSError, PruneError) as exc:
            self.notify(f"Cannot save {path}: {exc}", severity="error")
            return
        self.session_path = path
        self.saved_text = path.read_text(encoding="utf-8")
        self.saved_dump = self.session.model_dump()
        self.saved_form = copy.deepcopy(self.form_data)
        self.update_title()
        self.notify(f"Saved {path}")
        self.broadcast("saved")

    def action_save_as(self) -> None:
        if self._refuse_invalid():
            return
        default = str(self.session_path or Path(f"{self.session.session.name}.toml"))

        def chosen(value: str | None) -> None:
            if value:
                self.write_session(Path(value).expanduser())

        self.push_screen(PathScreen("Save the session as", default), chosen)

    def action_open(self) -> None:
        def chosen(value: str | None) -> None:
            if value:
                self.open_path(Path(value).expanduser())

        self.push_screen(PathScreen("Open a session file or a results folder", str(self.session_path or "")), chosen)

    def open_path(self, path: Path) -> None:
        if engine.is_results_folder(path):
            self.job_open_results(path)
            return
        try:
            session = sessions.load(path)
        except PruneError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.session_path, self.saved_text = path, path.read_text(encoding="utf-8")
        self.workbench, self.results, self.samples, self.saved_model_path = None, None, ("", ""), None
        self.set_session(session, saved=True)
        self.action_step("review")
        self.job_check_checkpoint()

    def action_run(self, fresh: bool = False, resume: bool = False) -> None:
        if self._refuse_invalid():
            return
        if self.busy is not None:
            self.notify(f"Wait for {self.busy} to finish.", severity="warning")
            return
        self.run_state.reset()
        if not resume:
            self.workbench = None
        if self.job_run(fresh=fresh, resume=resume):
            if self.screen.id != "run" and not self.screen.is_modal:
                self.switch_screen("run")
            self.broadcast("run_started")

    def action_cancel_run(self) -> None:
        """Ask, then set the should_stop flag: the engine stops after its current step."""
        job = self.busy
        if job is None:
            self.notify("Nothing is running.")
            return

        def answer(yes: bool | None) -> None:
            if yes and self.busy == job:
                self._stop.set()
                self.notify("Stopping after the current step…")

        if job == "run":
            title, text = "Cancel the run?", ("The importance pass stops after the current batch and is "
                                              "checkpointed: you can resume it later (r).")
        else:
            title, text = f"Stop {JOB_LABELS.get(job, job)}?", "It stops after its current step."
        self.push_screen(ConfirmScreen(title, text, "Stop", "Keep running"), answer)

    def request_allocation(self, session: Session, reason: str) -> None:
        if self.busy == "allocate":
            self._pending_alloc = (session, reason)
        elif self.busy is None:
            self.job_allocate(session, reason)
        else:
            self.notify(f"Wait for {self.busy} to finish.", severity="warning")

    def apply_fix(self, finding: FindingView) -> None:
        try:
            new = self.session.with_updates(finding.fix)
        except SessionError as exc:
            self.notify(f"The fix does not apply: {exc.problems}", severity="error")
            return
        self.request_allocation(new, reason=f"fix for {finding.issue}")

    def action_evaluate(self) -> None:
        if self._need_results():
            self.job_simple("evaluate", lambda wb: (wb.evaluate(), wb.save_results())[0])

    def action_save_model(self) -> None:
        if self._need_results():
            self.job_simple("save_model", lambda wb: wb.save_model())

    def action_generate(self, prompt: str | None = None) -> None:
        if self._need_results():
            text = prompt or "Once upon a time"
            self.job_simple("generate", lambda wb: wb.generate_sample(text))

    def _need_results(self) -> bool:
        if self.results is None:
            self.notify("Run the session first (ctrl+r) or open a results folder.", severity="warning")
            return False
        return True

    async def action_quit(self) -> None:
        if not (self.dirty or self.busy):
            self.exit(0)
            return
        why = []
        if self.dirty:
            why.append("the session has unsaved changes")
        if self.busy:
            why.append(f"{self.busy} is still running (it will be stopped and checkpointed)")

        def answer(yes: bool | None) -> None:
            if yes:
                self._stop.set()
                self.exit(0)

        self.push_screen(ConfirmScreen("Quit?", "; ".join(why).capitalize() + ".", "Quit", "Stay"), answer)

    # -- model inspection (Model step) -----------------------------------------------------------
    def inspect_model(self) -> None:
        spec = str((self.form_data.get("model") or {}).get("id") or "")
        if not spec or (self.problems and any(p.startswith("model.") for p, _ in self.problems)):
            return
        self.model_busy, self.model_error = spec, ""
        self.broadcast("model")
        session = self.session
        if session.model.id != spec:
            try:
                session = session.with_updates({"model.id": spec})
            except SessionError:
                return
        self._inspect(session)

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def _inspect(self, session: Session) -> None:
        try:
            info, error = engine.inspect_model(session), ""
        except Exception as exc:
            info, error = None, str(exc)
        with contextlib.suppress(RuntimeError):
            self.call_from_thread(self._inspected, session.model.id, info, error)

    def _inspected(self, spec: str, info: engine.ModelInfo | None, error: str) -> None:
        if spec != (self.form_data.get("model") or {}).get("id"):
            return  # the user moved on to another model
        self.model_busy, self.model_info, self.model_error = None, info, error
        self.broadcast("model")
