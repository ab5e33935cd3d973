"""The `prune` command line: a Typer app whose commands render engine events and results.

Exit codes (documented in the README): 0 success, 1 the run failed, 2 bad input (session file,
arguments, unknown model or dataset), 3 the results folder is in use by another run (`prune attach`
follows it), 130 interrupted (state checkpointed; run again to resume).
`prune` with no command opens the Textual workbench. `main()` (the console script and `python -m cli`)
tunes glibc malloc for the whole process first (prune_core/importance/allocator.py).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli import runs_cmd
from cli.files import check_new_file
from cli.fix_cmd import print_findings
from cli.output import print_summary, run_summary
from cli.render import JsonRenderer, make_renderer
from cli.signals import StopFlag, stop_cause, stop_on_signals
from prune_core.errors import BadInput, Interrupted, PruneError
from prune_core.lock import FolderLocked

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_LOCKED = 3  # the results folder is in use by another run (prune_core.lock)

app = typer.Typer(
    name="prune",
    help="A terminal workbench for structured, global pruning of LLaMA-family language models.",
    no_args_is_help=False,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[data] seq_len" is a session key, not Rich markup
    context_settings={"help_option_names": ["-h", "--help"]},
)
# messages hold user text (paths, dataset names, folder contents): never read as Rich markup
out = Console(markup=False)
err = Console(stderr=True, markup=False)
state: dict[str, bool] = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        from prune_core.provenance import project_version

        typer.echo(f"prune {project_version()}")
        raise typer.Exit(EXIT_OK)


def fail(exc: BaseException, code: int) -> typer.Exit:
    """Print one clear line (the traceback only with --debug) and return the exit to raise."""
    if state["debug"]:
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc) if isinstance(exc, PruneError) else f"{type(exc).__name__}: {exc}. Fix: {_fix_for(exc)}"
    label = {EXIT_BAD_INPUT: "error", EXIT_FAILED: "run failed", EXIT_INTERRUPTED: "interrupted", EXIT_LOCKED: "busy"}[code]
    line = Text()
    line.append(f"{label}:", style="bold red")
    line.append(f" {text}")
    err.print(line, highlight=False, soft_wrap=True)
    if code == EXIT_FAILED and not state["debug"]:
        err.print("(run again with --debug for the full traceback)", style="dim")
    return typer.Exit(code)


def _fix_for(exc: BaseException) -> str:
    """A fix for an error the engine did not foresee (it raises PruneError with its own fix otherwise)."""
    if isinstance(exc, PermissionError):
        return "check the permissions of the file or folder named above"
    if isinstance(exc, OSError):
        return "check the path named above, that its folder is writable and that the disk has free space"
    if isinstance(exc, MemoryError):
        return "use a smaller model, seq_len or batch_size, or a machine with more memory"
    if "No space left on device" in str(exc) or "os error 28" in str(exc):  # e.g. safetensors' own error type
        return "free disk space where the results folder is (or point --out elsewhere) and run again"
    return "run again with --debug for the full traceback, and report it if the input looks right"


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Every command's errors: BadInput exits 2, any other failure 1, a stop 130 (no traceback without --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except FolderLocked as exc:
        raise fail(exc, EXIT_LOCKED) from None
    except BadInput as exc:
        raise fail(exc, EXIT_BAD_INPUT) from None
    except Interrupted as exc:
        raise fail(exc, EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        raise fail(Interrupted("stopped (Ctrl-C)", "run the command again"), EXIT_INTERRUPTED) from None
    except (Exception, RecursionError, MemoryError) as exc:
        raise fail(exc, EXIT_FAILED) from None


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Open the workbench (no command), or run one of the commands below."""
    state["debug"] = debug
    if ctx.invoked_subcommand is None:
        _open_tui(None)


def _open_tui(path: Path | None) -> None:
    try:
        from tui import run_tui
    except ImportError as exc:  # pragma: no cover - the TUI ships with the package
        raise fail(exc, EXIT_FAILED) from None
    code = run_tui(path)
    raise typer.Exit(code or EXIT_OK)


@app.command()
def tui(path: Annotated[Path | None, typer.Argument(help="A session .toml or a results folder.")] = None) -> None:
    """Open the Textual workbench, optionally on a session file or a results folder."""
    _open_tui(path)


# ----------------------------------------------------------------------------- sessions
@app.command()
def new(
    path: Annotated[Path, typer.Argument(help="Where to write the template.")] = Path("session.toml"),
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented session template with every key and its default."""
    from prune_core.atomic import write_text
    from sessions import template_text

    with _guard():
        check_new_file(path, force=force)
        write_text(path, template_text())
    out.print(f"wrote {path}  (edit it, then `prune validate {path}` and `prune run {path}`)", highlight=False)


@app.command()
def validate(path: Annotated[Path, typer.Argument(help="The session file to check.")]) -> None:
    """Check a session file; exit 0 when valid, 2 with every problem listed when not."""
    import sessions
    from prune_core import preflight

    with _guard():
        s = sessions.load(path)
        preflight.check(s, source=str(path))  # the checks `prune run` makes before any work
    out.print(f"{path}: valid (session {s.session.name!r}, model {s.model.id}, {s.importance.method}, "
              f"ratio {s.pruning.ratio})", highlight=False)


@app.command()
def plan(
    session_file: Annotated[Path, typer.Argument(metavar="SESSION", help="The session .toml to plan for.")],
    model: Annotated[str | None, typer.Option("--model", help="Plan this model (built-in key, hub id or local "
                                                              "folder) instead of the session's.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default [data] seq_len).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Windows per batch (default [data] "
                                                                        "batch_size).")] = None,
    json_mode: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    """Memory each importance method needs for the session's model (read from its config only, no weights):
    weights, gradients, Σg / Fisher buffers, activations with and without checkpointing, and what fits here."""
    import sessions
    from prune_core import memplan, memplan_text

    with _guard():
        session = sessions.load(session_file)
        for flag, value in (("--seq-len", seq_len), ("--batch-size", batch_size)):
            if value is not None and value < (2 if flag == "--seq-len" else 1):
                raise BadInput(f"{flag} {value} is too small", f"pass {flag} {2 if flag == '--seq-len' else 1} or more")
        result = memplan.plan_for_session(session, model=model, seq_len=seq_len, batch_size=batch_size)
    if json_mode:
        typer.echo(memplan_text.to_json(result))
    else:
        out.print(memplan_text.render_text(result), markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- run
@app.command()
def run(
    session_file: Annotated[Path, typer.Argument(metavar="SESSION", help="The session .toml to run.")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder (default <output_dir>/<name>).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the stage cache and checkpoints.")] = False,
    json_mode: Annotated[bool, typer.Option("--json", help="Newline-delimited JSON events and a final summary.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background, immune to the terminal going "
                                                          "away; prints the results folder (with --json one JSON "
                                                          "object: results_dir, pid, log; see prune attach).")] = False,
) -> None:
    """Run a session headless: importance, allocation, surgery, evaluation, diagnosis, results folder."""
    import sessions
    from prune_core import pipeline

    if detach:
        _detach(session_file, out_dir, fresh, json_mode)
    with _guard():
        session = sessions.load(session_file)
    if not _main_rank(session):
        _follow(session, out_dir, fresh)
        return
    console = Console(stderr=json_mode)
    flag = StopFlag()
    renderer = make_renderer(console, json_mode, stop=flag)
    cmd = shlex.join(["prune", "run", str(session_file), *(["--out", str(out_dir)] if out_dir else [])])
    with _run_errors(renderer, flag, cmd), stop_on_signals(flag):
        report = pipeline.run(session, out_dir=out_dir, fresh=fresh, on_event=renderer, should_stop=flag,
                              session_file=session_file)
    _print_report(report, json_mode)


def _main_rank(session: Any) -> bool:
    """Join torch.distributed when launched by torchrun / accelerate launch / srun; True on rank 0 (or alone)."""
    from prune_core import distributed

    with _guard():
        return distributed.setup(session.model.device).is_main


def _follow(session: Any, out_dir: Path | None, fresh: bool) -> None:
    """A rank other than 0 shares the passes and stays quiet: rank 0 reports; only its own errors are shown."""
    from prune_core import distributed, pipeline

    flag = StopFlag()
    rank = distributed.world().rank
    try:
        with stop_on_signals(flag):
            pipeline.run(session, out_dir=out_dir, fresh=fresh, should_stop=flag)
    except Interrupted:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PruneError as exc:
        if exc.message.startswith("rank 0 stopped"):  # rank 0 shows it
            raise typer.Exit(EXIT_BAD_INPUT if isinstance(exc, BadInput) else EXIT_FAILED) from None
        raise fail(type(exc)(f"rank {rank}: {exc.message}", exc.fix),
                   EXIT_BAD_INPUT if isinstance(exc, BadInput) else EXIT_FAILED) from None


def _detach(session_file: Path, out_dir: Path | None, fresh: bool, json_mode: bool) -> None:
    try:
        code = runs_cmd.detach(session_file, out_dir, fresh, out, json_mode=json_mode)
    except FolderLocked as exc:
        raise fail(exc, EXIT_LOCKED) from None
    except BadInput as exc:
        raise fail(exc, EXIT_BAD_INPUT) from None
    raise typer.Exit(code)


def _print_report(report: Any, json_mode: bool) -> None:
    summary = run_summary(report)
    if json_mode:
        JsonRenderer().emit(summary)
    else:
        print_summary(out, summary)


@contextlib.contextmanager
def _run_errors(renderer: Any, flag: StopFlag, cmd: str) -> Iterator[None]:
    """Map what a pipeline run raises to the documented exit codes (the renderer is always closed); with
    --json the last line on stdout is the end event, as in events.ndjson (run_interrupted / run_failed)."""
    try:
        yield
    except Interrupted as exc:
        _end_event(renderer, "run_interrupted", exc.message)
        renderer.close()
        why = f" ({stop_cause(flag.signal_name)})" if flag.signal_name else ""
        raise fail(Interrupted(f"{exc.message}{why}; finished stages and checkpointed passes are kept",
                               f"run `{cmd}` again to resume from them"), EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        _end_event(renderer, "run_interrupted", "stopped at once; the last periodic checkpoint is kept")
        renderer.close()
        raise fail(Interrupted("stopped at once (Ctrl-C pressed again); the last periodic checkpoint is kept",
                               f"run `{cmd}` again to resume"), EXIT_INTERRUPTED) from None
    except typer.Exit:
        renderer.close()
        raise
    except Exception as exc:
        _end_event(renderer, "run_failed", getattr(exc, "message", None) or str(exc) or type(exc).__name__)
        renderer.close()
        code = EXIT_LOCKED if isinstance(exc, FolderLocked) else EXIT_BAD_INPUT if isinstance(exc, BadInput) else EXIT_FAILED
        raise fail(exc, code) from None
    renderer.close()


def _end_event(renderer: Any, kind: str, message: str) -> None:
    from prune_core.eventlog import end_record

    if isinstance(renderer, JsonRenderer):
        renderer.emit(end_record(kind, message))


@app.command()
def tune(
    session_file: Annotated[Path, typer.Argument(metavar="SESSION", help="The session .toml to tune.")],
    budget: Annotated[float, typer.Option("--budget", help="Seconds for the search (after the importance pass).")] = 60.0,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder (default <output_dir>/<name>).")] = None,
    corrections: Annotated[bool, typer.Option("--corrections/--no-corrections",
                                              help="Also try block/layer correction T and tau (measures block losses once).")] = True,
    json_mode: Annotated[bool, typer.Option("--json", help="Print the trials as JSON.")] = False,
) -> None:
    """Search the cheap knobs (normalization, T/tau, rate limits, protected layers, attention weight) by the
    proxy loss; write the best session as SESSION-tuned.toml (SESSION-tuned2.toml, … when that file exists:
    an earlier one is never overwritten; the file written is named at the end) and the trials to <results>/tune/."""
    import sessions
    from prune_core.tune import tune as run_tune
    from prune_core.tune import write_tune

    with _guard():
        session = sessions.load(session_file)
    renderer = make_renderer(Console(stderr=True), False)
    flag = StopFlag()
    cmd = shlex.join(["prune", "tune", str(session_file), *(["--budget", f"{budget:g}"] if budget != 60.0 else []),
                      *(["--out", str(out_dir)] if out_dir else []), *([] if corrections else ["--no-corrections"])])
    with _run_errors(renderer, flag, cmd), stop_on_signals(flag):
        result = run_tune(session, budget_s=budget, out_dir=out_dir, corrections=corrections,
                          on_event=renderer, should_stop=flag)
        paths = write_tune(result, session_file)
    if json_mode:
        typer.echo(json.dumps({**result.to_dict(), "session_file": str(paths["session"])}, indent=2, default=str))
        return
    table = Table(title=f"prune tune: {len(result.trials) - 1} trials in {result.seconds:.0f} s ({result.stopped})")
    for col in ("trial", "knob", "proxy", "achieved", "changes"):
        table.add_column(col, justify="right" if col in ("trial", "proxy", "achieved") else "left")
    for t in sorted(result.trials, key=lambda t: t.proxy)[:12]:
        changes = ", ".join(f"{k}={v}" for k, v in t.updates.items()) or "(start)"
        table.add_row(str(t.number), t.knob, f"{t.proxy:.4f}", f"{t.achieved_ratio:.1%}", changes)
    out.print(table)
    out.print(f"proxy loss {result.base_proxy:.4f} → {result.best_proxy:.4f}", highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"best session: {paths['session']}  (run it: prune run {paths['session']})", markup=False,
              highlight=False)
    out.print(f"all trials: {paths['csv']}", markup=False, highlight=False)


# ----------------------------------------------------------------------------- listings
@app.command()
def models(json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in models with their sizes and whether each is cached."""
    from prune_core.models import builtin_models

    rows = builtin_models()
    if json_mode:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Built-in models (any hub id, local folder or .gguf works too)")
    for col in ("key", "family", "parameters", "cached", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for r in rows:
        table.add_row(r["key"], str(r.get("family", "")), f"{int(r.get('parameters', 0)):,}",
                      "yes" if r.get("cached") else "no", str(r.get("description", "")))
    out.print(table)


@app.command()
def datasets(json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the calibration and evaluation text sources."""
    from prune_core.data import dataset_names

    rows = dataset_names()
    if json_mode:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Datasets (or a local .txt, .jsonl, .parquet file or save_to_disk folder)")
    for col in ("key", "kind", "cached", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"], str(r.get("kind", "")), "yes" if r.get("cached") else "no", str(r.get("description", "")))
    out.print(table)


# ----------------------------------------------------------------------------- results
@app.command()
def show(
    results: Annotated[Path, typer.Argument(help="A results folder.")],
    charts: Annotated[bool, typer.Option("--charts", help="Draw the gradient charts in the terminal.")] = False,
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Summarize a finished run (and draw its gradient charts with --charts)."""
    from prune_core.report import RunReport

    with _guard():
        report = RunReport.read(results)
        obj = run_summary(report)
        if json_mode:
            typer.echo(json.dumps(obj, indent=2, default=str))
            return
        print_summary(out, obj)
        print_findings(out, list(report.findings), results, report=report)
        if charts:
            from cli.charts import render_results_charts

            out.print(render_results_charts(report), markup=False, highlight=False)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help="A saved pruned model folder (results/model).")],
    dataset: Annotated[str | None, typer.Option(help="Held-out text (default: the run's [evaluation] dataset).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Window length (default: the run's [evaluation] seq_len, "
                                                     "else 512).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens to evaluate (default: the run's [evaluation] "
                                                        "max_tokens, else 32768).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "auto",
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Comma-separated lm-eval tasks (arc_easy,hellaswag,…): task accuracy through lm-eval "
                        "instead of perplexity.")] = None,
    include_path: Annotated[Path | None, typer.Option(
        "--include-path", help="A folder of your own lm-eval task YAMLs (with --tasks).")] = None,
    limit: Annotated[float | None, typer.Option(
        help="Samples per task (or a fraction below 1), for a quick look (with --tasks).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(
        "--num-fewshot", help="Few-shot examples per question (default: the task's own, usually 0).")] = None,
    batch_size: Annotated[str | None, typer.Option(
        "--batch-size", help="lm-eval batch size: a number or auto (with --tasks; default 1).")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Also write the result as JSON to this file.")] = None,
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Perplexity of a saved pruned model on a held-out split (the pipeline's evaluation stages), with the
    [evaluation] settings of the run it comes from unless given here; or with --tasks its accuracy on lm-eval
    tasks (written to <results>/zeroshot.json inside a results folder)."""
    import tempfile

    from cli import eval_cmd
    from prune_core import pipeline
    from prune_core.report import is_results_folder, verify_manifest
    from sessions import Session

    if tasks is not None:
        _eval_tasks(ctx, model_dir, tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                    batch_size=batch_size, device=device, out_file=out_file, json_mode=json_mode)
        return
    try:
        given = [f"--{name.replace('_', '-')}" for name in ("include_path", "limit", "num_fewshot", "batch_size")
                 if ctx.params.get(name) is not None]
        if given:
            raise BadInput(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to task evaluation",
                           "add --tasks (e.g. --tasks arc_easy), or leave them out for perplexity")
        if not (model_dir / "pruning.json").is_file():
            raise BadInput(f"{model_dir} is not a saved pruned model (no pruning.json)",
                           "pass the model/ folder of a results folder")
        try:
            info = json.loads((model_dir / "pruning.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BadInput(f"{model_dir / 'pruning.json'} is not valid JSON ({exc})",
                           "save the model again with `prune run`") from None
        if not isinstance(info, dict):
            raise BadInput(f"{model_dir / 'pruning.json'} is not a pruning recipe (a JSON object)",
                           "save the model again with `prune run`")
        parent = model_dir.resolve().parent
        in_results = is_results_folder(parent)
        if in_results:  # a damaged results folder is refused, as by `show`
            verify_manifest(parent)
        settings = eval_cmd.eval_settings(eval_cmd.recorded_evaluation(model_dir, info, in_results),
                                          dataset=dataset, seq_len=seq_len, max_tokens=max_tokens)
        session = Session().with_updates({
            "session.name": "eval", "model.id": str(model_dir), "model.device": device,
            "evaluation.dataset": settings.dataset, "evaluation.seq_len": settings.seq_len,
            "evaluation.max_tokens": settings.max_tokens, "evaluation.before": True, "evaluation.after": False,
        })
    except BadInput as exc:
        raise fail(exc, EXIT_BAD_INPUT) from None
    except OSError as exc:
        raise fail(BadInput(f"cannot read {model_dir / 'pruning.json'} ({exc.strerror})",
                            "check the path and its permissions"), EXIT_BAD_INPUT) from None
    cmd = shlex.join(["prune", "eval", str(model_dir), *(["--dataset", dataset] if dataset else []),
                      *(["--seq-len", str(seq_len)] if seq_len is not None else []),
                      *(["--max-tokens", str(max_tokens)] if max_tokens is not None else []),
                      *(["--device", device] if device != "auto" else [])])
    renderer = make_renderer(Console(stderr=True), False)  # progress on stderr; stdout holds the result
    flag = StopFlag()
    with tempfile.TemporaryDirectory(prefix="prune-eval-") as tmp:
        # the evaluation is cached in the results folder the model belongs to (nowhere else)
        where = parent if in_results else Path(tmp)
        shown = eval_cmd.relabeled(renderer, f"perplexity of {model_dir} on {settings.dataset} (seq_len "
                                             f"{settings.seq_len}, up to {settings.max_tokens:,} tokens)")
        with _run_errors(renderer, flag, cmd), stop_on_signals(flag):
            report = pipeline.run(session, out_dir=where, until="eval_before", write=False,
                                  on_event=shown, should_stop=flag)
    result = {**report.perplexity["before"], "model_dir": str(model_dir)}
    if out_file is not None:
        from prune_core.atomic import write_json

        with _guard():
            write_json(out_file, result)
    if json_mode:
        typer.echo(json.dumps(result, indent=2))
    else:
        out.print(f"perplexity {result['ppl']:.3f} on {settings.dataset} ({result['tokens']:,} tokens, "
                  f"seq_len {settings.seq_len})", highlight=False)
        if out_file is not None:
            out.print(f"wrote {out_file}", highlight=False)


def _eval_tasks(ctx: typer.Context, model_dir: Path, tasks: str, *, include_path: Path | None,
                limit: float | None, num_fewshot: int | None, batch_size: str | None, device: str,
                out_file: Path | None, json_mode: bool) -> None:
    """`prune eval MODEL_DIR --tasks …`: lm-eval task accuracy (prune_core/zeroshot.py)."""
    from prune_core import zeroshot
    from prune_core.report import is_results_folder

    def say(message: str) -> None:
        err.print(message, style="dim", highlight=False)

    with _guard():
        # typer vendors click: compare the source by name, not with click's own enum
        ppl_only = [f"--{name.replace('_', '-')}" for name in ("dataset", "seq_len", "max_tokens")
                    if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if ppl_only:
            raise BadInput(f"{', '.join(ppl_only)} only appl{'y' if len(ppl_only) > 1 else 'ies'} to perplexity, "
                           "not to --tasks",
                           "leave them out, or run `prune eval` without --tasks for perplexity")
        if not (model_dir / "pruning.json").is_file():
            raise BadInput(f"{model_dir} is not a saved pruned model (no pruning.json)",
                           "pass the model/ folder of a results folder")
        summary = zeroshot.run(model_dir, zeroshot.parse_tasks(tasks), include_path=include_path, device=device,
                               batch_size=batch_size or "1", limit=limit, num_fewshot=num_fewshot, say=say,
                               verbose=state["debug"])
        written: list[str] = []
        parent = model_dir.resolve().parent
        if is_results_folder(parent):
            written.append(str(zeroshot.write_results(parent / zeroshot.RESULTS_FILE, summary, merge=True)))
        if out_file is not None:
            written.append(str(zeroshot.write_results(out_file, summary)))
    if json_mode:
        typer.echo(json.dumps({**summary, "written": written}, indent=2))
        return
    table = Table(title=f"lm-eval {summary['lm_eval_version']} on {model_dir}")
    for col in ("task", "metric", "value", "± stderr", "samples"):
        table.add_column(col, justify="right" if col in ("value", "± stderr") else "left")

    def num(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, int | float) else str(value if value is not None else "")

    for task, metric, value, stderr, count in zeroshot.rows(summary):
        table.add_row(task, metric, num(value), num(stderr), count)
    out.print(table)
    for path in written:
        out.print(f"wrote {path}", highlight=False)


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(metavar="RESULTS_OR_MODEL_DIR",
                                           help="A results folder or its saved model/ folder.")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="The folder to write (required).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="hf: a plain Hugging Face folder (uniform widths only); "
                                                      "gguf: one .gguf file for llama.cpp (llama models).")] = "hf",
    gguf_dtype: Annotated[str, typer.Option("--dtype", help="--format gguf only: f32 or f16 tensors.")] = "f32",
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="Load the written folder back and compare logits (needs memory "
                                              "for a second copy of the model).")] = True,
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write a pruned model in a format other tools load: --format hf gives a folder that
    transformers.AutoModelForCausalLM.from_pretrained reads without prune (when every layer has the same widths)."""
    from prune_core import hf_export

    def say(message: str) -> None:
        err.print(message, style="dim", highlight=False)

    with _guard():
        kind = fmt.strip().lower()
        if kind == "gguf":
            from prune_core import gguf_export

            if out_dir is None:
                raise BadInput("prune export --format gguf needs --out FILE.gguf",
                               "name the file to write, e.g. --out exported/model.gguf")
            gguf_result = gguf_export.export_gguf(source, out_dir, dtype=gguf_dtype, verify=verify, say=say)
        elif kind != "hf":
            raise BadInput(f"unknown --format {fmt!r}", "use --format hf or --format gguf")
        if out_dir is None:
            raise BadInput("prune export needs --out DIR", "name the folder to write, e.g. --out exported/my-model")
        if kind == "gguf":
            if json_mode:
                typer.echo(json.dumps(gguf_result.to_dict(), indent=2))
                return
            _print_gguf_export(gguf_result)
            return
        result = hf_export.export_hf(source, out_dir, verify=verify, say=say)
    if json_mode:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    sizes = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
    out.print(f"wrote {result.folder}: {result.architecture}, {result.parameters:,} parameters ({sizes})",
              highlight=False, soft_wrap=True)
    if result.zero_biases:
        out.print(f"  {len(result.zero_biases)} bias tensors written as zeros so the config can hold the "
                  "compensation biases", highlight=False, soft_wrap=True)
    if result.max_abs_logit_diff is not None:
        out.print(f"  checked: AutoModelForCausalLM.from_pretrained gives the pruned model's logits "
                  f"(max |difference| {result.max_abs_logit_diff:.3g})", highlight=False, soft_wrap=True)
    out.print(f"  load it with: AutoModelForCausalLM.from_pretrained({str(result.folder)!r})", highlight=False, soft_wrap=True)


@app.command()
def recover(
    results: Annotated[Path, typer.Argument(metavar="RESULTS", help="A results folder (its model/) or a saved pruned "
                                                                     "model folder.")],
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default [recovery] steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default [recovery] lr).")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (default [recovery] rank).")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default [recovery] alpha).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Windows per step.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Training text; its calibration split is used (default "
                                                     "[recovery] dataset, else [data] dataset).")] = None,
    checkpoint_seconds: Annotated[float | None, typer.Option("--checkpoint-seconds",
                                                             help="Checkpoint at most this often (0 = every step).")] = None,
    session_file: Annotated[Path | None, typer.Option("--session", help="Take [recovery], seed and [evaluation] from "
                                                                        "this session file instead of the run's.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Where the merged model goes "
                                                                     "(default RESULTS/recovered).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto (default: the session's).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore (and delete) an interrupted fine-tuning's "
                                                        "checkpoint.")] = False,
    json_mode: Annotated[bool, typer.Option("--json", help="Newline-delimited JSON events and the report.")] = False,
) -> None:
    """LoRA fine-tuning of a pruned model (recovery): merged model in RESULTS/recovered, perplexity before and
    after in RESULTS/recovery.json. Interrupted (Ctrl-C), it checkpoints; run it again to resume."""
    import sessions
    from prune_core import recovery

    with _guard():
        session = sessions.load(session_file) if session_file is not None else None
        recovery.locate(results, out_dir)  # bad folders exit 2 before anything loads
        if device is not None:
            from sessions.schema import ModelSection

            try:
                ModelSection(device=device)
            except ValueError:
                raise BadInput(f"{device!r} is not a device", "use auto, cpu, cuda, cuda:N or mps") from None
    console = Console(stderr=json_mode)
    flag = StopFlag()
    renderer = make_renderer(console, json_mode, stop=flag)
    given = {"--steps": steps, "--lr": lr, "--rank": rank, "--alpha": alpha, "--batch-size": batch_size,
             "--seq-len": seq_len, "--dataset": dataset, "--checkpoint-seconds": checkpoint_seconds,
             "--session": session_file, "--out": out_dir, "--device": device}
    cmd = shlex.join(["prune", "recover", str(results),
                      *[str(x) for k, v in given.items() if v is not None for x in (k, v)]])
    with _run_errors(renderer, flag, cmd), stop_on_signals(flag):
        result = recovery.recover(results, session=session, out=out_dir, fresh=fresh, device=device,
                                  on_event=renderer, should_stop=flag, steps=steps, lr=lr, rank=rank, alpha=alpha,
                                  batch_size=batch_size, seq_len=seq_len, dataset=dataset,
                                  checkpoint_seconds=checkpoint_seconds)
    if json_mode:
        JsonRenderer().emit({"kind": "recovery", **result.to_dict()})
        return
    out.print(result.summary(), highlight=False, soft_wrap=True)
    out.print(f"recovered model: {result.out_dir}  (evaluate it: prune eval {result.out_dir})", highlight=False,
              soft_wrap=True)
    out.print(f"report: {result.report_path}", highlight=False, soft_wrap=True)

def _print_gguf_export(result: Any) -> None:
    out.print(f"wrote {result.path}: GGUF {result.architecture} ({result.dtype}), {len(result.layers)} blocks, "
              f"{result.parameters:,} values in {result.tensors} tensors", highlight=False, soft_wrap=True)
    if result.dropped_layers:
        out.print(f"  left out layers {', '.join(map(str, result.dropped_layers))} (attention and MLP removed: "
                  "the identity)", highlight=False, soft_wrap=True)
    for check in result.checks:
        out.print(f"  {check}", highlight=False, soft_wrap=True)
    if result.max_abs_logit_diff is not None:
        out.print(f"  llama.cpp logits vs the pruned model's: max |difference| {result.max_abs_logit_diff:.3g}",
                  highlight=False, soft_wrap=True)
    out.print(f"  run it with: llama-cli -m {result.path}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="First results folder.")],
    b: Annotated[Path, typer.Argument(help="Second results folder.")],
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Two runs side by side: per-layer rates, overlap of the pruned sets (Jaccard), PPL."""
    from cli.compare_view import print_comparison
    from prune_core.compare import compare_results

    with _guard():
        cmp = compare_results(a, b)
        if json_mode:
            typer.echo(json.dumps(cmp, indent=2, default=str))
        else:
            print_comparison(out, cmp)


@app.command()
def fix(
    results: Annotated[Path, typer.Argument(help="A results folder.")],
    apply: Annotated[int | None, typer.Option("--apply", help="Apply finding N (1-based) and re-run.")] = None,
    json_mode: Annotated[bool, typer.Option("--json", help="Newline-delimited JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Apply a fix even when the proxy found it worse, and "
                                                        "overwrite an existing <name>-fixN.toml.")] = False,
) -> None:
    """List the diagnosis findings and their fixes; --apply N writes a fixed session <name>-fixN.toml next to
    the results folder and runs it into <name>-fixN/. An existing <name>-fixN.toml is never overwritten
    without --force."""
    from cli.fix_cmd import run_fix

    with _guard():
        code = run_fix(results, apply, json_mode, out, force=force)
    raise typer.Exit(code)


runs_cmd.register(app, fail)  # prune attach, prune ps


def main() -> Any:
    """The `prune` process: tune glibc malloc for the CPU passes (a process-wide choice the engine
    never makes; PRUNE_MALLOC_TUNING=0 opts out), then run the command or open the workbench."""
    from prune_core.importance.allocator import keep_freed_memory

    keep_freed_memory()
    return app()


if __name__ == "__main__":
    main()
