"""Pilot tests of the workbench's behaviour on a fake engine: validation, titles, save, cancel/resume,
quit confirmation, help, command palette, throttled charts. Waits are condition-based (no sleeps)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from textual.widgets import Input, TabbedContent

import sessions
from prune_core.events import BatchDone
from tests.test_tui_support import (  # noqa: F401
    FakePipeline,
    fake_pipeline,
    fixed_lists,
    run_from_palette,
    settle,
    wait_for,
)
from tui import keys
from tui.app import PruneApp
from tui.messages import EngineEvent
from tui.screens.dialogs import ConfirmScreen, HelpScreen
from tui.screens.setup import SetupScreen
from tui.widgets.charts import LayerStatsChart
from tui.widgets.fields import FieldRow

pytestmark = [pytest.mark.usefixtures("fixed_lists")]
SIZE = (80, 24)


def tiny_session_file(tmp_path: Path) -> Path:
    """A session file on tiny-llama whose results go under tmp_path."""
    path = tmp_path / "s.toml"
    sessions.save(sessions.Session().with_updates({"model.id": "tiny-llama", "session.output_dir": str(tmp_path)}),
                  path)
    return path


def make_app(path: Path | None = None, **fake: object) -> PruneApp:
    return PruneApp(path, cpu_flops=50e9, pipeline=fake_pipeline(**fake))


async def exited(app: PruneApp, cap_s: float = 60.0) -> None:
    """Wait for the app to exit on its own (no pilot.pause: the app may be gone already)."""
    import asyncio
    import time

    deadline = time.monotonic() + cap_s
    while app.return_code is None:
        assert time.monotonic() < deadline, "the app did not exit"
        await asyncio.sleep(0.05)


async def goto_step(app: PruneApp, pilot, key: str) -> SetupScreen:  # type: ignore[no-untyped-def]
    screen = app.screen
    assert isinstance(screen, SetupScreen)
    screen.go(key)
    await pilot.pause()
    return screen


@pytest.mark.anyio
async def test_title_shows_unsaved_changes_and_ctrl_s_saves(tmp_path: Path) -> None:
    path = tmp_path / "mysession.toml"
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.title == "prune — mysession"
        await goto_step(app, pilot, "pruning")
        assert isinstance(app.focused, Input) and app.focused.id == "f-pruning--ratio"
        await pilot.press(*"0.35")
        assert app.state.session.pruning.ratio == 0.35
        assert app.title == "prune — mysession *"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.title == "prune — mysession"
        assert sessions.load(path).pruning.ratio == 0.35
        assert sessions.load(path).session.name == "mysession"


@pytest.mark.anyio
async def test_validation_errors_show_at_the_field_and_block_saving(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await goto_step(app, pilot, "length")
        await pilot.press("tab")  # num_samples
        await pilot.press(*"2")
        row = screen.query_one("#row-data--batch_size", FieldRow)
        assert row.has_class("-invalid")
        assert "must not exceed num_samples" in str(row.query_one(".field-error").render())
        tabs = screen.query_one("#steps", TabbedContent)
        assert str(tabs.get_tab("step-length").label).endswith("!")
        assert app.title.endswith("*")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not path.exists()
        assert screen.step == "review"  # sent to the review step, which lists the problem
        problems = str(screen.query_one("#review-problems").render())
        assert "data.batch_size" in problems and "step 4 Length" in problems
        await pilot.press("pageup", "pageup")
        assert screen.step == "length"


@pytest.mark.anyio
async def test_invalid_session_file_opens_with_problems_inline(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[pruning]\nratio = 2.0\ntypo = 1\n[data]\nseq_len = 64\n", encoding="utf-8")
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, SetupScreen) and screen.step == "review"
        paths = [p for p, _ in app.state.problems]
        assert "pruning.ratio" in paths and "pruning.typo" in paths
        assert screen.query_one("#row-pruning--ratio", FieldRow).has_class("-invalid")
        assert screen.query_one("#f-data--seq_len", Input).value == "64"
        await pilot.press("ctrl+r")  # refused while invalid
        await pilot.pause()
        assert app.state.busy is None and app.state.run_state.status == "idle"


@pytest.mark.anyio
async def test_cancel_asks_first_then_stops_and_resume_continues(tmp_path: Path) -> None:
    gate = threading.Semaphore(0)
    app = make_app(tmp_path / "c.toml", gate=gate)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.screen.id == "run", what="run screen")
        gate.release()
        await wait_for(pilot, lambda: app.state.run_state.batch is not None, what="first batch")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("n")  # keep running
        await pilot.pause()
        assert not app._stop.is_set()
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("y")
        await pilot.pause()
        assert app._stop.is_set()
        gate.release()  # the engine finishes the batch, sees the flag and raises Interrupted
        await settle(app, pilot)
        assert app.state.run_state.status == "interrupted"
        assert app.pipeline.done_batches == 2 and app.pipeline.has_checkpoint(app.state.session)
        for _ in range(4):
            gate.release()
        await pilot.press("r")
        await settle(app, pilot)
        assert app.state.run_state.status == "done"
        assert app.state.run_state.batch is not None and app.state.run_state.batch.resumed_from == 2
        assert app.screen.id == "results"


@pytest.mark.anyio
async def test_quit_asks_when_there_are_unsaved_changes(tmp_path: Path) -> None:
    app = make_app(tmp_path / "q.toml")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await goto_step(app, pilot, "pruning")
        await pilot.press(*"0.4")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("n")
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, SetupScreen)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("y")
        await pilot.pause()
    assert app.return_code == 0


@pytest.mark.anyio
async def test_opening_an_interrupted_session_offers_to_resume(tmp_path: Path) -> None:
    path = tmp_path / "resume.toml"
    sessions.save(sessions.Session().with_updates({"session.name": "resume"}), path)
    app = make_app(path, checkpoint=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="resume question")
        assert "interrupted" in str(app.screen.query_one(".dialog-message").render())
        await pilot.press("y")
        await settle(app, pilot)
        assert app.state.run_state.status == "done"
        assert app.pipeline.calls == [("run", None)]


@pytest.mark.anyio
async def test_help_screen_and_command_palette(tmp_path: Path) -> None:
    app = make_app(tmp_path / "h.toml")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        assert "PgDn" in app.screen.markdown and "Apply fix" in app.screen.markdown
        await pilot.press("escape")
        assert isinstance(app.screen, SetupScreen)
        await run_from_palette(app, pilot, "review", "Review")
        await wait_for(pilot, lambda: isinstance(app.screen, SetupScreen) and app.screen.step == "review",
                       what="palette jumped to the review step")


def test_every_binding_has_an_id_and_a_tooltip() -> None:
    for _title, rows in keys.sections():
        for key, description, tooltip in rows:
            assert description and tooltip, key
    from tui.app import PruneApp as A
    from tui.screens.results import ResultsScreen
    from tui.screens.run import RunScreen

    for cls in (A, SetupScreen, RunScreen, ResultsScreen, ConfirmScreen, HelpScreen):
        for b in cls.BINDINGS:
            assert getattr(b, "id", None), (cls.__name__, b)
            assert getattr(b, "tooltip", ""), (cls.__name__, b)
    bound = {k for b in A.BINDINGS for k in b.key.split(",")}  # type: ignore[union-attr]
    assert "ctrl+b" not in bound  # tmux's prefix


def test_keys_doc_is_current() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "tui_keys.md"
    assert doc.read_text(encoding="utf-8") == keys.markdown(), "regenerate: python -m tui.keys > docs/tui_keys.md"


@pytest.mark.anyio
async def test_chart_redraws_are_throttled() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        chart = LayerStatsChart()
        await app.screen.mount(chart)
        await pilot.pause()
        before = chart.redraws
        stats = {"attention": {"norm": [1.0, 0.1]}, "mlp": {"norm": [2.0, 0.2]}}
        for _ in range(200):
            chart.update_stats(stats)
        assert chart.received == 200 and chart.redraws == before  # nothing drawn yet: coalesced
        chart._tick()
        assert chart.redraws == before + 1
        chart._tick()
        assert chart.redraws == before + 1  # nothing new, no redraw


def test_batch_messages_coalesce_in_the_queue() -> None:
    def batch(i: int) -> EngineEvent:
        return EngineEvent(BatchDone(stage="importance", batch=i, total=9, loss=1.0, mean_loss=1.0,
                                     tokens_per_s=1.0, eta_s=1.0, layer_stats={}))
    assert batch(1).can_replace(batch(2))
    from prune_core.events import StageDone

    assert not batch(1).can_replace(EngineEvent(StageDone(stage="x", seconds=1.0)))
    assert not EngineEvent(StageDone(stage="x", seconds=1.0)).can_replace(batch(1))


@pytest.mark.anyio
async def test_no_color_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.no_color


@pytest.mark.anyio
async def test_quit_while_running_asks_and_stops_the_engine(tmp_path: Path) -> None:
    gate = threading.Semaphore(0)
    app = make_app(tmp_path / "r.toml", gate=gate)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.busy == "run" and app.screen.id == "run", what="running")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        assert "still running" in str(app.screen.query_one(".dialog-message").render())
        await pilot.press("y")
        assert app._stop.is_set()
        await pilot.pause()
        stopping = app.is_running and app.state.run_state.stopping  # it says so, and waits for the checkpoint
        for _ in range(FakePipeline.batches):
            gate.release()  # let the engine reach its next should_stop check
        await exited(app)
    assert stopping
    assert app.return_code == 130  # interrupted and checkpointed, like Ctrl-C in `prune run`
    assert app.pipeline.done_batches == 1  # stopped after the batch it was in
    # the line printed once the terminal is back: r.toml was never written, so no command resumes it
    assert app.exit_note.startswith("interrupted: stopped after batch 1") and "not saved" in app.exit_note


@pytest.mark.anyio
async def test_ctrl_c_stops_the_run_like_sigint_and_says_how_to_resume(tmp_path: Path) -> None:
    """Inside the app Ctrl+C is a key, not SIGINT: it still checkpoints the pass and exits 130 (as the
    README says), and the line left on the terminal names the command that resumes the run."""
    gate = threading.Semaphore(0)
    path = tiny_session_file(tmp_path)
    app = make_app(path, gate=gate)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.busy == "run" and app.screen.id == "run", what="running")
        gate.release()
        await wait_for(pilot, lambda: app.state.run_state.batch is not None, what="first batch")
        try:
            await pilot.press("ctrl+c")
            await pilot.pause()
            assert app._stop.is_set() and app.is_running and app.state.run_state.stopping
        finally:
            for _ in range(FakePipeline.batches):
                gate.release()
        await exited(app)
    assert app.return_code == 130
    assert app.pipeline.done_batches == 2 and app.pipeline.has_checkpoint(app.state.session)
    assert app.exit_note.startswith("interrupted: stopped after batch 2")
    assert f"resume with: prune run {path}" in app.exit_note


@pytest.mark.anyio
async def test_ctrl_c_when_idle_asks_about_unsaved_changes_then_exits_130(tmp_path: Path) -> None:
    app = make_app(tiny_session_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await goto_step(app, pilot, "pruning")
        await pilot.press(*"0.4")
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the unsaved-changes question")
        assert "unsaved changes" in str(app.screen.query_one(".dialog-message").render())
        await pilot.press("n")
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, SetupScreen)
        await pilot.press("ctrl+s", "ctrl+c")  # saved: nothing to ask
        await exited(app)
    assert app.return_code == 130


def test_run_tui_prints_the_exit_note_once_the_terminal_is_back(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tui
    import tui.app

    class Stopped:
        return_code, stop_at_once = 130, False
        exit_note = "interrupted: stopped after batch 2/4; resume with: prune run s.toml (or prune tui s.toml, then r)"

        def __init__(self, path: Path | None) -> None:
            pass

        def run(self) -> None:
            return None

    monkeypatch.setattr(tui.app, "PruneApp", Stopped)
    assert tui.run_tui(None) == 130
    assert capsys.readouterr().err == Stopped.exit_note + "\n"


@pytest.mark.anyio
async def test_the_saved_model_line_names_the_allocation_it_belongs_to(tmp_path: Path) -> None:
    """After a what-if the Actions tab does not pass the earlier allocation's model off as this one's."""
    from tests.test_tui_support import shown

    app = make_app(tiny_session_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        await pilot.press("m")
        await settle(app, pilot)
        model = tmp_path / "session" / "model"
        status = app.screen.query_one("#action-status")
        assert f"Pruned model saved to {model}" in shown(status)
        original = app.state.session
        app.job_allocate(original.with_updates({"pruning.ratio": 0.3}), "what-if")
        await settle(app, pilot)
        text = shown(status)
        assert "Pruned model saved to" not in text
        assert f"{model} holds the model of the earlier allocation" in " ".join(text.split())
        app.job_allocate(original, "what-if")  # back where the saved model belongs
        await settle(app, pilot)
        assert f"Pruned model saved to {model}" in shown(status)


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "code"), [("SIGHUP", 129), ("SIGTERM", 143), ("SIGINT", 130)])
async def test_signals_checkpoint_the_run_then_exit_128_plus_signal(tmp_path: Path, name: str, code: int) -> None:
    gate = threading.Semaphore(0)
    app = make_app(tmp_path / "sig.toml", gate=gate)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.busy == "run" and app.screen.id == "run", what="running")
        gate.release()
        await wait_for(pilot, lambda: app.state.run_state.batch is not None, what="first batch")
        try:
            app.on_signal(name)
            await pilot.pause()
            app.screen.sync()
            assert app._stop.is_set() and app.is_running
            assert "stopping after batch 2/" in str(app.screen.query_one("#run-stats").render())
            if name == "SIGINT":  # a second Ctrl-C says what stopping at once would lose, and waits
                app.on_signal("SIGINT")
                await pilot.pause()
                assert app.is_running and not app.stop_at_once
        finally:
            for _ in range(FakePipeline.batches):
                gate.release()
        await exited(app)
    assert app.return_code == code
    assert app.pipeline.done_batches == 2 and app.pipeline.has_checkpoint(app.state.session)


@pytest.mark.anyio
async def test_open_dialog_loads_another_session(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    sessions.save(sessions.Session().with_updates({"session.name": "other", "pruning.ratio": 0.45}), other)
    app = make_app(tmp_path / "first.toml")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press("ctrl+u", *str(other), "enter")
        await settle(app, pilot)
        assert app.state.session_path == other and app.title == "prune — other"
        assert isinstance(app.screen, SetupScreen) and app.screen.step == "review"
        assert app.screen.query_one("#f-pruning--ratio", Input).value == "0.45"


@pytest.mark.anyio
async def test_tui_on_a_running_folder_follows_its_event_log(tmp_path: Path) -> None:
    from prune_core import eventlog, lock
    from prune_core.events import StageStarted

    folder = tmp_path / "runs" / "live"
    with lock.hold(folder, command="prune run live.toml"):  # "another process" writing the folder
        log = eventlog.EventLog(folder)
        log(StageStarted("importance", "importance pass", total=8))
        log(BatchDone("importance", 3, 8, 4.0, 4.1, 100.0, 24.0, {"attention": {"norm": [1.0, 2.0]}}))
        app = make_app(folder)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.screen.id == "run" and app.state.run_state.batch is not None,
                           what="the followed run on the run screen")
            assert app.state.busy == "follow"
            app.screen.sync()
            assert "batch 3/8" in str(app.screen.query_one("#run-stats").render())
            log.end("run_interrupted", "stopped after batch 3 (SIGINT); state was checkpointed")
            log.close()
            await wait_for(pilot, lambda: app.state.busy is None, what="the end of the followed run")
            assert app.state.run_state.status == "interrupted"


@pytest.mark.anyio
async def test_a_window_length_below_two_shows_a_hint_not_a_crash(tmp_path: Path) -> None:
    """The estimate of the Length step takes the session's own ranges: seq_len 1 (a file or a keystroke on
    the way to 128) leaves the app running with a hint, and a valid length brings the estimate back."""
    from rich.console import Console

    def shown() -> str:
        console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(screen.query_one("#pane-length").render_estimate())
        return console.export_text()

    path = tmp_path / "short.toml"
    path.write_text('[model]\nid = "tiny-llama"\ndevice = "cpu"\n[data]\nseq_len = 1\n', encoding="utf-8")
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await goto_step(app, pilot, "length")
        assert "the session accepts" in shown()
        assert isinstance(app.focused, Input) and app.focused.id == "f-data--seq_len"
        await pilot.press("backspace", *"64")
        await pilot.pause()
        assert app.is_running and "◀ chosen" in shown()
        await pilot.press("backspace", "backspace", "0")
        await pilot.pause()
        assert app.is_running and "the session accepts" in shown()


@pytest.mark.anyio
async def test_resume_with_nothing_interrupted_says_so_and_runs_nothing(tmp_path: Path) -> None:
    from tests.test_tui_support import run_from_palette

    app = make_app(tiny_session_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        pipeline = app.pipeline
        await run_from_palette(app, pilot, "resume interrupted", "Resume interrupted run")
        await pilot.pause()
        assert ("run", None) not in pipeline.calls and app.state.busy is None
        assert any("Nothing to resume" in str(n.message) for n in app._notifications)


@pytest.mark.anyio
async def test_a_dataset_path_that_does_not_exist_is_a_problem_of_the_form(tmp_path: Path) -> None:
    """As `prune validate` says: the Dataset step is not valid while its file does not exist."""
    path = tmp_path / "s.toml"
    missing = tmp_path / "nowhere" / "file.txt"
    path.write_text(f'[model]\nid = "tiny-llama"\n[data]\ndataset = "{missing}"\n', encoding="utf-8")
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert [k for k, _ in app.state.problems] == ["data.dataset"]
        assert "no such file or folder" in app.state.problems[0][1]
        screen = await goto_step(app, pilot, "dataset")
        assert "1 problem" in str(screen.query_one("#nav-hint").render())
        missing.parent.mkdir()
        missing.write_text("To be, or not to be, that is the question. " * 400, encoding="utf-8")
        screen.query_one("#f-data--dataset", Input).value = str(missing) + " "
        screen.query_one("#f-data--dataset", Input).value = str(missing)
        await pilot.pause()
        assert app.state.problems == []


@pytest.mark.anyio
async def test_a_what_if_keeps_the_dense_perplexity_and_evaluate_gives_both(tmp_path: Path) -> None:
    app = make_app(tiny_session_file(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert app.state.results.metrics["perplexity"] == {"before": {"ppl": 1000.5}, "after": {"ppl": 1200.25}}
        app.job_allocate(app.state.session.with_updates({"pruning.ratio": 0.3}), "what-if")
        await settle(app, pilot)
        # the pruned model's perplexity belongs to the old allocation; the dense model's still holds
        assert app.state.results.metrics["perplexity"] == {"before": {"ppl": 1000.5}}
        app.action_evaluate()
        await settle(app, pilot)
        assert app.state.results.metrics["perplexity"] == {"before": {"ppl": 1000.5}, "after": {"ppl": 1200.25}}
        assert app.pipeline.calls[-1] == ("run", None)  # every stage, so eval_before comes too
