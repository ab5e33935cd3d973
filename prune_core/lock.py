"""One run per results folder: an advisory lock held for the whole of a writing `pipeline.run`.

The lock is `<results>/run.lock`, locked with `fcntl.flock` (released by the kernel when the holder
dies, even on SIGKILL) and holding one JSON line naming the holder: pid, host, start time and
command. A second run on a locked folder gets `FolderLocked` at once (the CLI exits 3) with the
holder and how to follow it (`prune attach RESULTS`). A lock file left by a dead holder (its pid is
gone on this host, or its flock is free) is taken over with a notice.

`holder(folder)` reads who holds a folder without taking the lock (for `prune ps`, `prune attach`
and the workbench); `request_stop(folder)` asks the holder to stop after its current batch
(SIGINT: the holder checkpoints the pass, exactly as on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prune_core.errors import PruneError
from prune_core.events import EventSink, Notice, null_sink
from prune_core.provenance import now_iso

try:  # POSIX; elsewhere the lock file with a pid check is the whole lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"


class FolderLocked(PruneError):
    """Another live run holds this results folder (the CLI exits 3)."""

    def __init__(self, message: str, fix: str | None = None, holder: LockInfo | None = None) -> None:
        super().__init__(message, fix)
        self.holder = holder


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) a results folder."""

    pid: int
    host: str
    started: str
    command: str
    session_file: str = ""  # the absolute path of the session file the run reads ("" when it came from elsewhere)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (started {self.started}: {self.command})"

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()


def lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK_NAME


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_info(folder: Path) -> LockInfo | None:
    """The holder recorded in the folder's lock file (alive or not), or None."""
    try:
        raw = json.loads(lock_path(folder).read_text(encoding="utf-8") or "null")
        return LockInfo(int(raw["pid"]), str(raw["host"]), str(raw.get("started", "")), str(raw.get("command", "")),
                        str(raw.get("session_file") or ""))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _flock_free(path: Path) -> bool | None:
    """True when nobody holds the flock of `path` (probed without keeping it), None when unknown."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return True


def holder(folder: Path) -> LockInfo | None:
    """The live holder of `folder`, or None when no run holds it.

    On this host the pid must be alive and the flock held; a holder on another host (a shared
    filesystem) is trusted as long as its lock file is there.
    """
    info = read_info(folder)
    if info is None:
        return None
    if not info.local:
        return info
    if not pid_alive(info.pid) or _flock_free(lock_path(folder)) is True:
        return None
    return info


def locked_message(folder: Path, info: LockInfo) -> FolderLocked:
    return FolderLocked(f"{folder} is in use by another run: {info.describe()}",
                        f"follow it with `prune attach {folder}` (its --stop option stops it, checkpointed), "
                        "or choose another --out folder", holder=info)


def request_stop(folder: Path) -> LockInfo | None:
    """Ask the folder's live holder to stop after its current batch (it checkpoints); returns it, or None."""
    info = holder(folder)
    if info is None or not info.local:
        return None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(info.pid, signal.SIGINT)
    return info


class RunLock:
    """The held lock of one results folder (use `hold`)."""

    def __init__(self, folder: Path, fd: int, info: LockInfo) -> None:
        self.folder, self.fd, self.info = folder, fd, info

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if read_info(self.folder) == self.info:
                lock_path(self.folder).unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # drops the flock
        self.fd = -1


def acquire(folder: Path, *, command: str | None = None, session_file: Path | None = None,
            on_event: EventSink = null_sink) -> RunLock:
    """Take `folder`'s lock or raise `FolderLocked` naming its holder; a stale lock is taken over.
    `session_file` (the session file the run reads) is recorded so that a follower can load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    me = LockInfo(os.getpid(), socket.gethostname(), now_iso(), command or _command(),
                  str(Path(session_file).absolute()) if session_file is not None else "")
    for _ in range(5):
        previous = read_info(folder)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    info = read_info(folder) or previous
                    if info is None:
                        raise FolderLocked(f"{folder} is in use by another run",
                                           f"follow it with `prune attach {folder}`") from None
                    raise locked_message(folder, info) from None
                # the file may have been unlinked by the holder releasing it just now: retry on the new one
                if os.fstat(fd).st_ino != _inode(path):
                    os.close(fd)
                    continue
            elif previous is not None and previous.local and pid_alive(previous.pid) and previous.pid != me.pid:
                raise locked_message(folder, previous)
            if previous is not None and previous != me:
                on_event(Notice(f"took over a stale lock of {folder}: {previous.describe()} is no longer running",
                                level="warning"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode("utf-8"), 0)
            return RunLock(folder, fd, me)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise FolderLocked(f"could not lock {folder}", "try again")


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "/prune")):
        argv[0] = "prune"
    return " ".join(argv)


@contextlib.contextmanager
def hold(folder: Path, *, command: str | None = None, session_file: Path | None = None,
         on_event: EventSink = null_sink) -> Iterator[RunLock]:
    """Hold `folder`'s lock for the duration of the block."""
    held = acquire(folder, command=command, session_file=session_file, on_event=on_event)
    try:
        yield held
    finally:
        held.release()
