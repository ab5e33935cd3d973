"""Pilot tests of the workbench's fields and keyboard focus on the fake engine: the method picker starts on the
chosen method, every problem of the form shows at once, list fields say what they expect, and the what-if
panel opens without a text field ready to swallow the next single-key command."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, RadioSet

import sessions
from tests.test_tui_support import fake_pipeline, fixed_lists, settle, shown  # noqa: F401
from tui.app import PruneApp
from tui.engine import ModelInfo
from tui.screens.results import ResultsScreen
from tui.screens.setup import SetupScreen
from tui.widgets.fields import FieldRow, format_problem, parse_value

pytestmark = [pytest.mark.usefixtures("fixed_lists")]
SIZE = (80, 24)


def make_app(path: Path | None = None) -> PruneApp:
    return PruneApp(path, cpu_flops=50e9, pipeline=fake_pipeline())


def tiny_file(tmp_path: Path, **updates: object) -> Path:
    session = sessions.Session().with_updates({"model.id": "tiny-llama", "session.output_dir": str(tmp_path),
                                               **updates})
    return sessions.save(session, tmp_path / "s.toml")


async def goto(app: PruneApp, pilot, step: str) -> SetupScreen:  # type: ignore[no-untyped-def]
    screen = app.screen
    assert isinstance(screen, SetupScreen)
    screen.go(step)
    await pilot.pause()
    return screen


def error_of(screen: SetupScreen, key: str) -> str:
    row = screen.query_one(f"#row-{key.replace('.', '--')}", FieldRow)
    return shown(row.query_one(".field-error")) if row.has_class("-invalid") else ""


@pytest.mark.anyio
async def test_the_method_picker_starts_on_the_chosen_method(tmp_path: Path) -> None:
    """taylor_2nd is chosen (●): Down + Enter picks the method after it, not the one after the first."""
    app = make_app(tiny_file(tmp_path, **{"importance.method": "taylor_2nd"}))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await goto(app, pilot, "method")
        await pilot.pause()
        radio = app.focused
        assert isinstance(radio, RadioSet) and radio.pressed_button is not None
        assert radio.pressed_button.id == "method-taylor_2nd"
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.state.form_data["importance"]["method"] == "wanda"
        await pilot.press("up", "enter")
        await pilot.pause()
        assert app.state.form_data["importance"]["method"] == "taylor_2nd"


@pytest.mark.anyio
async def test_every_problem_of_the_form_shows_at_once(tmp_path: Path) -> None:
    """A protect_layers index the inspected model lacks stays flagged when another field turns invalid."""
    app = make_app(tiny_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.state.model_info = ModelInfo(spec="tiny-llama", layers=4)  # what inspecting the model tells
        screen = await goto(app, pilot, "pruning")
        screen.query_one("#f-pruning--protect_layers", Input).value = "0, 9"
        await pilot.pause()
        assert [p for p, _ in app.state.problems] == ["pruning.protect_layers"]
        screen = await goto(app, pilot, "length")
        screen.query_one("#f-data--num_samples", Input).value = "abc"
        await pilot.pause()
        assert sorted(p for p, _ in app.state.problems) == ["data.num_samples", "pruning.protect_layers"]
        assert "do not exist" in error_of(screen, "pruning.protect_layers")
        assert error_of(screen, "data.num_samples")
        assert "2 problems" in shown(screen.query_one("#nav-hint"))
        screen.query_one("#f-data--num_samples", Input).value = "16"
        await pilot.pause()
        assert [p for p, _ in app.state.problems] == ["pruning.protect_layers"]


def test_list_fields_read_commas_only() -> None:
    assert parse_value("ints", "0, 1, -1") == [0, 1, -1]
    assert parse_value("ints", "[0; 2]") == [0, 2]
    assert parse_value("ints", " ") == []
    for bad in ("0 1", "1.5", "0,,1", "0, 1,", "a"):
        assert parse_value("ints", bad) == bad, bad
        assert "separated by commas, e.g. 0, 1, -1" in (format_problem("ints", bad) or ""), bad
    assert parse_value("floats", "1, 99") == [1.0, 99.0]
    assert format_problem("floats", "1 99") is not None and format_problem("floats", "1, 99") is None


@pytest.mark.anyio
async def test_protect_layers_says_what_it_expects(tmp_path: Path) -> None:
    app = make_app(tiny_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await goto(app, pilot, "pruning")
        field = screen.query_one("#f-pruning--protect_layers", Input)
        for bad in ("0 1", "1.5", "0,,1"):
            field.value = bad
            await pilot.pause()
            problems = dict(app.state.problems)
            assert "separated by commas, e.g. 0, 1, -1" in problems.get("pruning.protect_layers", ""), bad
            assert "valid list" not in error_of(screen, "pruning.protect_layers")
            assert f"got '{bad}'" in error_of(screen, "pruning.protect_layers")
        field.value = "0, 1"
        await pilot.pause()
        assert not app.state.problems and app.state.session.pruning.protect_layers == [0, 1]


@pytest.mark.anyio
async def test_what_if_opens_without_a_field_that_swallows_the_next_key(tmp_path: Path) -> None:
    """w then a: the allocation tab, the ratio untouched; Tab enters the ratio field for keyboard-only use."""
    app = make_app(tiny_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ResultsScreen)
        ratio = app.state.session.pruning.ratio
        await pilot.press("w")
        await pilot.pause()
        assert screen.tab == "whatif" and not isinstance(app.focused, Input)
        await pilot.press("a")
        await settle(app, pilot)
        assert screen.tab == "allocation"
        assert screen.query_one("#f-pruning--ratio", Input).value == f"{ratio:g}"
        assert app.state.session.pruning.ratio == ratio
        await pilot.press("w", "tab")
        await pilot.pause()
        assert isinstance(app.focused, Input) and app.focused.id == "f-pruning--ratio"
        await pilot.press(*"0.3", "enter")
        await settle(app, pilot)
        assert app.state.session.pruning.ratio == 0.3
