"""A real `prune run` subprocess interrupted mid-pass (SIGINT, SIGHUP, SIGKILL) resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_session, write_session

SLOW = {"data.num_samples": 48, "data.seq_len": 64, "data.batch_size": 1,
        "evaluation.before": False, "evaluation.after": False, "output.save_model": False}


def start(path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli", "run", str(path), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_batch(proc: subprocess.Popen[str], batch: int) -> list[dict]:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        seen.append(ev)
        if ev["kind"] == "batch_done" and ev["batch"] >= batch:
            return seen
    raise AssertionError(f"the pass ended before batch {batch}: {proc.stderr.read() if proc.stderr else ''}")


def finish(path: Path) -> tuple[int, list[dict], str]:
    proc = subprocess.run([sys.executable, "-m", "cli", "run", str(path), "--json"], capture_output=True, text=True)
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, events, proc.stderr


@pytest.fixture(scope="module")
def reference_mask(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("ref")
    path = write_session(tmp / "ref.toml", tiny_session(tmp, name="ref", **SLOW))
    code, events, err = finish(path)
    assert code == 0, err
    return events[-1]["mask_sha256"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_signal_checkpoints_exits_130_and_resumes(tmp_path: Path, reference_mask: str, sig: signal.Signals) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="sig", **SLOW))
    proc = start(path)
    wait_for_batch(proc, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume" in stderr and f"prune run {path}" in stderr
    assert (tmp_path / "runs" / "sig" / "state" / "checkpoints").is_dir()
    code, events, err = finish(path)
    assert code == 0, err
    batches = [e for e in events if e["kind"] == "batch_done"]
    assert batches and batches[0]["resumed_from"] >= 3
    assert events[-1]["mask_sha256"] == reference_mask


def test_sigkill_resumes_from_periodic_checkpoint(tmp_path: Path, reference_mask: str) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="kill", **SLOW))
    proc = start(path)
    wait_for_batch(proc, 5)
    proc.kill()
    proc.communicate(timeout=60)
    code, events, err = finish(path)
    assert code == 0, err
    batches = [e for e in events if e["kind"] == "batch_done"]
    assert batches[0]["resumed_from"] >= 4
    assert events[-1]["mask_sha256"] == reference_mask
