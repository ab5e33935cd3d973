"""Turn SIGINT, SIGTERM and SIGHUP into a polite stop request the engine polls between batches.

The first signal sets the flag (the importance pass checkpoints and the run exits with 130); a second
SIGINT stops at once. SIGHUP matters: an SSH connection dropping must not lose a long pass.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


class StopFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, name: str = "") -> None:
        self.signal_name = name
        self._event.set()


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if flag() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set(name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
