"""Runs that outlive the terminal: `prune run --detach`, `prune attach RESULTS`, `prune ps`.

A detached run is `prune run SESSION` started in its own process session (`start_new_session`:
no controlling terminal, so an SSH connection dropping sends it no SIGHUP), stdin from /dev/null and
its output in `<results>/state/detached.log`. Like every writing run it holds `<results>/run.lock` and logs each
event to `<results>/events.ndjson` (`prune_core.lock`, `prune_core.eventlog`). `attach` replays that
log through the usual renderer and follows it until the run ends; `--stop` asks the run to stop
after its current batch (SIGINT to the lock holder: the pass is checkpointed; the detached process runs
with PRUNE_DETACHED=1, so its message names the stop request, not a signal: it has no terminal to
press Ctrl-C in). `ps` lists the runs under the output folders of the session files here (and `runs/`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli.signals import DETACHED_ENV
from prune_core import eventlog, lock
from prune_core.errors import BadInput

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LOG_NAME = "state/detached.log"  # the detached process's own output (state/ is prune's)
POLL_S = 0.2
START_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- detach
def detach(session_file: Path, out_dir: Path | None, fresh: bool, console: Console, json_mode: bool = False) -> int:
    """Start `prune run SESSION` in its own process session; print the results folder; 0 once it holds the lock.

    With `json_mode` stdout gets one JSON object instead, `{"kind": "detached", "results_dir", "pid", "log"}`
    (or the `run_failed` end record when the run exits at once), and the hints go to stderr.
    """
    import sessions
    from prune_core import pipeline, preflight

    session = sessions.load(session_file)  # BadInput (exit 2) before anything starts
    preflight.before_run(session, pipeline.results_dir_for(session, out_dir))  # what the run would refuse
    folder = pipeline.results_dir_for(session, out_dir).resolve()
    held = lock.holder(folder)
    if held is not None:
        raise lock.locked_message(folder, held)
    (folder / LOG_NAME).parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cli", "run", str(Path(session_file).resolve()), "--out", str(folder)]
    if fresh:
        cmd.append("--fresh")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", DETACHED_ENV: "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    hints = Console(stderr=True) if json_mode else console  # with --json stdout holds the JSON object alone
    log_file = open(folder / LOG_NAME, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=os.getcwd(), close_fds=True)
    finally:
        log_file.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = lock.read_info(folder)
        if info is not None and info.pid == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            message = f"the detached run exited at once with code {code}"
            hints.print(f"{message}:\n{_tail(folder / LOG_NAME)}", markup=False, highlight=False, soft_wrap=True)
            if json_mode:
                typer.echo(json.dumps({**eventlog.end_record("run_failed", message), "results_dir": str(folder),
                                       "log": str(folder / LOG_NAME)}))
            return int(code) if code in (EXIT_BAD_INPUT, EXIT_LOCKED) else EXIT_FAILED
        time.sleep(POLL_S)
    if json_mode:
        typer.echo(json.dumps({"kind": "detached", "results_dir": str(folder), "pid": proc.pid,
                               "log": str(folder / LOG_NAME)}))
    else:
        console.print(str(folder), markup=False, highlight=False, soft_wrap=True)
    hints.print(f"running detached as pid {proc.pid}; follow it: prune attach {folder}  "
                f"(stop it: prune attach {folder} --stop; list runs: prune ps)",
                markup=False, highlight=False, soft_wrap=True, style="dim")
    return EXIT_OK


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- attach
def _is_run_folder(folder: Path) -> bool:
    return eventlog.log_path(folder).is_file() or lock.lock_path(folder).is_file()


def attach(folder: Path, renderer: Any, *, stop: bool = False, follow: bool = True,
           console: Console | None = None) -> int:
    """Replay `<folder>/events.ndjson` through `renderer` and follow it until the run ends.

    Returns 0 when the run finished, 130 when it was interrupted, 1 when it failed or vanished
    without an end record (killed). Ctrl-C leaves `attach`; the run goes on.
    """
    folder = Path(folder)
    if not _is_run_folder(folder):
        raise BadInput(f"{folder} holds no run to attach to (no {eventlog.LOG_NAME})",
                       "pass the results folder `prune run --detach` printed, or see `prune ps`")
    requested = False  # a stop request was sent to a live run (its end is then that request's doing)
    if stop:
        info = lock.request_stop(folder)
        requested = info is not None
        if console is not None:
            text = (f"asked {info.describe()} to stop after its current batch (it is checkpointed)" if info
                    else "no run holds this folder: nothing to stop")
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    offset = 0
    quiet_since: float | None = None
    while True:
        objs, offset = eventlog.read_lines(folder, offset)
        for obj in objs:
            kind = obj.get("kind")
            if kind in eventlog.END_KINDS:
                event = eventlog.from_dict(obj)
                if event is not None:
                    renderer(event)
                return _end_code(str(kind), obj, console, stopped=requested)
            event = eventlog.from_dict(obj)
            if event is not None:
                renderer(event)
        if not follow:
            return EXIT_OK
        if objs:
            quiet_since = None
        elif lock.holder(folder) is None:
            # no holder: give the last lines a moment to land, then say how it ended
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 1.0:
                if console is not None:
                    console.print("the run is no longer running and its log has no end record "
                                  "(it was killed?); run the same command again to resume",
                                  markup=False, highlight=False, soft_wrap=True)
                return EXIT_FAILED
        time.sleep(POLL_S)


def _end_code(kind: str, obj: dict[str, Any], console: Console | None, stopped: bool = False) -> int:
    if kind == "run_done":
        return EXIT_OK
    if console is not None:
        label = "run failed" if kind != "run_interrupted" else "stopped by the stop request" if stopped else "interrupted"
        console.print(f"{label}: {obj.get('message', '')}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_INTERRUPTED if kind == "run_interrupted" else EXIT_FAILED


# ----------------------------------------------------------------------------- ps
def run_status(folder: Path) -> dict[str, Any]:
    """State, progress and pid of the run in `folder` (from its lock and event log)."""
    info = lock.holder(folder)
    log = eventlog.summarize(eventlog.read_events(folder))
    state = {"run_done": "done", "run_interrupted": "interrupted", "run_failed": "failed"}.get(log.end, "unknown")
    if info is not None:
        state = "running"
    elif log.lines and state == "unknown":
        state = "killed"
    elif not log.lines and (folder / "metrics.json").is_file():
        state = "done"
    progress = f"{log.batch}/{log.total}" if log.batch is not None else ""
    return {"folder": str(folder), "state": state, "stage": log.stage, "progress": progress,
            "pid": info.pid if info else None, "host": info.host if info else "",
            "command": info.command if info else "", "session_file": info.session_file if info else "",
            "updated": log.updated}


def output_folders(cwd: Path) -> list[Path]:
    """`runs/` and the output_dir of every session file in `cwd`."""
    import tomllib

    found = {cwd / "runs"}
    for toml in sorted(cwd.glob("*.toml")):
        try:
            raw = tomllib.loads(toml.read_text(encoding="utf-8-sig"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        out = (raw.get("session") or {}).get("output_dir") if isinstance(raw, dict) else None
        if isinstance(out, str) and out:
            found.add((cwd / out) if not Path(out).is_absolute() else Path(out))
    return sorted(p for p in found if p.is_dir())


def list_runs(roots: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for root in roots:
        candidates = [root] if _is_run_folder(root) else sorted(p for p in root.iterdir() if p.is_dir())
        rows += [run_status(p) for p in candidates if _is_run_folder(p)]
    return rows


def print_runs(console: Console, rows: list[dict[str, Any]], json_mode: bool) -> None:
    if json_mode:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no runs found under the output folders here (runs/ and the session files' output_dir)",
                      markup=False, highlight=False)
        return
    table = Table(title="runs")
    for col in ("folder", "state", "stage", "progress", "pid"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["folder"], r["state"], r["stage"], r["progress"], str(r["pid"] or ""))
    console.print(table)


# ----------------------------------------------------------------------------- registration
def register(app: Any, fail: Any) -> None:
    """Add `attach` and `ps` to the Typer app (`fail(exc, code)` prints one line and returns the exit)."""
    from cli.render import make_renderer

    @app.command("attach")
    def attach_cmd(
        results: Annotated[Path, typer.Argument(help="The results folder of a running (or finished) run.")],
        stop: Annotated[bool, typer.Option("--stop", help="Ask the run to stop after its current batch "
                                                           "(checkpointed), then follow it to the end.")] = False,
        json_mode: Annotated[bool, typer.Option("--json", help="Replay the events as NDJSON.")] = False,
    ) -> None:
        """Replay a run's event log and follow it live until it ends (Ctrl-C leaves; the run goes on)."""
        console = Console(stderr=json_mode)
        renderer = make_renderer(console, json_mode)
        try:
            code = attach(results, renderer, stop=stop, console=Console(stderr=True))
        except BadInput as exc:
            renderer.close()
            raise fail(exc, EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            renderer.close()
            Console(stderr=True).print(f"left the run; it goes on (follow it again: prune attach {results}; "
                                       f"stop it: prune attach {results} --stop)", markup=False, highlight=False,
                                       soft_wrap=True)
            raise typer.Exit(EXIT_OK) from None
        renderer.close()
        if code == EXIT_OK and not json_mode:
            from cli.output import print_summary, run_summary
            from prune_core.report import RunReport

            with contextlib.suppress(BadInput):
                print_summary(console, run_summary(RunReport.read(results)))
        raise typer.Exit(code)

    @app.command("ps")
    def ps_cmd(
        folders: Annotated[list[Path] | None, typer.Argument(help="Output or results folders "
                                                                  "(default: runs/ and the session files' output_dir).")] = None,
        json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """List runs with their state (running, done, interrupted, failed, killed), progress and pid."""
        roots = [Path(f) for f in folders] if folders else output_folders(Path.cwd())
        print_runs(Console(), list_runs([r for r in roots if r.is_dir()]), json_mode)
