"""Set-up step 6: the session exactly as it will be saved (TOML), with every validation problem listed."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Static

from tui.messages import RunRequested, SaveRequested
from tui.screens.steps_base import Step
from tui.widgets.fields import FieldSpec

REVIEW_FIELDS = (
    FieldSpec("session.name", "session name", "text", "results: <output dir>/<name>/"),
    FieldSpec("session.output_dir", "output dir", "text", "holds the results folders"),
)


def toml_text(toml: str) -> Text:
    """TOML with light highlighting that reads in 256 colours and without colour: tables bold, comments dim."""
    text = Text()
    for line in toml.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            text.append(line, style="dim")
        elif stripped.startswith("["):
            head, sep, comment = line.partition(" #")
            text.append(head, style="bold")
            text.append(sep + comment, style="dim")
        else:
            code, sep, comment = line.partition(" # ")
            key, eq, value = code.partition("=")
            text.append(key)
            text.append(eq)
            text.append(value, style="bold")
            text.append(sep + comment, style="dim")
        text.append("\n")
    return text


class ReviewStep(Step):
    key = "review"
    title = "6 Review"

    def compose(self) -> ComposeResult:
        for spec in REVIEW_FIELDS:
            yield self.row(spec)
        yield Static("", id="review-problems")
        with Horizontal(id="review-buttons"):
            yield Button("Save  ^s", id="review-save", compact=True)
            yield Button("Run  ^r", id="review-run", compact=True, variant="primary")
        yield Static("", id="review-toml")

    def on_mount(self) -> None:
        self.on_form_changed()

    def on_form_changed(self) -> None:
        state = self.state
        problems = state.problems
        box = self.query_one("#review-problems", Static)
        if problems:
            text = Text()
            text.append(f"✗ {len(problems)} problem{'s' if len(problems) != 1 else ''} "
                        "(fix them before saving or running):\n", style="bold red")
            screen = self.screen
            for path, msg in problems:
                where = getattr(screen, "step_title_for", lambda _k: "")(path)
                text.append(f"  {path}", style="bold")
                text.append(f": {msg}")
                if where:
                    text.append(f"  → {where}", style="dim")
                text.append("\n")
            box.update(text)
        else:
            target = state.session_path or "(not saved yet: ctrl+s asks for a file name)"
            text = Text(f"✓ valid · saves to {target}", style="green")
            if state.model_error:  # the file is valid, but the run would fail at the model stage
                text.append(f"\n✗ the model does not load: {state.model_error}", style="red")
            box.update(text)
        self.query_one("#review-toml", Static).update(toml_text(state.draft_toml()))

    @on(Button.Pressed, "#review-save")
    def _save(self) -> None:
        self.post_message(SaveRequested())

    @on(Button.Pressed, "#review-run")
    def _run(self) -> None:
        self.post_message(RunRequested())
