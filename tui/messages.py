"""Textual messages that carry engine events and job outcomes from worker threads to the UI.

The engine runs in a thread worker and only talks back through `App.post_message` (thread-safe).
Consecutive `BatchDone` events coalesce in the message queue (`can_replace`), so a fast pass cannot
flood the UI: the run view always draws the newest batch.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

from prune_core.events import BatchDone, Event


class EngineEvent(Message):
    """One event from the engine (StageStarted, StageDone, Progress, BatchDone, Notice, ...)."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        """A newer BatchDone supersedes an older one still waiting in the queue."""
        return (isinstance(self.event, BatchDone) and isinstance(message, EngineEvent)
                and isinstance(message.event, BatchDone))


class JobDone(Message):
    """A background job finished; `result` is whatever it returned."""

    def __init__(self, job: str, result: Any = None) -> None:
        super().__init__()
        self.job = job
        self.result = result


class JobFailed(Message):
    """A background job raised; `interrupted` is True when it stopped on request (resumable)."""

    def __init__(self, job: str, error: BaseException, interrupted: bool = False) -> None:
        super().__init__()
        self.job = job
        self.error = error
        self.interrupted = interrupted


class StateChanged(Message):
    """The app's session, results or run state changed: the active screen should re-read it."""

    def __init__(self, what: str = "") -> None:
        super().__init__()
        self.what = what
