"""The Textual workbench of prune: `run_tui(path)` opens it on a session file, a results folder or nothing."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def run_tui(path: Path | None = None) -> int:
    """Run the workbench until the user quits; returns the exit code (0 = normal)."""
    from tui.app import PruneApp

    app = PruneApp(Path(path) if path is not None else None)
    result = app.run()
    code = int(result or 0) if app.return_code in (None, 0) else int(app.return_code)
    if app.exit_note:  # the terminal is restored: one plain line, as `prune run` prints when it stops
        with contextlib.suppress(OSError, ValueError):  # after SIGHUP there may be no terminal left
            print(app.exit_note, file=sys.stderr, flush=True)
    if app.stop_at_once:  # a third Ctrl-C: do not wait for the engine thread's checkpoint
        sys.stdout.flush()
        os._exit(code)
    return code


__all__ = ["run_tui"]
