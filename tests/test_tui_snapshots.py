"""Snapshot tests (pytest-textual-snapshot) of every main screen at 80×24 and 120×40.

The engine is the deterministic fake from test_tui_support (fixed timings, throughput and numbers), and
the model/dataset lists are fixed, so the SVGs do not depend on the machine or its caches. Update with
`pytest tests/test_tui_snapshots.py --snapshot-update` and look at the SVGs before committing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from tests.test_tui_support import fake_pipeline, fixed_lists, settle, wait_for  # noqa: F401
from tui.app import PruneApp
from tui.screens.setup import STEP_KEYS, SetupScreen
from tui.widgets.charts import LayerStatsChart

pytestmark = [pytest.mark.usefixtures("fixed_lists")]
SIZES = {"80x24": (80, 24), "120x40": (120, 40)}


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PruneApp:
    monkeypatch.chdir(tmp_path)  # relative paths in the title and the review step
    return PruneApp(Path("snap.toml"), cpu_flops=50e9, pipeline=fake_pipeline())


async def steady(app: PruneApp, pilot: Any) -> None:
    """Settle workers, stop cursor blinking, flush charts and toasts: a reproducible frame."""
    await settle(app, pilot)
    for chart in app.screen.query(LayerStatsChart):
        chart._tick()
    for widget in app.screen.query(Input):
        widget.cursor_blink = False
    app.clear_notifications()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", STEP_KEYS)
def test_setup_step(snap_compare: Any, app: PruneApp, step: str, size: str) -> None:
    async def run_before(pilot: Any) -> None:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, SetupScreen)
        screen.go(step)
        await steady(app, pilot)

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_run_screen_after_completion(snap_compare: Any, app: PruneApp, size: str) -> None:
    async def run_before(pilot: Any) -> None:
        await settle(app, pilot)
        app.action_run()
        await settle(app, pilot)
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.id == "run", what="run screen")
        await steady(app, pilot)
        assert app.screen.query_one(LayerStatsChart).received >= 1

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tab", ["allocation", "diagnosis", "whatif", "importance", "actions"])
def test_results_screen(snap_compare: Any, app: PruneApp, tab: str, size: str) -> None:
    async def run_before(pilot: Any) -> None:
        await settle(app, pilot)
        app.action_run()
        await settle(app, pilot)
        assert app.screen.id == "results"
        app.screen.action_tab(tab)  # type: ignore[attr-defined]
        await pilot.pause()
        if tab == "whatif":
            await pilot.press("tab", *"0.3", "enter")  # Tab enters the ratio field; shows new beside previous
            await settle(app, pilot)
            assert app.state.results is not None and app.state.results.previous is not None
        if tab == "actions":
            await pilot.press("e")
            await settle(app, pilot)
            await pilot.press("g")
            await settle(app, pilot)
        await steady(app, pilot)

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)


def test_help_screen(snap_compare: Any, app: PruneApp) -> None:
    async def run_before(pilot: Any) -> None:
        await settle(app, pilot)
        await pilot.press("f1")
        await steady(app, pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
