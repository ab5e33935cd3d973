"""A real-terminal check in tmux: start `prune tui SESSION.toml` on a tiny-model session, run it to the
results screen with keystrokes (send-keys), read the screen (capture-pane), quit, and check that the
terminal is left clean (no alternate screen, cursor shown, mouse reporting off, cooked mode, no stray
escape sequences). Also checks 256-colour output and NO_COLOR. Skipped when tmux is not installed.

Set PRUNE_TUI_WRITE_DOCS=1 to refresh docs/tui_run_screen.txt from the captured run screen.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import sessions
from sessions import Session

TMUX = shutil.which("tmux")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
GRAYS_256 = {0, 7, 8, 15, 16, 59, 102, 145, 188, 231, *range(232, 256)}


class Pane:
    """One detached tmux session on a private socket, 80×24 with no status line."""

    def __init__(self, tmp: Path, env: dict[str, str], size: tuple[int, int] = (80, 24)) -> None:
        self.socket = str(tmp / "tmux.sock")
        conf = tmp / "tmux.conf"
        conf.write_text('set -g default-terminal "xterm-256color"\nset -g status off\nset -sg escape-time 10\n'
                        "set -g history-limit 2000\n", encoding="utf-8")
        self.env = env
        w, h = size
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "prune", "-x", str(w), "-y", str(h),
                   "bash --norc --noprofile")
        self.send_line("export PS1='$ '; stty sane; clear")

    def _tmux(self, *args: str) -> str:
        proc = subprocess.run([TMUX, "-S", self.socket, *args], env=self.env, capture_output=True, text=True,
                              timeout=30, check=True)
        return proc.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "prune", *keys)

    def send_line(self, text: str) -> None:
        self._tmux("send-keys", "-t", "prune", "-l", text)
        self._tmux("send-keys", "-t", "prune", "Enter")

    def capture(self, escapes: bool = False) -> str:
        return self._tmux("capture-pane", "-p", "-t", "prune", *(["-e"] if escapes else []))

    def flag(self, name: str) -> str:
        return self._tmux("display-message", "-p", "-t", "prune", f"#{{{name}}}").strip()

    def wait(self, predicate: Callable[[str], bool], what: str, cap_s: float = 180.0) -> str:
        """Poll the screen until `predicate(text)` holds (a condition, not a fixed sleep)."""
        deadline = time.monotonic() + cap_s
        while True:
            text = self.capture()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=30)


def prune_command() -> str:
    """`prune tui` (the console script) when it is installed, else `python -m tui`."""
    script = Path(sys.executable).with_name("prune")
    if script.is_file():
        return f"{script} tui"
    return f"{sys.executable} -m tui"


@pytest.fixture
def session_file(tmp_path: Path) -> Path:
    session = Session().with_updates({
        "session.name": "tmuxrun", "session.output_dir": str(tmp_path / "runs"), "model.id": "tiny-llama",
        "model.device": "cpu", "data.dataset": "shakespeare", "data.seq_len": 32, "data.num_samples": 8,
        "data.batch_size": 4, "pruning.ratio": 0.3, "importance.checkpoint_seconds": 0.0,
    })
    return sessions.save(session, tmp_path / "tmuxrun.toml")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLORTERM", "TMUX", "TMUX_PANE")}
    keep.update({"TERM": "xterm-256color", "HOME": os.environ.get("HOME", str(tmp_path)), "LANG": "C.UTF-8",
                 "LC_ALL": "C.UTF-8", "PYTHONPATH": str(ROOT)})
    return keep


def sgr_colours(text: str) -> list[str]:
    """Colour parameters of every SGR escape sequence in a `capture-pane -e` dump."""
    out = []
    for params in re.findall(r"\x1b\[([0-9;:]*)m", text):
        parts = params.replace(":", ";").split(";")
        i = 0
        while i < len(parts):
            p = parts[i]
            if p in ("38", "48") and i + 1 < len(parts):
                if parts[i + 1] == "5":
                    out.append(f"{p};5;{parts[i + 2]}")
                    i += 3
                    continue
                if parts[i + 1] == "2":
                    out.append(f"{p};2;{';'.join(parts[i + 2:i + 5])}")
                    i += 5
                    continue
            if p.isdigit() and (30 <= int(p) <= 37 or 40 <= int(p) <= 47 or 90 <= int(p) <= 107):
                out.append(p)
            i += 1
    return out


def is_gray(colour: str) -> bool:
    parts = colour.split(";")
    if len(parts) == 3:
        return int(parts[2]) in GRAYS_256
    if len(parts) == 5:
        return parts[2] == parts[3] == parts[4]
    return int(parts[0]) in (30, 37, 40, 47, 90, 97, 100, 107)


def assert_terminal_clean(pane: Pane) -> None:
    """After the app exits: main screen, cursor visible, no mouse/keypad modes, cooked tty, no junk."""
    assert pane.flag("alternate_on") == "0"
    assert pane.flag("cursor_flag") == "1"
    for flag in ("mouse_any_flag", "mouse_button_flag", "mouse_all_flag", "mouse_sgr_flag", "mouse_utf8_flag",
                 "keypad_cursor_flag", "origin_flag", "insert_flag"):
        assert pane.flag(flag) in ("0", ""), flag
    pane.send_line("clear; echo STTY-BEGIN; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e echo -e -icanon "
                   "-e -echo; echo STTY-END")
    text = pane.wait(lambda t: "STTY-END" in t.splitlines(), "stty output", 30)
    lines = text.splitlines()
    modes = set(lines[lines.index("STTY-BEGIN") + 1:lines.index("STTY-END")])
    assert modes == {"icanon", "echo"}, modes  # cooked mode with echo: the app restored the tty
    screen = pane.capture()
    assert "\x1b" not in screen and "[?1049" not in screen and "[?25" not in screen and "^[" not in screen


def test_tui_in_tmux_runs_to_results_and_leaves_the_terminal_clean(tmp_path: Path, session_file: Path,
                                                                   env: dict[str, str]) -> None:
    pane = Pane(tmp_path, env)
    try:
        pane.send_line(f"cd {tmp_path} && {prune_command()} {session_file.name}; echo EXIT=$?")
        pane.wait(lambda t: all(s in t for s in ("6 Review", "valid", "prune — tmuxrun")), "the review step")
        colours = sgr_colours(pane.capture(escapes=True))
        assert any(c.startswith("38;5;") for c in colours), "expected 256-colour output"
        assert not any(c.startswith("38;2;") for c in colours), "truecolor sent to a 256-colour terminal"

        pane.send("C-r")
        pane.wait(lambda t: all(s in t for s in ("Allocation", "achieved", "tiny-llama", "Diagnosis")),
                  "the results screen")
        pane.send("F3")
        # Wait for the whole run screen, not its first painted line: tmux may capture a half-repainted frame.
        run_screen = pane.wait(lambda t: all(s in t for s in ("Done: F4", "importance", "batch 2/2", "per layer")),
                               "the run screen with its batch counter and per-layer chart")
        if os.environ.get("PRUNE_TUI_WRITE_DOCS"):
            (ROOT / "docs" / "tui_run_screen.txt").write_text(run_screen.rstrip() + "\n", encoding="utf-8")
        pane.send("F4")
        pane.wait(lambda t: "Allocation" in t and "achieved" in t, "the results screen again")
        pane.send("d")
        pane.wait(lambda t: re.search(r"\[(CRIT|HIGH|WARN|INFO)\]", t) is not None, "findings")
        pane.send("C-q")
        pane.wait(lambda t: "EXIT=0" in t, "the app to exit with 0")
        assert_terminal_clean(pane)
        assert (tmp_path / "runs" / "tmuxrun" / "metrics.json").is_file()
    finally:
        pane.close()


def test_no_color_in_tmux(tmp_path: Path, session_file: Path, env: dict[str, str]) -> None:
    pane = Pane(tmp_path, env)
    try:
        pane.send_line(f"cd {tmp_path} && NO_COLOR=1 {prune_command()} {session_file.name}; echo EXIT=$?")
        pane.wait(lambda t: "6 Review" in t and "valid" in t, "the review step")
        colours = sgr_colours(pane.capture(escapes=True))
        assert colours, "expected some (grey) colours"
        assert all(is_gray(c) for c in colours), sorted(set(c for c in colours if not is_gray(c)))
        pane.send("C-q")
        pane.wait(lambda t: "EXIT=0" in t, "the app to exit with 0")
        assert_terminal_clean(pane)
    finally:
        pane.close()


# ----------------------------------------------------------------------------- runs that survive SSH
SLOW = {"data.num_samples": 96, "data.seq_len": 32, "data.batch_size": 1, "evaluation.before": False,
        "evaluation.after": False, "output.save_model": False}


def slow_session(tmp_path: Path, name: str, **extra: object) -> Path:
    session = Session().with_updates({
        "session.name": name, "session.output_dir": str(tmp_path / "runs"), "model.id": "tiny-llama",
        "model.device": "cpu", "data.dataset": "shakespeare", "pruning.ratio": 0.3, **SLOW, **extra,
    })
    return sessions.save(session, tmp_path / f"{name}.toml")


def logged_batch(folder: Path) -> int:
    """The newest batch in the folder's event log (0 before the first)."""
    from prune_core.eventlog import read_events

    return max([e["batch"] for e in read_events(folder) if e.get("kind") == "batch_done"] or [0])


def run_json(path: Path, env: dict[str, str]) -> list[dict]:
    import json

    proc = subprocess.run([sys.executable, "-m", "cli", "run", str(path), "--json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def test_sighup_checkpoints_the_tui_run_exits_129_and_resumes(tmp_path: Path, env: dict[str, str]) -> None:
    """`prune tui` in a terminal gets SIGHUP mid-pass: checkpoint, clean terminal, exit 129, same mask on resume."""
    from prune_core import lock

    # no periodic checkpoint: the only checkpoint is the one the signal handling writes
    path = slow_session(tmp_path, "hup", **{"importance.checkpoint_seconds": 600.0, "data.num_samples": 160})
    folder = tmp_path / "runs" / "hup"
    pane = Pane(tmp_path, env)
    try:
        pane.send_line(f"cd {tmp_path} && {prune_command()} {path.name}; echo EXIT=$?")
        pane.wait(lambda t: "6 Review" in t and "valid" in t, "the review step")
        pane.send("C-r")
        deadline = time.monotonic() + 180
        while logged_batch(folder) < 2:  # the event log, not the screen: it is written as batches finish
            assert time.monotonic() < deadline, pane.capture()
            time.sleep(0.02)
        holder = lock.holder(folder)
        assert holder is not None, "the TUI run holds the results folder's lock"
        os.kill(holder.pid, signal.SIGHUP)
        stopped_at = logged_batch(folder)
        assert stopped_at < 150, "the pass ran too fast to be stopped in the middle"
        text = pane.wait(lambda t: re.search(r"^EXIT=\d+", t, re.M) is not None, "the app to exit", 120)
        assert re.search(r"^EXIT=129$", text, re.M), text
        assert_terminal_clean(pane)
    finally:
        pane.close()
    assert (folder / "state" / "checkpoints").is_dir() and any((folder / "state" / "checkpoints").rglob("*"))
    assert lock.holder(folder) is None
    from prune_core.eventlog import read_events

    log = read_events(folder)
    assert log[-1]["kind"] == "run_interrupted" and "checkpointed" in [e["kind"] for e in log]
    resumed = run_json(path, env)
    batches = [e for e in resumed if e["kind"] == "batch_done"]
    assert batches[0]["resumed_from"] >= stopped_at
    reference = run_json(slow_session(tmp_path, "ref", **{"data.num_samples": 160}), env)
    assert resumed[-1]["mask_sha256"] == reference[-1]["mask_sha256"]


def test_ctrl_c_in_the_tui_checkpoints_exits_130_and_prints_how_to_resume(tmp_path: Path,
                                                                        env: dict[str, str]) -> None:
    """In a real terminal Ctrl-C reaches the app as a key (raw mode), not as SIGINT: it still stops the pass
    after its batch with a checkpoint, exits 130 as the README says, and leaves one line saying how to resume."""
    path = slow_session(tmp_path, "intr", **{"importance.checkpoint_seconds": 600.0, "data.num_samples": 400})
    folder = tmp_path / "runs" / "intr"
    pane = Pane(tmp_path, env)
    try:
        pane.send_line(f"cd {tmp_path} && {prune_command()} {path.name}; echo EXIT=$?")
        pane.wait(lambda t: "6 Review" in t and "valid" in t, "the review step")
        pane.send("C-r")
        deadline = time.monotonic() + 180
        while logged_batch(folder) < 2:
            assert time.monotonic() < deadline, pane.capture()
            time.sleep(0.02)
        pane.send("C-c")
        text = pane.wait(lambda t: re.search(r"^EXIT=\d+", t, re.M) is not None, "the app to exit", 120)
        assert re.search(r"^EXIT=130$", text, re.M), text
        flat = " ".join(text.split())
        assert "interrupted: importance pass stopped after batch" in flat, text
        assert f"resume with: prune run {path.name}" in flat, text
        assert_terminal_clean(pane)
    finally:
        pane.close()
    assert (folder / "state" / "checkpoints").is_dir() and any((folder / "state" / "checkpoints").rglob("*"))


def test_headless_progress_fits_80_columns(tmp_path: Path, env: dict[str, str]) -> None:
    """`prune run` at 80×24 in tmux: the live line shows the stage, batch n/N, loss, tok/s and the ETA;
    Ctrl-C says "stopping after batch n/N…" at once, and the run exits 130 with the pass checkpointed."""
    path = slow_session(tmp_path, "narrow", **{"data.num_samples": 2000, "importance.checkpoint_seconds": 600.0})
    pane = Pane(tmp_path, env)
    try:
        pane.send_line(f"cd {tmp_path} && {sys.executable} -m cli run {path.name}; echo EXIT=$?")
        screen = pane.wait(lambda t: re.search(r"importance .*\b\d+/2000 .*ETA \d+:\d\d", t) is not None,
                           "a progress line with batch n/N and ETA")
        line = next(x for x in screen.splitlines() if x.startswith("importance"))
        assert len(line.rstrip()) <= 80 and "loss " in line and "tok/s" in line and "…" not in line
        pane.send("C-c")
        pane.wait(lambda t: re.search(r"stopping after batch \d+/2000", t) is not None, "the stopping notice", 30)
        text = pane.wait(lambda t: re.search(r"^EXIT=\d+", t, re.M) is not None, "the run to stop", 120)
        assert re.search(r"^EXIT=130$", text, re.M), text
    finally:
        pane.close()
    assert (tmp_path / "runs" / "narrow" / "state" / "checkpoints").is_dir()
