"""Diagnosis findings: a list ordered by severity, each with a colour AND a text marker ([CRIT] ...)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from tui.results_model import FindingView

STYLES = {"critical": "bold reverse red", "high": "bold red", "warning": "yellow", "info": "cyan"}


def finding_label(f: FindingView) -> Text:
    text = Text()
    text.append(f.marker, style=STYLES.get(f.severity, ""))
    text.append(f" {f.issue}")
    if f.fix:
        tried = "  (fix tried: removes less)" if f.verdict == "smaller" else "  (fix tried: worse)"
        text.append("  (fix)" if f.recommended else tried, style="dim")
    return text


class FindingsList(OptionList):
    """Findings, most severe first; highlighting one shows it in the `FindingDetail` next to it."""

    DEFAULT_CSS = """
    FindingsList { height: auto; max-height: 10; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.findings: list[FindingView] = []

    def show(self, findings: list[FindingView]) -> None:
        self.findings = list(findings)
        old = self.highlighted
        self.clear_options()
        if not findings:
            self.add_option(Option(Text("[ OK ] no problems found", style="green"), id="none", disabled=True))
            return
        self.add_options([Option(finding_label(f), id=f"finding-{i}") for i, f in enumerate(findings)])
        self.highlighted = min(old or 0, len(findings) - 1)

    @property
    def selected(self) -> FindingView | None:
        i = self.highlighted
        if i is None or not self.findings or i >= len(self.findings):
            return None
        return self.findings[i]


class FindingDetail(Static):
    """Description, recommendation and the fix (session updates) of one finding."""

    def show(self, f: FindingView | None) -> None:
        if f is None:
            self.update("Select a finding to read what it means and what to do.")
            return
        text = Text()
        text.append(f"{f.marker} {f.issue}\n", style=STYLES.get(f.severity, "bold"))
        text.append(f"{f.description}\n\n")
        text.append("Recommendation: ", style="bold")
        text.append(f"{f.recommendation}\n")
        if f.fix:
            fix = ", ".join(f"{k} = {v!r}" for k, v in f.fix.items())
            tried = "Tried, removes less than asked: " if f.verdict == "smaller" else "Tried, made the proxy worse: "
            text.append("Fix (press f): " if f.recommended else tried, style="bold")
            text.append(fix)
        else:
            text.append("No automatic fix.", style="dim")
        self.update(text)
