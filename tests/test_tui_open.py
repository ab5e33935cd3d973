"""Pilot tests of opening things in the workbench (ctrl+o and `prune tui PATH`) on the fake engine: unsaved
changes are never dropped silently, a folder another process is running is followed with its session, and a
run folder that stopped before it finished says how to resume it (and offers to, when its session is here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import sessions
from prune_core import eventlog, lock
from prune_core.events import BatchDone, Checkpointed, StageStarted
from tests.test_tui_support import fake_pipeline, fixed_lists, settle, wait_for  # noqa: F401
from tui.app import PruneApp
from tui.screens.dialogs import ConfirmScreen, PathScreen
from tui.screens.setup import SetupScreen

pytestmark = [pytest.mark.usefixtures("fixed_lists"), pytest.mark.anyio]
SIZE = (80, 24)


def make_app(path: Path | None = None, **fake: object) -> PruneApp:
    return PruneApp(path, cpu_flops=50e9, pipeline=fake_pipeline(**fake))


def session_file(tmp_path: Path, name: str, **updates: object) -> Path:
    """A session file whose results folder is tmp_path/runs/<name>."""
    session = sessions.Session().with_updates({"session.name": name, "session.output_dir": str(tmp_path / "runs"),
                                               **updates})
    return sessions.save(session, tmp_path / f"{name}.toml")


def notices(app: PruneApp) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


async def open_from_dialog(app: PruneApp, pilot, path: Path) -> None:  # type: ignore[no-untyped-def]
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(app.screen, PathScreen), what="the open dialog")
    await pilot.press("ctrl+u", *str(path), "enter")
    await pilot.pause()


def write_run_log(folder: Path, *, end: str | None = None, checkpoint: bool = False) -> eventlog.EventLog:
    """What a run leaves in its folder: the event log after one batch, and its checkpoint."""
    log = eventlog.EventLog(folder)
    log(StageStarted("importance", "importance pass", total=4))
    log(BatchDone("importance", 1, 4, 4.0, 4.1, 100.0, 3.0, {"attention": {"norm": [1.0, 2.0]}}))
    if checkpoint:
        ckpt = folder / "state" / "checkpoints" / "importance-0123"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text("{}", encoding="utf-8")
        log(Checkpointed("importance", 1, str(ckpt)))
    if end:
        log.end(end, "importance pass stopped after batch 1/4; progress is checkpointed")
    return log


async def test_open_asks_before_discarding_unsaved_changes(tmp_path: Path) -> None:
    other = session_file(tmp_path, "other", **{"pruning.ratio": 0.45})
    first = session_file(tmp_path, "first")
    app = make_app(first)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.get_screen("setup").go("pruning")  # type: ignore[attr-defined]
        await pilot.pause()
        await pilot.press(*"0.4")
        assert app.title == "prune — first *"
        await open_from_dialog(app, pilot, other)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the unsaved-changes question")
        assert "unsaved changes" in str(app.screen.query_one(".dialog-message").render())
        await pilot.press("n")  # stay: nothing is replaced
        await settle(app, pilot)
        assert app.state.session_path == first and app.title == "prune — first *"
        assert app.state.session.pruning.ratio == 0.4
        await open_from_dialog(app, pilot, other)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the unsaved-changes question")
        await pilot.press("y")
        await settle(app, pilot)
        assert app.state.session_path == other and app.title == "prune — other"
        assert app.state.session.pruning.ratio == 0.45


async def test_open_a_folder_another_process_runs_follows_it_with_its_session(tmp_path: Path) -> None:
    """ctrl+o on a detached run's folder takes the start-up path: follow the run, and show its session
    (the session file its lock records) rather than a blank one that ctrl+s could save by mistake."""
    det = session_file(tmp_path, "det")
    first = session_file(tmp_path, "first")
    folder = tmp_path / "runs" / "det"
    app = make_app(first)
    with lock.hold(folder, command="prune run det.toml --out somewhere", session_file=det):
        log = write_run_log(folder)
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await open_from_dialog(app, pilot, folder)
            await wait_for(pilot, lambda: app.screen.id == "run" and app.state.run_state.batch is not None,
                           what="the followed run on the run screen")
            assert app.state.busy == "follow"
            assert "not a session file" not in notices(app)
            assert app.state.session_path == det and app.title == "prune — det"
            # ctrl+o again while following: the following stops (that run goes on), the file opens
            await open_from_dialog(app, pilot, first)
            await wait_for(pilot, lambda: app.state.busy is None and app.state.session_path == first,
                           what="the session opened after leaving the followed run")
            assert app.title == "prune — first" and lock.holder(folder) is not None
            log.close()


async def test_tui_on_a_live_run_folder_shows_the_runs_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    session_file(tmp_path, "live")  # found in the working folder: its results folder is the one followed
    folder = tmp_path / "runs" / "live"
    with lock.hold(folder, command="prune run elsewhere/live.toml"):  # a relative path from another folder
        log = write_run_log(folder)
        app = make_app(folder)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.state.busy == "follow", what="following")
            assert app.title == "prune — live" and app.state.session_path == tmp_path / "live.toml"
            assert app.sub_title.endswith("live.toml")
            log.end("run_done", "done")
            log.close()
            await settle(app, pilot)


async def test_a_killed_run_folder_loads_the_session_its_lock_records(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed outright leaves its lock file: the session file recorded there is loaded even when it is
    not in the working folder and the folder is an --out of its own."""
    elsewhere = tmp_path / "sessions"
    elsewhere.mkdir()
    det = session_file(elsewhere, "det")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out" / "det-run"
    held = lock.acquire(folder, session_file=det)
    write_run_log(folder, end=None, checkpoint=True).close()
    import os

    os.close(held.fd)  # the process died: its flock is gone, its lock file stays
    assert lock.holder(folder) is None and lock.read_info(folder).session_file == str(det)
    app = make_app(folder, checkpoint=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.state.session_path == det and app.title == "prune — det"


async def test_tui_on_a_stopped_run_folder_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted detached run: its folder holds the log and the checkpoint, not its session. Without
    the session file at hand the app names the command that resumes it; it is no 'not a results folder'."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "det"
    write_run_log(folder, end="run_interrupted", checkpoint=True).close()
    app = make_app(folder)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        text = notices(app)
        assert "not a results folder" not in text
        assert "interrupted" in text and "checkpointed after batch 1/4" in text
        assert f"--out {folder}" in text and "prune run" in text


async def test_tui_on_a_stopped_run_folder_loads_its_session_and_offers_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    det = session_file(tmp_path, "det")
    folder = tmp_path / "runs" / "det"
    write_run_log(folder, end="run_interrupted", checkpoint=True).close()
    app = make_app(folder, checkpoint=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the resume question")
        assert app.state.session_path == det and app.title == "prune — det"
        assert "r resumes it" in notices(app)
        await pilot.press("y")
        await settle(app, pilot)
        assert app.state.run_state.status == "done"
        assert app.pipeline.calls == [("run", None)]
        assert app.pipeline.results_dir_for(app.state.session) == folder


async def test_ctrl_o_on_a_folder_without_a_run_says_so_and_keeps_the_session(tmp_path: Path) -> None:
    first = session_file(tmp_path, "first")
    empty = tmp_path / "empty"
    empty.mkdir()
    app = make_app(first)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await open_from_dialog(app, pilot, empty)
        await settle(app, pilot)
        assert "not a results folder" in notices(app) and "holds no run" in notices(app)
        assert app.state.session_path == first and isinstance(app.screen, SetupScreen)
