"""Turn SIGINT, SIGTERM and SIGHUP into a polite stop request the engine polls between batches.

The first signal sets the flag: the importance pass checkpoints after the batch in flight and the
run exits (130 for `prune run`; the workbench exits 128 + the signal: 130, 143 or 129). Whoever
shows progress is told at once (`StopFlag.listen`), so "stopping after batch 8/12…" appears
immediately. A second Ctrl-C says what stopping at once would lose (the batches since the last
checkpoint) and asks for a third within `CONFIRM_S`; that one stops at once (KeyboardInterrupt).
SIGHUP matters: an SSH connection dropping must not lose a long pass.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

DETACHED_ENV = "PRUNE_DETACHED"  # "1" in a `prune run --detach` process: no terminal, so a SIGINT is a stop request
SIGNALS = [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]
EXIT_FOR_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
CONFIRM_S = 5.0


def exit_code_for(signal_name: str, default: int = 130) -> int:
    """128 + the signal's number for SIGINT, SIGTERM and SIGHUP (130, 143, 129)."""
    return EXIT_FOR_SIGNAL.get(signal_name, default)


def stop_cause(signal_name: str) -> str:
    """What stopped a run, for its "interrupted" message: the signal's name, except in a detached run, which
    has no terminal to press Ctrl-C in: there SIGINT is a stop request (`prune attach --stop` sends it)."""
    if signal_name == "SIGINT" and os.environ.get(DETACHED_ENV) == "1":
        return "stopped by a stop request: prune attach --stop"
    return signal_name


class StopFlag:
    """A stop request (callable: the engine's should_stop) plus what the run has done so far."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""
        self.batch = 0            # the last finished batch of the pass (kept up to date by the renderer)
        self.total = 0
        self.stage = ""
        self.checkpoint_batch = 0  # batches covered by the newest checkpoint
        self._listeners: list[Callable[[str], None]] = []
        self._warned_at = 0.0

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, name: str = "") -> None:
        first = not self._event.is_set()
        self.signal_name = self.signal_name or name
        self._event.set()
        if first:
            self.tell(self.stopping_text())

    def listen(self, fn: Callable[[str], None]) -> None:
        """Call `fn(text)` with news about stopping (from the signal handler: keep it quick)."""
        self._listeners.append(fn)

    def tell(self, text: str) -> None:
        for fn in self._listeners:
            with contextlib.suppress(Exception):  # a display problem must not turn a stop into a crash
                fn(text)

    def stopping_text(self) -> str:
        if self.total and self.batch < self.total:
            return (f"stopping after batch {self.batch + 1}/{self.total} of {self.stage or 'the pass'}… "
                    "(it is checkpointed; run the same command again to resume)")
        return "stopping after the current step…"

    def losing_text(self) -> str:
        """What stopping at once loses."""
        lost = max(self.batch - self.checkpoint_batch, 0) + (1 if self.total and self.batch < self.total else 0)
        if not self.total:
            return "stopping at once loses the current step"
        kept = f"the checkpoint after batch {self.checkpoint_batch}" if self.checkpoint_batch else "no checkpoint"
        return f"stopping at once loses {lost} batch{'es' if lost != 1 else ''} of work ({kept} is kept)"

    def second_interrupt(self) -> bool:
        """A second Ctrl-C: True when it confirms a warning given within CONFIRM_S (stop at once)."""
        now = time.monotonic()
        if self._warned_at and now - self._warned_at <= CONFIRM_S:
            return True
        self._warned_at = now
        self.tell(f"{self.losing_text()}; press Ctrl-C again within {CONFIRM_S:.0f} s to stop at once, "
                  f"or wait: {self.stopping_text()}")
        return False

    def observe(self, event: object) -> None:
        """Keep the progress counters current from an engine event (BatchDone, Checkpointed)."""
        kind = getattr(event, "kind", "")
        if kind == "batch_done":
            self.batch, self.total, self.stage = event.batch, event.total, event.stage  # type: ignore[attr-defined]
            self.checkpoint_batch = max(self.checkpoint_batch, event.resumed_from)  # type: ignore[attr-defined]
        elif kind == "checkpointed":
            self.checkpoint_batch = event.batch  # type: ignore[attr-defined]
        elif kind == "stage_started":
            self.batch, self.total, self.stage = 0, 0, event.stage  # type: ignore[attr-defined]


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if flag() and signum == signal.SIGINT:
            if flag.second_interrupt():
                raise KeyboardInterrupt
            return
        flag.set(name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
