"""Workbench commands for Textual's command palette (ctrl+p)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from tui.app import PruneApp


def commands(app: PruneApp) -> list[tuple[str, str, Callable[[], object]]]:
    """(name, help, callback) for every palette command."""
    steps = [("1 Model", "model"), ("2 Dataset", "dataset"), ("3 Method", "method"), ("4 Length", "length"),
             ("5 Pruning", "pruning"), ("6 Review", "review")]
    out: list[tuple[str, str, Callable[[], object]]] = [
        ("Save session", "Write the session file (ctrl+s)", app.action_save),
        ("Save session as…", "Write the session to a new file", app.action_save_as),
        ("Open session or results…", "Open a session .toml or a results folder (ctrl+o)", app.action_open),
        ("Run", "Run the importance pass, allocation and diagnosis (ctrl+r)", app.action_run),
        ("Run fresh", "Run ignoring cached stages and checkpoints", partial(app.action_run, fresh=True)),
        ("Resume interrupted run", "Continue an interrupted importance pass", partial(app.action_run, resume=True)),
        ("Cancel run or job", "Stop after the current batch or step (a run stays resumable)",
         app.action_cancel_run),
        ("Show set-up", "Go to the set-up steps (F2)", partial(app.action_show, "setup")),
        ("Show run", "Go to the run progress (F3)", partial(app.action_show, "run")),
        ("Show results", "Go to results, diagnosis and what-if (F4)", partial(app.action_show, "results")),
        ("Evaluate perplexity", "Perplexity before and after pruning", app.action_evaluate),
        ("Save pruned model", "Save the pruned model in the results folder", app.action_save_model),
        ("Generate sample", "Short text from the original and the pruned model",
         lambda: app.action_generate(None)),
        ("Help: keys", "Every key binding (F1)", app.action_help),
    ]
    out += [(f"Set-up step {title}", f"Jump to the {key} step", partial(app.action_step, key))
            for title, key in steps]
    return out


class PruneCommands(Provider):
    """Palette entries for the workbench's actions."""

    @property
    def _app(self) -> PruneApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for name, help_text, callback in commands(self._app):
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in commands(self._app):
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
