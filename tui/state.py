"""The workbench's state: one plain object the app owns and hands to every screen it builds.

Screens and widgets read what they show from a `WorkbenchState` and ask the app for changes by
posting request messages (`tui.messages`); they never import the app. Only the app (on the UI
thread) mutates the job-related parts; the set-up screen folds its form in with `apply_form`.
Nothing here touches Textual or the engine, so it is testable on its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

import sessions
from sessions import Session, SessionError, check_against_model, validate_dict
from sessions.presets import recommended
from tui.engine import ModelInfo
from tui.results_model import ResultsData, perplexities
from tui.runstate import RunState

JOB_LABELS = {
    "run": "the run", "allocate": "re-allocation", "evaluate": "evaluation", "save_model": "saving the model",
    "generate": "text generation", "check": "looking for a checkpoint", "open": "opening results",
    "inspect": "inspecting the model", "tune": "tuning the knobs", "recover": "recovery fine-tuning",
}


def job_label(job: str) -> str:
    """A job's name as a sentence fragment ("the run", "evaluation", ...)."""
    return JOB_LABELS.get(job, job)


@dataclass
class WorkbenchState:
    """Everything the screens show: the session being edited, the model facts, the run, the results."""

    session: Session = field(default_factory=lambda: recommended())  # a new session: the measured best
    form_data: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    session_path: Path | None = None
    saved_dump: dict[str, Any] = field(default_factory=dict)
    saved_form: dict[str, Any] = field(default_factory=dict)
    saved_text: str | None = None
    # the Model step
    builtin_models: list[dict[str, Any]] = field(default_factory=list)
    model_info: ModelInfo | None = None
    model_busy: str | None = None
    model_error: str = ""
    # the machine (for the estimate)
    cpu_flops: float | None = None
    has_cuda: bool = False
    show_timings: bool = True
    # jobs and their outcomes
    run_state: RunState = field(default_factory=RunState)
    busy: str | None = None
    results: ResultsData | None = None
    results_path: Path | None = None
    saved_model_path: Path | None = None
    samples: tuple[str, str] = ("", "")
    engine_ready: bool = False     # the app's memo holds the importance: a what-if needs no model load
    # measured speed of real passes: "model|method|device" -> (tokens/s, seq_len), calibrates the estimate
    speeds: dict[str, tuple[float, int]] = field(default_factory=dict)

    @staticmethod
    def speed_key(model: str, method: str, device: str) -> str:
        return f"{model}|{method}|{device}"

    def __post_init__(self) -> None:
        if not self.form_data:
            self.form_data = self.session.model_dump()
        if not self.saved_dump:
            self.saved_dump = self.session.model_dump()
        if not self.saved_form:
            self.saved_form = copy.deepcopy(self.form_data)

    # -- the session ------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Unsaved changes (of the form while it is invalid, of the session otherwise)."""
        if self.problems:
            return self.form_data != self.saved_form
        return self.session.model_dump() != self.saved_dump

    @property
    def name(self) -> str:
        return (self.form_data.get("session") or {}).get("name") or self.session.session.name

    def title(self) -> str:
        return f"prune — {self.name}{' *' if self.dirty else ''}"

    def sub_title(self) -> str:
        return str(self.session_path) if self.session_path else "not saved"

    def set_session(self, session: Session, *, saved: bool = False) -> None:
        """Make `session` the current (valid) session; `saved` marks it as what is on disk."""
        self.session = session
        self.form_data = session.model_dump()
        self.problems = []
        if saved:
            self.mark_saved()

    def mark_saved(self, text: str | None = None) -> None:
        self.saved_dump = self.session.model_dump()
        self.saved_form = copy.deepcopy(self.form_data)
        if text is not None:
            self.saved_text = text

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
        if session is not None:  # a dataset path that does not exist, a text too short for the windows
            from prune_core.preflight import data_problems

            problems += data_problems(session)
        self.problems = problems
        if session is not None:
            self.session = session

    def draft_toml(self) -> str:
        """The session as it will be saved (or, while invalid, the form's raw values)."""
        if not self.problems:
            return sessions.dumps(self.session, self.saved_text)
        try:
            return "# not valid yet: see the problems above\n" + tomlkit.dumps(self.form_data)
        except Exception:
            return "# not valid yet: see the problems above\n"

    def gpu_for(self, device: str) -> bool:
        return device.startswith("cuda") or (device == "auto" and self.has_cuda)

    # -- jobs -------------------------------------------------------------------------------------
    def status_text(self) -> str:
        """The Actions tab's status: the running job, perplexities, where results and the model are."""
        lines = []
        if self.busy:
            cur = self.run_state.current
            step = ""
            if cur is not None:
                step = f" · {cur.name}"
                if cur.total:
                    step += f" {cur.done:g}/{cur.total:g} {cur.unit}".rstrip()
            lines.append(f"Working: {job_label(self.busy)}{step}… (x stops it)")
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
