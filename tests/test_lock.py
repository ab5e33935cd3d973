"""One run per results folder: the lock names its holder, refuses a second run at once, is released
at the end (also on failure), and a stale lock (dead pid) is taken over with a notice. The event log
round-trips to typed events and ends with a closing record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prune_core import eventlog, lock
from prune_core.errors import Interrupted
from prune_core.events import BatchDone, Checkpointed, Notice, StagePlan, StageStarted


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with lock.hold(tmp_path, command="prune run a.toml") as held:
        assert lock.holder(tmp_path) == held.info
        with pytest.raises(lock.FolderLocked) as exc:
            lock.acquire(tmp_path, command="prune run b.toml")
        text = str(exc.value)
        assert f"pid {os.getpid()}" in text and "prune run a.toml" in text and f"prune attach {tmp_path}" in text
    assert lock.holder(tmp_path) is None and not lock.lock_path(tmp_path).exists()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path: Path) -> None:
    import socket

    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
             "command": "prune run old.toml"}
    lock.lock_path(tmp_path).write_text(json.dumps(stale), encoding="utf-8")
    assert lock.holder(tmp_path) is None
    seen: list[object] = []
    with lock.hold(tmp_path, on_event=seen.append) as held:
        assert held.info.pid == os.getpid()
    assert any(isinstance(e, Notice) and "stale lock" in e.message and str(stale["pid"]) in e.message for e in seen)


def test_the_event_log_round_trips_and_records_how_a_run_ended(tmp_path: Path) -> None:
    got: list[object] = []
    with pytest.raises(Interrupted), eventlog.tee(tmp_path, got.append) as sink:
        sink(StagePlan(recompute=("importance",), estimates={"importance": 3.0}))
        sink(BatchDone("importance", 1, 4, float("nan"), 2.0, 10.0, 3.0, {"attention": {"norm": [1.0]}}))
        raise Interrupted("stopped", "run again")
    objs = eventlog.read_events(tmp_path)
    assert [o["kind"] for o in objs] == ["stage_plan", "batch_done", "run_interrupted"]
    events = [eventlog.from_dict(o) for o in objs]
    assert events[0] == got[0]
    assert isinstance(events[1], BatchDone) and events[1].layer_stats == {"attention": {"norm": [1.0]}}
    assert events[2] is None and len(got) == 2


def test_a_writing_run_on_a_locked_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from prune_core import pipeline
    from tests.helpers import tiny_session

    session = tiny_session(tmp_path, name="locked")
    folder = pipeline.results_dir_for(session)
    with lock.hold(folder, command="prune tui locked.toml"), pytest.raises(lock.FolderLocked, match="prune tui"):
        pipeline.run(session)
    assert sorted(p.name for p in folder.iterdir()) == []


def test_prune_fix_into_a_folder_in_use_exits_3_before_writing_its_session(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from prune_core import pipeline
    from prune_core.report import RunReport
    from tests.helpers import tiny_session

    session = tiny_session(tmp_path, name="r", **{"evaluation.before": False, "evaluation.after": False})
    results = tmp_path / "runs" / "r"
    pipeline.run(session, out_dir=results)
    findings = RunReport.read(results).findings
    n = next(i for i, f in enumerate(findings, 1) if f.get("fix") and f.get("recommended"))
    fix_dir = tmp_path / "runs" / f"r-fix{n}"
    with lock.hold(fix_dir, command="prune run r-fix.toml"):
        result = CliRunner().invoke(app, ["fix", str(results), "--apply", str(n)])
    assert result.exit_code == 3, result.output
    assert "in use by another run" in result.output and "prune run r-fix.toml" in result.output
    assert not (tmp_path / "runs" / f"r-fix{n}.toml").exists(), "the other run's session file is left alone"
    assert sorted(p.name for p in fix_dir.iterdir()) == [], "nothing copied into the folder in use"


def test_the_lock_records_the_session_file_it_runs(tmp_path: Path) -> None:
    """A follower (prune attach, the workbench) reads which session file writes a folder from its lock."""
    with lock.hold(tmp_path / "runs", session_file=Path("rel/s.toml")) as held:
        info = lock.read_info(tmp_path / "runs")
        assert info == held.info and info.session_file == str(Path("rel/s.toml").absolute())
    with lock.hold(tmp_path / "other"):
        assert lock.read_info(tmp_path / "other").session_file == ""


def test_a_logs_summary_says_where_the_run_stands(tmp_path: Path) -> None:
    """The reading `prune ps` and the workbench share: the latest stage and batch, the batch a resume
    starts from, and how the run ended."""
    log = eventlog.EventLog(tmp_path)
    log(StageStarted("importance", "importance pass", total=4))
    for b in (1, 2):
        log(BatchDone("importance", b, 4, 4.0, 4.0, 100.0, 3.0, {}))
    log(Checkpointed("importance", 2, str(tmp_path / "ckpt")))
    log(Checkpointed("distill", 7, str(tmp_path / "d"), unit="step"))  # not a batch checkpoint
    running = eventlog.summarize(eventlog.read_events(tmp_path))
    assert (running.stage, running.batch, running.total, running.checkpoint, running.end) == (
        "importance", 2, 4, 2, "")
    log.end("run_interrupted", "stopped after batch 2/4")
    log.close()
    done = eventlog.summarize(eventlog.read_events(tmp_path))
    assert done.end == "run_interrupted" and done.end_message == "stopped after batch 2/4" and done.lines == 6
    assert eventlog.summarize([]) == eventlog.LogSummary()
