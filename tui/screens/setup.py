"""The set-up screen: six steps (Model, Dataset, Method, Length, Pruning, Review), back and forth freely.

Every edit re-validates the whole form against the session schema (`WorkbenchState.apply_form`);
each problem is shown at the field whose dotted key it names and listed on the Review step with the
step to go to. Run and inspect are request messages to the app.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    Footer,
    Header,
    Input,
    RadioSet,
    Select,
    Static,
    TabbedContent,
    TabPane,
)

from tui.messages import FormEdited, InspectRequested, RunRequested, StateChanged
from tui.screens.review import ReviewStep
from tui.screens.steps_base import Step
from tui.screens.steps_options import LengthStep, MethodStep, PruningStep
from tui.screens.steps_source import DatasetStep, ModelStep
from tui.state import WorkbenchState
from tui.widgets.fields import FieldRow, control_id

STEPS: tuple[type[Step], ...] = (ModelStep, DatasetStep, MethodStep, LengthStep, PruningStep, ReviewStep)
STEP_KEYS = tuple(s.key for s in STEPS)


class SetupScreen(Screen):
    """Guided set-up; PgDn/PgUp (or the buttons) move between steps, the tabs jump to any step."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("pagedown,ctrl+n", "next_step", "Next", key_display="PgDn", priority=True, id="setup.next",
                tooltip="Go to the next set-up step (also ctrl+n)."),
        Binding("pageup", "prev_step", "Back", key_display="PgUp", priority=True, id="setup.back",
                tooltip="Go to the previous set-up step."),
        Binding("i", "inspect", "Inspect", show=False, id="setup.inspect",
                tooltip="Resolve the model and show its layers, heads and size (Model step)."),
    ]

    def __init__(self, state: WorkbenchState, initial: str = "model") -> None:
        super().__init__(id="setup")
        self.state = state
        self.initial = initial if initial in STEP_KEYS else "model"

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="steps", initial=f"step-{self.initial}"):
            for cls in STEPS:
                with TabPane(cls.title, id=f"step-{cls.key}"):
                    yield cls(self.state, id=f"pane-{cls.key}")
        with Horizontal(id="setup-nav"):
            yield Button("◀ Back", id="nav-back", compact=True)
            yield Static("", id="nav-hint")
            yield Button("Next ▶", id="nav-next", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.revalidate()
        self._update_nav()
        self.call_after_refresh(self._focus_step)

    # -- navigation -------------------------------------------------------------------------
    @property
    def step(self) -> str:
        active = self.query_one("#steps", TabbedContent).active
        return active.removeprefix("step-") if active else STEP_KEYS[0]

    def go(self, key: str) -> None:
        if key not in STEP_KEYS:
            return
        self.query_one("#steps", TabbedContent).active = f"step-{key}"
        self._update_nav()
        self.call_after_refresh(self._focus_step)

    def action_next_step(self) -> None:
        i = STEP_KEYS.index(self.step)
        self.go(STEP_KEYS[min(i + 1, len(STEP_KEYS) - 1)])

    def action_prev_step(self) -> None:
        i = STEP_KEYS.index(self.step)
        self.go(STEP_KEYS[max(i - 1, 0)])

    def action_inspect(self) -> None:
        self.post_message(InspectRequested())

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_step":
            return self.step != STEP_KEYS[-1] or None
        if action == "prev_step":
            return self.step != STEP_KEYS[0] or None
        if action == "inspect":
            return self.step == "model"
        return True

    @on(TabbedContent.TabActivated, "#steps")
    def _tab(self) -> None:
        self._update_nav()
        self.query_one(f"#pane-{self.step}", Step).on_activated()
        self.refresh_bindings()

    def _focus_step(self) -> None:
        pane = self.query_one(f"#pane-{self.step}", Step)
        for widget in pane.query("OptionList, RadioSet, Input, Select, Checkbox, Button"):
            if widget.focusable and widget.display:
                widget.focus()
                return

    def _update_nav(self) -> None:
        i = STEP_KEYS.index(self.step)
        self.query_one("#nav-back", Button).disabled = i == 0
        nxt = self.query_one("#nav-next", Button)
        nxt.label = "Run ▶" if i == len(STEP_KEYS) - 1 else "Next ▶"
        n = len(self.state.problems)
        if n:
            verdict = f" · {n} problem{'s' if n != 1 else ''}"
        elif self.state.model_error:  # valid as a file, but its model does not load: never "valid"
            verdict = " · ✗ the model does not load (step 1)"
        else:
            verdict = " · valid"
        hint = f"step {i + 1} of {len(STEP_KEYS)}{verdict}"
        self.query_one("#nav-hint", Static).update(hint)

    @on(Button.Pressed, "#nav-back")
    def _back(self) -> None:
        self.action_prev_step()

    @on(Button.Pressed, "#nav-next")
    def _next(self) -> None:
        if self.step == STEP_KEYS[-1]:
            self.post_message(RunRequested())
        else:
            self.action_next_step()

    # -- the form ---------------------------------------------------------------------------
    def step_title_for(self, path: str) -> str:
        """Which step holds the field a problem names ("" when none does)."""
        for cls in STEPS:
            pane = self.query_one(f"#pane-{cls.key}", Step)
            if pane.query(f"#{control_id(path)}") or any(
                    path.startswith(r.spec.key + ".") for r in pane.query(FieldRow)):
                return f"step {cls.title}"
        return ""

    def gather(self) -> dict[str, Any]:
        """The form's raw values over the state's form data (unknown keys from a file are kept)."""
        data = copy.deepcopy(self.state.form_data)
        for row in self.query(FieldRow):
            section, _, key = row.spec.key.partition(".")
            node = data.setdefault(section, {})
            if isinstance(node, dict):
                node[key] = row.get_value()
        radio = self.query_one(f"#{control_id('importance.method')}", RadioSet)
        if radio.pressed_button is not None and radio.pressed_button.id:
            data.setdefault("importance", {})["method"] = radio.pressed_button.id.removeprefix("method-")
        return data

    def revalidate(self) -> None:
        state = self.state
        hints = {row.spec.key: msg for row in self.query(FieldRow) if (msg := row.format_problem())}
        state.apply_form(self.gather(), hints)
        self.post_message(FormEdited())
        by_key: dict[str, str] = {}
        for path, msg in state.problems:
            by_key.setdefault(path, msg)
        for row in self.query(FieldRow):
            key = row.spec.key
            msg = by_key.get(key) or next((m for p, m in by_key.items() if p.startswith(key + ".")), None)
            row.set_error(msg)
        for cls in STEPS:
            pane = self.query_one(f"#pane-{cls.key}", Step)
            bad = any(r.has_class("-invalid") for r in pane.query(FieldRow))
            tab = self.query_one("#steps", TabbedContent).get_tab(f"step-{cls.key}")
            tab.label = f"{cls.title} !" if bad else cls.title
            pane.on_form_changed()
        self._update_nav()

    def load_form(self) -> None:
        """Put the state's form data back into the controls (after open, a fix or a what-if change)."""
        data = self.state.form_data
        for row in self.query(FieldRow):
            section, _, key = row.spec.key.partition(".")
            node = data.get(section)
            if isinstance(node, dict) and key in node:
                row.set_value(node[key])
        method = (data.get("importance") or {}).get("method")
        for button in self.query(f"#{control_id('importance.method')} RadioButton"):
            if button.id == f"method-{method}" and not button.value:
                button.value = True  # type: ignore[attr-defined]
        self.revalidate()

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    @on(RadioSet.Changed)
    def _changed(self) -> None:
        if self.is_mounted:
            self.revalidate()

    def on_state_changed(self, message: StateChanged) -> None:
        if message.what in ("session", "opened"):
            self.load_form()
        else:
            for cls in STEPS:
                self.query_one(f"#pane-{cls.key}", Step).on_form_changed()
            self._update_nav()

    def on_screen_resume(self) -> None:
        self.load_form()
