"""Textual messages: the only way news reaches the UI and the only way screens ask the app for something.

Two directions:

* worker threads -> UI: `EngineEvent` (an engine event), `JobDone` / `JobFailed` (a job's outcome),
  `Measured` and `Loaded` (facts gathered in the background). Workers only call
  `post_message`, which is thread-safe; consecutive `BatchDone` events coalesce in the queue
  (`can_replace`), so a fast pass cannot flood the UI: the run view always draws the newest batch.
* screens / widgets / the command palette -> app: the `Request` subclasses. They bubble from the
  widget that posts them up to the app, which owns the session and runs every engine job.

`StateChanged` goes from the app to the active screen: re-read the `WorkbenchState`.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

from prune_core.events import BatchDone, Event
from sessions import Session


# -- worker threads -> UI ---------------------------------------------------------------------------
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


class Measured(Message):
    """The machine's rough CPU throughput (FLOP/s) and whether CUDA is there, for the estimate."""

    def __init__(self, cpu_flops: float, cuda: bool) -> None:
        super().__init__()
        self.cpu_flops = cpu_flops
        self.cuda = cuda


class Loaded(Message):
    """A set-up step's background read finished: `what` names it, `value` is the data, `error` a reason."""

    def __init__(self, what: str, value: Any = None, error: str = "") -> None:
        super().__init__()
        self.what = what
        self.value = value
        self.error = error


# -- app -> screens ---------------------------------------------------------------------------------
class StateChanged(Message):
    """The app's session, results or run state changed: the active screen should re-read it."""

    def __init__(self, what: str = "") -> None:
        super().__init__()
        self.what = what


# -- screens / palette -> app -----------------------------------------------------------------------
class Request(Message):
    """Something only the app can do (it owns the session and the engine jobs)."""


class FormEdited(Request):
    """The set-up form was folded into the state (`WorkbenchState.apply_form`): update the title."""


class RunRequested(Request):
    """Run the session (ctrl+r); `fresh` ignores cached stages, `resume` continues an interrupted pass."""

    def __init__(self, *, fresh: bool = False, resume: bool = False) -> None:
        super().__init__()
        self.fresh = fresh
        self.resume = resume


class CancelRequested(Request):
    """Stop the running job after its current step (asks first)."""


class FixRequested(Request):
    """Apply a diagnosis finding's fix (`updates`: dotted session keys -> values) and re-allocate."""

    def __init__(self, issue: str, updates: dict[str, Any]) -> None:
        super().__init__()
        self.issue = issue
        self.updates = dict(updates)


class WhatIfRequested(Request):
    """Re-allocate for `session` (a what-if change of the current one) on the cached importance."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session


class TuneRequested(Request):
    """Search the cheap knobs by the proxy loss (`prune tune`) and show the best allocation."""


class EvaluateRequested(Request):
    """Perplexity before and after pruning."""


class SaveModelRequested(Request):
    """Save the pruned model in the results folder."""


class RecoverRequested(Request):
    """LoRA fine-tuning of the saved pruned model (`prune recover` on the results folder shown)."""

    def __init__(self, *, fresh: bool = False) -> None:
        super().__init__()
        self.fresh = fresh


class SampleRequested(Request):
    """Generate a short text from the original and the pruned model."""

    def __init__(self, prompt: str | None = None) -> None:
        super().__init__()
        self.prompt = prompt


class SaveRequested(Request):
    """Save the session file; `ask` always asks for a file name ("save as")."""

    def __init__(self, *, ask: bool = False) -> None:
        super().__init__()
        self.ask = ask


class OpenRequested(Request):
    """Ask for a session file or a results folder and open it."""


class ShowRequested(Request):
    """Show a main view ("setup", "run", "results"); `step` also picks a set-up step."""

    def __init__(self, view: str, step: str | None = None) -> None:
        super().__init__()
        self.view = view
        self.step = step


class HelpRequested(Request):
    """Show the help screen."""


class InspectRequested(Request):
    """Resolve the Model step's model and show its geometry."""
