"""Errors the engine raises: each names the problem and the fix, and says whether it is bad input.

The CLI maps `BadInput` to exit code 2 and `RunFailed` to exit code 1; the TUI shows both inline.
"""

from __future__ import annotations


class PruneError(Exception):
    """A problem the user can act on: `message` says what is wrong, `fix` how to put it right."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.fix}" if self.fix else self.message


class BadInput(PruneError):
    """The session, an argument, a model or a dataset named by the user is wrong (exit code 2)."""


class RunFailed(PruneError):
    """The run itself failed: NaN gradients, out of memory, a corrupt checkpoint (exit code 1)."""


class Interrupted(PruneError):
    """The run was asked to stop (signal or cancel); state was checkpointed (exit code 130)."""
