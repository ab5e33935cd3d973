"""Form rows bound to dotted session keys ("data.seq_len"): label, control, help, inline error.

The set-up steps are built from `FieldSpec`s; the screen reads every row into a plain dict, lets the
session schema validate it and hands each `SessionError.problems` entry back to the row whose key
it names, so an error shows at the field that causes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, RadioButton, RadioSet, Select, Static

from sessions import choices

Kind = Literal["text", "int", "float", "ints", "floats", "choice", "bool"]


class MarkedCheckbox(Checkbox):
    """A checkbox whose state shows without colour: "X" when on, blank when off (NO_COLOR, 16 colours)."""

    @property  # type: ignore[override]
    def BUTTON_INNER(self) -> str:
        return "X" if self.value else " "


class PickedRadioSet(RadioSet):
    """A RadioSet whose keyboard highlight starts on the chosen button (Textual's starts on the first), so
    Up / Down + Enter move from what is picked, not from the top."""

    def on_mount(self) -> None:
        self.call_after_refresh(self._highlight_pressed)  # after RadioSet's own mount highlights the first

    def _highlight_pressed(self) -> None:
        if self.pressed_index >= 0:
            self._selected = self.pressed_index  # the highlight (Textual has no public setter for it)


class MarkedRadioButton(RadioButton):
    """A radio button whose state shows without colour: "●" when chosen, blank otherwise."""

    @property  # type: ignore[override]
    def BUTTON_INNER(self) -> str:
        return "\u25cf" if self.value else " "


@dataclass(frozen=True)
class FieldSpec:
    key: str                      # dotted session key, e.g. "pruning.ratio"
    label: str
    kind: Kind = "text"
    help: str = ""
    choices: tuple[str, ...] = ()  # a "choice" without them offers the session schema's allowed values
    placeholder: str = ""

    def __post_init__(self) -> None:
        if self.kind == "choice" and not self.choices:
            object.__setattr__(self, "choices", choices(self.key))


def control_id(key: str) -> str:
    return "f-" + key.replace(".", "--")


def row_id(key: str) -> str:
    return "row-" + key.replace(".", "--")


def format_value(kind: Kind, value: Any) -> Any:
    """A session value as the control shows it."""
    if kind in ("ints", "floats"):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (value or []))
    if kind == "float" and isinstance(value, float):
        return f"{value:g}"
    if kind == "bool":
        return bool(value)
    return "" if value is None else str(value)


LIST_EXAMPLES = {"ints": ("whole numbers", "0, 1, -1"), "floats": ("numbers", "1, 99")}


def parse_value(kind: Kind, raw: Any) -> Any:
    """Control content -> session value; unparseable text is passed on so the schema names the problem.

    A list is numbers separated by commas (or semicolons); an empty item ("0,,1") or numbers separated by
    spaces ("0 1") do not parse, so they are reported rather than read as something else."""
    if kind in ("ints", "floats"):
        text = str(raw).strip().strip("[]").strip()
        if not text:
            return []
        try:
            return [int(p) if kind == "ints" else float(p) for p in text.replace(";", ",").split(",")]
        except ValueError:  # int() and float() refuse "", "0 1" and (for ints) "1.5"
            return str(raw)
    if kind == "int":
        try:
            return int(str(raw).strip())
        except ValueError:
            return str(raw)
    if kind == "float":
        try:
            return float(str(raw).strip())
        except ValueError:
            return str(raw)
    if kind == "bool":
        return bool(raw)
    return raw


def format_problem(kind: Kind, raw: Any) -> str | None:
    """What is wrong with the text of a list field, in the form's words (None when it parses)."""
    if kind not in LIST_EXAMPLES or not isinstance(parse_value(kind, raw), str):
        return None
    what, example = LIST_EXAMPLES[kind]
    return f"expected {what} separated by commas, e.g. {example} (got {str(raw)!r})"


class FieldRow(Vertical):
    """One labelled control with a help line and an error line that appears when the key has a problem."""

    DEFAULT_CSS = """
    FieldRow { height: auto; margin: 0; }
    FieldRow > Horizontal { height: auto; }
    FieldRow .field-label { width: 20; padding: 0 1 0 0; }
    FieldRow .field-control { width: 18; }
    FieldRow Checkbox.field-control { border: none; padding: 0; height: 1; background: $surface; }
    FieldRow .field-help { width: 1fr; padding: 0 0 0 1; color: $text-muted; }
    FieldRow .field-error { display: none; color: $text-error; padding: 0 0 0 20; }
    FieldRow.-invalid .field-error { display: block; }
    FieldRow.-invalid .field-label { color: $text-error; text-style: bold; }
    """

    def __init__(self, spec: FieldSpec, value: Any = None) -> None:
        super().__init__(id=row_id(spec.key))
        self.spec = spec
        self._initial = value

    def compose(self) -> ComposeResult:
        spec = self.spec
        with Horizontal():
            yield Label(spec.label, classes="field-label")
            yield self._make_control()
            yield Static(spec.help, classes="field-help")
        yield Static("", classes="field-error")

    def _make_control(self) -> Widget:
        spec, cid = self.spec, control_id(self.spec.key)
        value = format_value(spec.kind, self._initial)
        if spec.kind == "choice":
            options = [(c, c) for c in spec.choices]
            initial = value if value in spec.choices else Select.NULL
            return Select(options, value=initial, allow_blank=False, id=cid, compact=True,
                          classes="field-control")
        if spec.kind == "bool":
            return MarkedCheckbox("", value=bool(value), id=cid, classes="field-control")
        return Input(value=value, placeholder=spec.placeholder, id=cid, compact=True, classes="field-control",
                     select_on_focus=True)

    @property
    def control(self) -> Widget:
        return self.query_one(f"#{control_id(self.spec.key)}")

    def get_value(self) -> Any:
        c = self.control
        if isinstance(c, Select):
            raw: Any = c.value
        elif isinstance(c, Checkbox):
            raw = c.value
        else:
            raw = c.value  # type: ignore[attr-defined]
        return parse_value(self.spec.kind, raw)

    def format_problem(self) -> str | None:
        """Why the control's text is not a value of this field's kind (lists only; the schema names the rest)."""
        c = self.control
        return format_problem(self.spec.kind, c.value) if isinstance(c, Input) else None

    def set_value(self, value: Any) -> None:
        c, shown = self.control, format_value(self.spec.kind, value)
        if isinstance(c, Select):
            if shown in self.spec.choices and c.value != shown:
                c.value = shown
        elif isinstance(c, Checkbox):
            if c.value != bool(shown):
                c.value = bool(shown)
        elif isinstance(c, Input) and parse_value(self.spec.kind, c.value) != value:
            c.value = str(shown)

    def set_error(self, message: str | None) -> None:
        self.set_class(bool(message), "-invalid")
        self.query_one(".field-error", Static).update(Text(f"✗ {message}") if message else "")
