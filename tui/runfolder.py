"""What a path given to the workbench is (on the command line or with ctrl+o), read without loading anything.

`classify(path, pipeline)` returns a `Target`: a session file (or a new one), a finished results folder,
a folder another live process is writing ("follow"), a run folder that stopped before it finished
("stopped": interrupted, failed or killed; its event log and checkpoint are there, its session is not),
or a folder that holds nothing of prune's. For a run folder it also names the session file that runs
(ran) into it when that can be told: the one its lock records (`LockInfo.session_file`, written by
`prune run` and `prune fix --apply`), else the one session file in the working folder whose results
folder is this one.
Plain Python (no Textual); the engine is reached through `tui.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import sessions
import tui.engine as engine
from sessions import Session

Kind = Literal["session", "results", "follow", "stopped", "folder"]


@dataclass(frozen=True)
class Target:
    """A path to open and what it is."""

    kind: Kind
    path: Path
    holder: Any = None                   # the live process writing a "follow" folder (a LockInfo)
    session_file: Path | None = None     # the session file of a run folder, when it can be told
    session: Session | None = None       # that file, loaded
    resumable: bool = False              # a "stopped" folder holds a checkpoint to resume from
    end: str = ""                        # how a "stopped" run ended, from its event log
    batch: tuple[int, int] | None = None  # the last checkpointed batch of a "stopped" run, and the total
    writes_here: bool = False            # the session's own results folder is this one (not an --out)

    @property
    def resumes_here(self) -> bool:
        """Running the found session in the workbench writes into this folder (so r / ctrl+r resume it)."""
        return self.session is not None and self.resumable and self.writes_here


def classify(path: Path, pipeline: Any) -> Target:
    """What `path` is; `pipeline` gives a session's results folder (`results_dir_for`)."""
    if not path.is_dir():
        return Target("session", path)
    holder = engine.run_holder(path)
    if holder is not None:
        return _with_session(Target("follow", path, holder=holder), pipeline, holder.session_file)
    if engine.is_results_folder(path):
        return Target("results", path)
    log = engine.run_log_summary(path)
    resumable = engine.folder_has_checkpoint(path)
    if not log.lines and not resumable:
        return Target("folder", path)
    if log.end == "run_interrupted":
        end = "interrupted"  # its message names the checkpoint, which the app's own words say
    elif log.end == "run_failed":
        end = f"failed: {log.end_message}"
    else:
        end = "stopped without an end record (killed?)" if log.lines else ""
    target = Target("stopped", path, resumable=resumable, end=end,
                    batch=(log.checkpoint, log.total) if log.checkpoint is not None and log.total else None)
    # a run killed before it released its lock still names its session file there
    return _with_session(target, pipeline, engine.recorded_session_file(path))


def _with_session(target: Target, pipeline: Any, session_file: str) -> Target:
    """`target` with the session file that writes its folder: the one its lock records, else the one
    `*.toml` here whose results folder it is."""
    folder = _resolved(target.path)
    found = _from_lock(session_file)
    if found is None:
        matches = []
        for candidate in sorted(Path.cwd().glob("*.toml")):
            session = _load(candidate)
            if session is not None and _resolved(pipeline.results_dir_for(session)) == folder:
                matches.append((candidate, session))
        found = matches[0] if len(matches) == 1 else None
    if found is None:
        return target
    file, session = found
    here = _resolved(pipeline.results_dir_for(session)) == folder
    return replace(target, session_file=file, session=session, writes_here=here)


def _from_lock(session_file: str) -> tuple[Path, Session] | None:
    """The session file a run recorded in its folder's lock (`LockInfo.session_file`), loaded."""
    if not session_file:
        return None
    session = _load(Path(session_file))
    return (Path(session_file), session) if session is not None else None


def _load(path: Path) -> Session | None:
    try:
        return sessions.load(path) if path.is_file() else None
    except Exception:  # not a session file (or not a valid one): not the run's
        return None


def _resolved(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except OSError:
        return Path(path).absolute()


def stopped_message(target: Target) -> str:
    """What a stopped run folder is and how to go on with it (one plain paragraph)."""
    where = str(target.path)
    what = f"{where} holds a run that did not finish ({target.end or 'no end record'})"
    if not target.resumable:
        return (f"{what} and no checkpoint to resume from. Run its session again: "
                f"prune run {target.session_file or 'SESSION.toml'} --out {where}")
    at = f" after batch {target.batch[0]}/{target.batch[1]}" if target.batch else ""
    if target.resumes_here:
        return f"{what}; its importance pass was checkpointed{at}. Session {target.session_file} is loaded: r resumes it."
    return (f"{what}; its importance pass was checkpointed{at}. Resume it with: prune run "
            f"{target.session_file or '<the session .toml it ran>'} --out {where} (the same settings continue "
            f"from the checkpoint)")
