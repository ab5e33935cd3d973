"""How the workbench stops: signals, Ctrl+C and quitting during a run, and the line it leaves in the terminal.

`ExitHandling` is a mixin of `PruneApp` (tui/app.py). SIGHUP, SIGTERM and SIGINT set the stop flag, the
engine worker checkpoints the pass after its current batch (the run screen says "stopping after batch
n/N…" meanwhile), and the app exits 129, 143 or 130 (`cli.signals.exit_code_for`, the codes `prune run`
uses). A second SIGINT says what stopping at once would lose; a third within `CONFIRM_S` stops at once.
Ctrl+C inside the app is a key (the terminal is raw), bound to the same handling as SIGINT; quitting
during a run does the same and exits 130. `exit_note` is the one plain line `run_tui` prints once the
terminal is back: where the pass stopped and how to resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from typing import Any

from cli.signals import CONFIRM_S, exit_code_for
from tui.screens.dialogs import ConfirmScreen
from tui.state import job_label

EXIT_QUIT_RUN = 130  # quitting during a run: checkpointed, like Ctrl-C in `prune run`


class ExitHandling:
    """Signals and interrupts of the workbench app (mixed into `PruneApp`, which provides `state`, the
    stop events, `notify`, `exit` and `push_screen`)."""

    state: Any
    pipeline: Any
    _stop: threading.Event
    _leave: threading.Event
    _exit_after_job: int | None
    _warned_at: float
    _signals: list[tuple[asyncio.AbstractEventLoop, int]]
    _run_session: Any
    _asking_interrupt: bool
    stop_at_once: bool
    exit_note: str

    def _install_signal_handlers(self) -> None:
        """SIGHUP, SIGTERM, SIGINT: checkpoint the running pass, then exit 128 + the signal."""
        if self.is_headless or threading.current_thread() is not threading.main_thread():
            return  # run_test() (tests call on_signal directly): leave the process's signals alone
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for name in ("SIGHUP", "SIGTERM", "SIGINT"):
            sig = getattr(signal, name, None)
            if sig is not None:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.on_signal, name)
                    self._signals.append((loop, sig))

    def on_unmount(self) -> None:
        for loop, sig in self._signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        self._signals.clear()

    def on_signal(self, name: str) -> None:
        """A signal arrived (SIGHUP, SIGTERM, SIGINT): stop politely, checkpoint, exit 129/143/130."""
        code = exit_code_for(name)
        if self._exit_after_job is not None and name == "SIGINT":
            now = time.monotonic()
            if self._warned_at and now - self._warned_at <= CONFIRM_S:
                self.stop_at_once = True
                if self.state.busy == "run":
                    kept = self.state.run_state.checkpoint
                    self.exit_note = self._resume_note("interrupted at once: " + (
                        f"the checkpoint after batch {kept.batch} is kept" if kept else "no checkpoint was written"))
                self.exit(return_code=self._exit_after_job)
                return
            self._warned_at = now
            self.notify(f"{self._losing_text()}; send Ctrl-C again within {CONFIRM_S:.0f} s to stop at once, or "
                        "wait for the checkpoint.", severity="warning", timeout=CONFIRM_S, markup=False)
            return
        if name == "SIGHUP":
            self._leave.set()
        self._stop_then_exit(code)

    def _stop_then_exit(self, code: int) -> None:
        """Exit with `code` now, or (a job running) once it has stopped after its current step."""
        busy = self.state.busy
        if busy is None or busy == "follow":
            if busy == "follow":
                self._leave_followed_run()
            self._leave.set()
            self.exit(return_code=code)
            return
        if self._exit_after_job is None:
            self._exit_after_job = code
        self._stop.set()
        self.state.run_state.stopping = True
        self.state.run_state.version += 1
        self.broadcast("run_stopping")
        self.notify(self._stopping_text(), severity="warning", timeout=30, markup=False)

    def _leave_followed_run(self) -> None:
        """Stop following another process's run (it goes on) and say so once the terminal is back."""
        self._leave.set()
        folder = self.state.run_state.results_dir
        self.exit_note = f"left the run in {folder}; it goes on (follow it again: prune tui {folder})"

    def _resume_note(self, what: str) -> str:
        """One plain line for the terminal after the app exits mid-run: what happened and how to resume."""
        run, path, state = self._run_session, self.state.session_path, self.state
        if run is not None and path is not None and path.is_file() and run.model_dump() == state.saved_dump:
            return f"{what}; resume with: prune run {path} (or prune tui {path}, then r)"
        folder = state.run_state.results_dir or (str(self.pipeline.results_dir_for(run)) if run else "")
        return (f"{what}; the run's settings were not saved to a session file, so only a run with the same "
                f"settings into {folder} resumes it")

    def _stopping_text(self) -> str:
        b = self.state.run_state.batch
        if self.state.busy == "run" and b is not None and b.batch < b.total:
            return f"Stopping after batch {b.batch + 1}/{b.total}… (the pass is checkpointed, then prune exits)"
        return f"Stopping {job_label(self.state.busy or '')} after its current step…"

    def _losing_text(self) -> str:
        rs = self.state.run_state
        b = rs.batch
        if b is None or self.state.busy != "run":
            return "Stopping at once loses the current step"
        kept = rs.checkpoint.batch if rs.checkpoint is not None else b.resumed_from
        lost = b.batch - kept + 1
        return (f"Stopping at once loses {lost} batch{'es' if lost != 1 else ''} "
                f"({'the checkpoint after batch ' + str(kept) if kept else 'no checkpoint'} is kept)")

    def action_interrupt(self) -> None:
        """Ctrl+C. The terminal is raw inside the app, so Ctrl+C arrives as a key, not as SIGINT: do what
        SIGINT does (checkpoint the run, exit 130; repeated, stop at once), asking first about unsaved changes."""
        state = self.state
        if self._exit_after_job is not None or not state.dirty or state.busy == "follow":
            self.on_signal("SIGINT")
            return
        if self._asking_interrupt:
            return  # the question is open already: answer it
        self._asking_interrupt = True
        why = "The session has unsaved changes"
        if state.busy:
            why += f"; {job_label(state.busy)} is stopped after its current step (checkpointed)"

        def answer(yes: bool | None) -> None:
            self._asking_interrupt = False
            if yes:
                self.on_signal("SIGINT")

        self.push_screen(ConfirmScreen("Stop and quit?", why + ".", "Quit", "Stay"), answer)

