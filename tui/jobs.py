"""The workbench's engine jobs: each is one `pipeline.run(...)` (with the app's Memo) or `RunReport.read`.

Plain functions, no Textual: the app runs one at a time on its engine worker thread and posts the
value back as a `JobDone` message (or a `JobFailed`). Which stages a job needs is the pipeline's
business: a job only names where to stop (`until`) and whether the results folder is written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core.errors import BadInput, PruneError
from prune_core.events import EventSink
from sessions import Session
from tui.engine import ModelInfo, Pipeline, model_info


def printable(text: object) -> str:
    """Model output made safe to show: control characters (escape sequences!) become '�'."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in str(text))


@dataclass
class JobContext:
    """What a job needs from the app: the pipeline, its memo, the event sink and the stop flag."""

    pipeline: Pipeline
    memo: Any
    sink: EventSink
    should_stop: Callable[[], bool]
    out_dir: Path | None = None      # the results folder shown (None: the session's own folder)

    def run(self, session: Session, **kw: Any) -> Any:
        kw.setdefault("out_dir", self.out_dir)
        return self.pipeline.run(session, memo=self.memo, on_event=self.sink, should_stop=self.should_stop, **kw)


def run_session(ctx: JobContext, session: Session, *, fresh: bool = False) -> Any:
    """The whole session, writing exactly what `prune run` writes (a resume is the same call)."""
    return ctx.run(session, out_dir=None, fresh=fresh)


def reallocate(ctx: JobContext, session: Session) -> Any:
    """A what-if or an applied fix: allocation and diagnosis for the changed session, nothing written."""
    return ctx.run(session, until="diagnosis", write=False)


def tune_knobs(ctx: JobContext, session: Session, budget_s: float = 60.0) -> tuple[Any, Session, str]:
    """`prune tune` on the app's memo, then the best session's allocation (a what-if, nothing written)."""
    from prune_core.tune import tune

    result = tune(session, budget_s=budget_s, out_dir=ctx.out_dir, memo=ctx.memo, on_event=ctx.sink,
                  should_stop=ctx.should_stop)
    report = reallocate(ctx, result.best)
    changes = ", ".join(f"{k} = {v!r}" for k, v in result.best_updates.items()) or "no change"
    saves = " (applied to the session: ctrl+s saves it)" if result.best_updates else ""
    reason = (f"tune ({len(result.trials) - 1} trials): proxy loss {result.base_proxy:.4f} → "
              f"{result.best_proxy:.4f} with {changes}{saves}")
    return report, result.best, reason


def evaluate(ctx: JobContext, session: Session) -> Any:
    """Perplexity before and after pruning (cached under the results folder's state/)."""
    both = session.with_updates({"evaluation.before": True, "evaluation.after": True})
    return ctx.run(both, write=False)  # every stage (eval_before is no dependency of eval_after), nothing written


def save_model(ctx: JobContext, session: Session) -> tuple[Any, Path, bool]:
    """The pruned model of `session` saved with results that describe it: (report, folder, new folder?).

    The session the results folder holds: its model alone is saved into `model/` (the run's metrics and
    log stay). A what-if (another session): a whole new results folder beside it, `<name>-whatif<k>`
    (model, metrics, session.toml), so the folder's own results are never paired with another model.
    """
    wanted = session.with_updates({"output.save_model": True})
    folder = Path(ctx.out_dir or ctx.pipeline.results_dir_for(session))
    whatifs = (folder.parent / f"{folder.name}-whatif{k}" for k in range(1, 10_000))
    for target in itertools.chain([folder], whatifs):
        written = _written_session(ctx, target)
        if written is None and target.exists() and target != folder:
            continue  # something else is there: leave it alone
        if written is None:  # a new folder (or the run's own, not written yet): the whole results
            return ctx.run(wanted, out_dir=target, write=True), target, target != folder
        if written.same_model(wanted):  # the folder holds this session: its model alone
            return ctx.run(wanted, out_dir=target, until="save_model", write=True), target, target != folder
    raise BadInput(f"no free what-if folder next to {folder}", "remove old <name>-whatif<k> folders")


def _written_session(ctx: JobContext, folder: Path) -> Session | None:
    try:
        return ctx.pipeline.read(folder).session
    except (PruneError, OSError):  # no results there (or unreadable)
        return None


def recover(ctx: JobContext, session: Session, *, fresh: bool = False) -> Any:
    """`prune recover` on the results folder shown: LoRA fine-tuning with the session's [recovery] settings,
    the merged model in `recovered/`, perplexity before/after in `recovery.json` (a RecoveryResult)."""
    from prune_core.recovery import recover as run_recovery

    folder = ctx.out_dir or ctx.pipeline.results_dir_for(session)
    return run_recovery(folder, session=session, fresh=fresh, on_event=ctx.sink, should_stop=ctx.should_stop)


def sample(ctx: JobContext, session: Session, prompt: str) -> tuple[str, str]:
    """A short text from the original and the pruned model (both from the memo after the surgery stage,
    or the distill stage when the session distils)."""
    final = "distill" if session.distill.steps else "surgery"
    ctx.run(session, until=final, write=False)
    original = ctx.pipeline.loaded(ctx.memo, "model")
    pruned = ctx.pipeline.loaded(ctx.memo, final)
    tokenizer = original.tokenizer
    return (printable(ctx.pipeline.generate(original.model, tokenizer, prompt)),
            printable(ctx.pipeline.generate(pruned.model, tokenizer, prompt)))


def inspect(ctx: JobContext, session: Session) -> ModelInfo:
    """The Model step's facts: the pipeline's model stage (kept in the memo, so the run reuses it).

    Only the [model] settings are used, so other set-up values cannot make the inspection fail.
    """
    probe = Session().with_updates({f"model.{k}": v for k, v in session.model.model_dump().items()})
    ctx.run(probe, until="model", write=False)
    return model_info(session.model.id, ctx.pipeline.loaded(ctx.memo, "model"))


def look_for_results(pipeline: Pipeline, session: Session) -> tuple[bool, Any]:
    """(an interrupted pass can be resumed, the report of the session's finished results folder or None)."""
    from tui.engine import is_results_folder

    has = bool(pipeline.has_checkpoint(session))
    folder = pipeline.results_dir_for(session)
    return has, (pipeline.read(folder) if not has and is_results_folder(folder) else None)


def follow(ctx: JobContext, folder: Path, leave: Callable[[], bool], poll_s: float = 0.2) -> tuple[str, str]:
    """Replay and follow the event log of the run another process writes into `folder`.

    Every logged event goes to the app's sink, as if this process ran it. The app's stop flag asks
    that run to stop after its current batch (checkpointed); `leave()` ends the following only.
    Returns how it ended: ("run_done" | "run_interrupted" | "run_failed" | "gone" | "left", message).
    """
    import time

    from prune_core import eventlog, lock

    offset, asked, quiet = 0, False, 0.0
    while True:
        objs, offset = eventlog.read_lines(folder, offset)
        for obj in objs:
            kind = str(obj.get("kind"))
            event = eventlog.from_dict(obj)
            if event is not None:
                ctx.sink(event)
            if kind in eventlog.END_KINDS:
                return kind, str(obj.get("message", "finished"))
        if leave():
            return "left", "stopped following; the run goes on"
        if ctx.should_stop() and not asked:
            asked = True
            lock.request_stop(folder)
        if objs:
            quiet = 0.0
        elif lock.holder(folder) is None:
            quiet = quiet or time.monotonic()
            if time.monotonic() - quiet > 1.0:
                return "gone", "the run is no longer running and its log has no end record (killed?)"
        time.sleep(poll_s)
