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
    saved_model_session: Session | None = None  # the session whose pruned model is at saved_model_path
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

    def apply_form(self, data: dict[str, Any], hints: dict[str, str] | None = None) -> None:
        """Validate the set-up form; a valid form becomes the session, problems are kept for display.

        Every problem shows, not only the schema's: the checks that need a whole session (layer indices
        against the inspected model, the dataset's size) run on the form with its invalid values put back
        to the last valid ones. `hints` are the form's own words for a field it could not read (a list).
        """
        self.form_data = data
        try:
            session: Session | None = validate_dict(copy.deepcopy(data), source="form")
            problems: list[tuple[str, str]] = []
        except SessionError as exc:
            session, problems = None, list(exc.problems)
        bad = {p for p, _ in problems}
        checked = session if session is not None else self._repaired(data, bad)
        if checked is not None:
            problems += [(p, m) for p, m in self._session_checks(checked) if p not in bad]
        hints = hints or {}
        problems = [(p, hints.get(p, m)) for p, m in problems]
        problems += [(p, m) for p, m in hints.items() if p not in {q for q, _ in problems}]
        self.problems = problems
        if session is not None:
            self.session = session

    def _repaired(self, data: dict[str, Any], bad: set[str]) -> Session | None:
        """The form with each invalid value put back to the last valid session's (None if still invalid)."""
        fixed, good = copy.deepcopy(data), self.session.model_dump()
        for path in bad:
            section, _, key = path.partition(".")
            key = key.partition(".")[0]
            node = fixed.get(section)
            if not isinstance(node, dict) or section not in good:
                fixed[section] = copy.deepcopy(good.get(section, {}))
            elif not key:
                fixed[section] = copy.deepcopy(good[section])
            elif key in good[section]:
                node[key] = copy.deepcopy(good[section][key])
            else:
                node.pop(key, None)  # an unknown key (a typo in a file)
        try:
            return validate_dict(fixed, source="form")
        except SessionError:
            return None

    def _session_checks(self, session: Session) -> list[tuple[str, str]]:
        """Problems only a whole session shows: layers of the inspected model, the dataset's size."""
        problems: list[tuple[str, str]] = []
        info = self.model_info
        if info is not None and info.spec == session.model.id and info.layers:
            problems += check_against_model(session, info.layers)
        from prune_core.preflight import data_problems  # a dataset path that does not exist, a short text

        return problems + list(data_problems(session))

    def draft_toml(self) -> str:
        """The session as it will be saved (or, while invalid, the form's raw values)."""
        if not self.problems:
            return sessions.dumps(self.session, self.saved_text)
        try:
            return "# not valid yet: see the problems above\n" + tomlkit.dumps(self.form_data)
        except Exception:
            return "# not valid yet: see the problems above\n"

    def set_saved_model(self, path: Path | None, session: Session | None) -> None:
        """Where the pruned model of `session` is saved (None: no saved model)."""
        self.saved_model_path, self.saved_model_session = path, (session if path else None)

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
            if self.saved_model_session is None or self.saved_model_session.same_model(self.session):
                lines.append(f"Pruned model saved to {self.saved_model_path}")
            else:
                lines.append(f"{self.saved_model_path} holds the model of the earlier allocation, "
                             "not of this one (m saves this one)")
        return "\n".join(lines) or "Evaluate, save the pruned model, or generate a sample below."
