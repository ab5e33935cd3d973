"""The key reference, read off the Binding lists themselves so the help screen and docs never drift."""

from __future__ import annotations

from textual.binding import Binding

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
    from tui.app import PruneApp
    from tui.screens.dialogs import ConfirmScreen
    from tui.screens.results import ResultsScreen
    from tui.screens.run import RunScreen
    from tui.screens.setup import SetupScreen

    out = []
    for title, cls in (("Everywhere", PruneApp), ("Set-up", SetupScreen), ("Run", RunScreen),
                       ("Results", ResultsScreen), ("Dialogs", ConfirmScreen)):
        rows = []
        for b in cls.BINDINGS:
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
