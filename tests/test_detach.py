"""Detach and attach: `prune run --detach` survives on its own, holds the folder's lock (a second run
exits 3 naming its pid), `prune attach` follows its event log to `run_done`, `--stop` checkpoints it,
and every result equals an uninterrupted run's (`mask_sha256`).

The detached process is paused with SIGSTOP while the test checks the lock, so the checks do not
depend on how fast this machine runs the pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prune_core import lock
from tests.helpers import tiny_session, write_session

SLOW = {"data.num_samples": 96, "data.seq_len": 32, "data.batch_size": 1,
        "evaluation.before": False, "evaluation.after": False, "output.save_model": False}
ROOT = Path(__file__).resolve().parents[1]


def prune(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def ndjson(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def wait_until(predicate: object, what: str, cap_s: float = 180.0) -> None:
    deadline = time.monotonic() + cap_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def batches_logged(folder: Path) -> int:
    from prune_core.eventlog import read_events

    return max([e["batch"] for e in read_events(folder) if e.get("kind") == "batch_done"] or [0])


@pytest.fixture(scope="module")
def reference_mask(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("ref")
    path = write_session(tmp / "ref.toml", tiny_session(tmp, name="ref", **SLOW))
    proc = prune("run", str(path), "--json", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return ndjson(proc.stdout)[-1]["mask_sha256"]


def test_detach_lock_and_attach_to_run_done(tmp_path: Path, reference_mask: str) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="det", **SLOW))
    folder = (tmp_path / "runs" / "det").resolve()
    started = prune("run", "--detach", str(path), cwd=tmp_path, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    assert started.stdout.splitlines()[0] == str(folder)
    info = lock.read_info(folder)
    assert info is not None and lock.holder(folder) == info
    os.kill(info.pid, signal.SIGSTOP)  # hold the run still while the second one knocks
    try:
        second = prune("run", str(path), cwd=tmp_path, timeout=120)
        listed = prune("ps", "--json", cwd=tmp_path, timeout=60)
    finally:
        os.kill(info.pid, signal.SIGCONT)
    assert second.returncode == 3, second.stderr
    assert f"pid {info.pid}" in second.stderr and f"prune attach {folder}" in second.stderr
    rows = json.loads(listed.stdout)
    assert [(r["folder"], r["state"], r["pid"]) for r in rows] == [(str(folder), "running", info.pid)]

    attached = prune("attach", str(folder), "--json", cwd=tmp_path)
    assert attached.returncode == 0, attached.stderr
    events = ndjson(attached.stdout)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "stage_plan" and kinds[-1] == "run_done"
    assert [e["batch"] for e in events if e["kind"] == "batch_done"][-1] == 96
    assert events[-1]["metrics"]["mask_sha256"] == reference_mask
    assert json.loads((folder / "metrics.json").read_text())["mask_sha256"] == reference_mask
    wait_until(lambda: lock.holder(folder) is None, "the lock to be released", 60)
    assert not lock.lock_path(folder).exists()
    rows = json.loads(prune("ps", "--json", str(tmp_path / "runs"), cwd=tmp_path).stdout)
    assert rows[0]["state"] == "done" and rows[0]["pid"] is None


def test_detach_json_prints_one_json_object(tmp_path: Path) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="dj", **{"output.save_model": False}))
    folder = (tmp_path / "runs" / "dj").resolve()
    started = prune("run", "--detach", "--json", str(path), cwd=tmp_path, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    obj = json.loads(started.stdout)  # the whole of stdout: one JSON object
    assert obj["kind"] == "detached" and obj["results_dir"] == str(folder)
    assert obj["log"] == str(folder / "state" / "detached.log") and Path(obj["log"]).is_file()
    assert isinstance(obj["pid"], int) and f"pid {obj['pid']}" in started.stderr
    attached = prune("attach", str(folder), cwd=tmp_path)  # to the end, so nothing outlives the test
    assert attached.returncode == 0, attached.stderr


def test_attach_stop_checkpoints_and_the_run_resumes(tmp_path: Path, reference_mask: str) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="stop", **SLOW))
    folder = (tmp_path / "runs" / "stop").resolve()
    assert prune("run", "--detach", str(path), cwd=tmp_path, timeout=120).returncode == 0
    info = lock.read_info(folder)
    assert info is not None
    wait_until(lambda: batches_logged(folder) >= 3 or lock.holder(folder) is None, "batch 3")
    os.kill(info.pid, signal.SIGSTOP)
    assert batches_logged(folder) < 90, "the pass ran too fast to be stopped in the middle"
    try:
        stopper = subprocess.Popen([sys.executable, "-m", "cli", "attach", str(folder), "--stop", "--json"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_until(lambda: stopper.poll() is not None or _sigint_pending(info.pid), "the stop request", 60)
    finally:
        os.kill(info.pid, signal.SIGCONT)
    out, err = stopper.communicate(timeout=180)
    assert stopper.returncode == 130, err
    assert f"asked pid {info.pid}" in err and "stopped by the stop request" in err
    log = folder / "state" / "detached.log"
    wait_until(lambda: "interrupted:" in log.read_text(), "the run's own interrupted message", 60)
    said = " ".join(log.read_text().split())
    assert "(stopped by a stop request: prune attach --stop)" in said and "(SIGINT)" not in said
    assert "checkpointed" in [e["kind"] for e in ndjson(out)]
    assert (folder / "state" / "checkpoints").is_dir()
    resumed = prune("run", str(path), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    events = ndjson(resumed.stdout)
    assert next(e for e in events if e["kind"] == "batch_done")["resumed_from"] >= 3
    assert events[-1]["mask_sha256"] == reference_mask


def _sigint_pending(pid: int) -> bool:
    """Whether SIGINT is queued for a stopped process (Linux /proc; elsewhere assume it is)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    bit = 1 << (signal.SIGINT - 1)
    return any(line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & bit
               for line in status.splitlines())
