"""Workbench commands for Textual's command palette (ctrl+p): each one posts a request message to the app."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui.messages import (
    CancelRequested,
    EvaluateRequested,
    HelpRequested,
    OpenRequested,
    RecoverRequested,
    Request,
    RunRequested,
    SampleRequested,
    SaveModelRequested,
    SaveRequested,
    ShowRequested,
    TuneRequested,
)

STEPS = (("1 Model", "model"), ("2 Dataset", "dataset"), ("3 Method", "method"), ("4 Length", "length"),
         ("5 Pruning", "pruning"), ("6 Review", "review"))


def commands() -> list[tuple[str, str, Callable[[], Request]]]:
    """(name, help, request factory) for every palette command."""
    out: list[tuple[str, str, Callable[[], Request]]] = [
        ("Save session", "Write the session file (ctrl+s)", SaveRequested),
        ("Save session as…", "Write the session to a new file", partial(SaveRequested, ask=True)),
        ("Open session or results…", "Open a session .toml or a results folder (ctrl+o)", OpenRequested),
        ("Run", "Run the whole session, as prune run does (ctrl+r)", RunRequested),
        ("Run fresh", "Run ignoring cached stages and checkpoints", partial(RunRequested, fresh=True)),
        ("Resume interrupted run", "Continue an interrupted importance pass", partial(RunRequested, resume=True)),
        ("Cancel run or job", "Stop after the current batch or step (a run stays resumable)", CancelRequested),
        ("Show set-up", "Go to the set-up steps (F2)", partial(ShowRequested, "setup")),
        ("Show run", "Go to the run progress (F3)", partial(ShowRequested, "run")),
        ("Show results", "Go to results, diagnosis and what-if (F4)", partial(ShowRequested, "results")),
        ("Evaluate perplexity", "Perplexity before and after pruning", EvaluateRequested),
        ("Tune the knobs", "Search normalization, budget, rate limits… by the proxy loss (60 s), like prune tune",
         TuneRequested),
        ("Save pruned model", "Save the pruned model in the results folder", SaveModelRequested),
        ("Recover (LoRA fine-tune)", "Fine-tune the saved pruned model with LoRA and compare perplexity, as prune "
         "recover does (resumes an interrupted one)", RecoverRequested),
        ("Recover fresh", "Recovery fine-tuning ignoring an interrupted one's checkpoint",
         partial(RecoverRequested, fresh=True)),
        ("Generate sample", "Short text from the original and the pruned model", SampleRequested),
        ("Help: keys", "Every key binding (F1)", HelpRequested),
    ]
    out += [(f"Set-up step {title}", f"Jump to the {key} step", partial(ShowRequested, "setup", key))
            for title, key in STEPS]
    return out


class PruneCommands(Provider):
    """Palette entries for the workbench's actions."""

    def _post(self, make: Callable[[], Request]) -> None:
        self.app.post_message(make())

    async def discover(self) -> Hits:
        for name, help_text, make in commands():
            yield DiscoveryHit(name, partial(self._post, make), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, make in commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self._post, make), help=help_text)
