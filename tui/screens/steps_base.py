"""The base of a set-up step: a scrolling pane of field rows bound to session keys, reading the
`WorkbenchState` the set-up screen hands it."""

from __future__ import annotations

from typing import Any

from textual.containers import VerticalScroll
from textual.widgets import Static

from tui.state import WorkbenchState
from tui.widgets.fields import FieldRow, FieldSpec


def value_at(data: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    node = data.get(section)
    return node.get(name) if isinstance(node, dict) else None


class Step(VerticalScroll):
    """One set-up step. Subclasses compose their widgets; `row()` makes a bound FieldRow."""

    DEFAULT_CSS = """
    Step { padding: 0 1; }
    Step .step-intro { color: $text-muted; margin: 0 0 1 0; }
    """
    key = "step"
    title = "Step"

    def __init__(self, state: WorkbenchState, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state = state

    def row(self, spec: FieldSpec) -> FieldRow:
        return FieldRow(spec, value_at(self.state.form_data, spec.key))

    def intro(self, text: str) -> Static:
        return Static(text, classes="step-intro")

    def _revalidate(self) -> None:
        """Fold the controls into the state's form now (not when the Changed messages arrive)."""
        revalidate = getattr(self.screen, "revalidate", None)
        if revalidate is not None:
            revalidate()

    def on_form_changed(self) -> None:
        """Called by the set-up screen after the form was re-validated."""

    def on_activated(self) -> None:
        """Called when the step becomes the visible one."""
