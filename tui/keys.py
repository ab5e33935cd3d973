"""The app-wide key bindings and the key reference, read off the Binding lists themselves so the help
screen and docs never drift. The app takes `APP_BINDINGS` from here; the screens declare their own."""

from __future__ import annotations

from textual.binding import Binding, BindingType

APP_BINDINGS: list[BindingType] = [
    Binding("f1,question_mark", "help", "Help", key_display="F1", id="app.help",
            tooltip="Every key and a short guide (also ?)."),
    Binding("ctrl+s", "save", "Save", id="app.save", tooltip="Save the session file (asks for a name once)."),
    Binding("ctrl+r", "run", "Run", id="app.run",
            tooltip="Run the whole session, as prune run does (importance, allocation, diagnosis, evaluation, model)."),
    Binding("ctrl+o", "open", "Open", show=False, id="app.open",
            tooltip="Open a session .toml or a results folder."),
    Binding("f2", "show('setup')", "Set-up", show=False, id="app.setup", tooltip="Show the set-up steps."),
    Binding("f3", "show('run')", "Run view", show=False, id="app.runview", tooltip="Show the run progress."),
    Binding("f4", "show('results')", "Results", show=False, id="app.results",
            tooltip="Show results, diagnosis and what-if."),
    Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit",
            tooltip="Quit (asks first when there are unsaved changes or a job is running)."),
    Binding("ctrl+c", "interrupt", "Interrupt", show=False, priority=True, id="app.interrupt",
            tooltip="As in prune run: stop the run after this batch (checkpointed) and exit 130; pressed again, "
                    "it says what stopping at once loses, a third time it does that (asks first about unsaved changes)."),
]

GUIDE = """\
**prune workbench.** Set up a session in six steps (PgDn / PgUp or the tabs), run the importance pass,
then read the allocation and diagnosis, try what-ifs and export. Everything works from the keyboard:
Tab / Shift+Tab move between fields, Enter picks, Escape leaves a field. The command palette
(ctrl+p) lists every command. ctrl+s may freeze terminals that use XON/XOFF flow control outside
the app; inside the workbench it is safe, and "Save session" is also in the palette.
"""


NAMES = {"question_mark": "?", "pagedown": "PgDn", "pageup": "PgUp", "escape": "Esc", "enter": "Enter"}


def _key_name(binding: Binding) -> str:
    """Every key of a binding, e.g. "F1 / ?" (the footer shows only the first)."""
    keys = [k.strip() for k in binding.key.split(",")]
    return " / ".join(NAMES.get(k, k.upper() if k.startswith("f") and k[1:].isdigit() else k) for k in keys)


def sections() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(context, [(keys, description, tooltip)]) for the app and each main screen."""
    from tui.screens.dialogs import ConfirmScreen
    from tui.screens.results import ResultsScreen
    from tui.screens.run import RunScreen
    from tui.screens.setup import SetupScreen

    out = []
    for title, bindings in (("Everywhere", APP_BINDINGS), ("Set-up", SetupScreen.BINDINGS),
                            ("Run", RunScreen.BINDINGS), ("Results", ResultsScreen.BINDINGS),
                            ("Dialogs", ConfirmScreen.BINDINGS)):
        rows = []
        for b in bindings:
            if isinstance(b, Binding) and not b.system:
                rows.append((_key_name(b), b.description, b.tooltip))
        out.append((title, rows))
    return out


def markdown(include_guide: bool = True) -> str:
    parts = ["# Keys of the prune workbench\n"]
    if include_guide:
        parts.append(GUIDE)
    for title, rows in sections():
        parts.append(f"\n## {title}\n\n| Key | Action | What it does |\n|---|---|---|")
        parts.extend(f"| `{k}` | {d} | {t} |" for k, d, t in rows)
    parts.append("\nThe command palette (ctrl+p) also has: open, save as, run fresh, the set-up steps, "
                 "evaluate, save model, sample, help.\n")
    return "\n".join(parts)


if __name__ == "__main__":  # python -m tui.keys > docs/tui_keys.md
    print(markdown(), end="")
