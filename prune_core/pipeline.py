"""The one pipeline: every stage declared once, run in order, recomputed only when its inputs change.

    model ─▶ calibration ─▶ importance ─▶ block_losses (T or tau ≠ 0) ─▶ allocation ─▶ proxy_base ─▶ proxy
          ─▶ diagnosis (fixes scored by the proxy) ─▶ eval_data ─▶ eval_before ─▶ surgery (+ bias | reconstruct)
          ─▶ distill ─▶ proxy_final (the proxy of the model handed on) ─▶ eval_after ─▶ save_model
          ─▶ save (the results folder, `RunReport.write`)

A stage is data (`Stage`): its name, the upstream stages it reads, the session keys that enter its
cache key, the function that computes it (`steps.py`) and, for expensive ones, how its value is saved
and loaded under `state/` (`cache.py`). `run(session, until=…, memo=…)` is the only entry point:
`prune run`, `prune fix`, `prune eval`, `prune tune`, every TUI action and a what-if are calls of it.
A stage's key is a hash of its session keys and its upstream stages' identities, so a what-if that
changes only `[pruning]` reuses everything upstream of allocation (from the in-memory `Memo`, or
from the disk cache in another process), and one that changes `[correction] temperature` computes the
block losses only — announced first by a `StagePlan` event and a `Notice` with the estimated time.

Under torchrun / accelerate launch / srun (`distributed.py`) the stages that read calibration batches
in a collective way (`_collective`: importance, block_losses, and surgery when it reconstructs) are
shared by all ranks. Rank 0 runs the pipeline as always (lock, preflight, stage cache, checkpoints,
event log, results folder) and, at each of those stages, tells the other ranks whether it computes it
or reuses it (or that it stopped: they raise the same error). The other ranks (`_follow`) load the
model and the calibration windows themselves, take part in the passes rank 0 computes, write nothing,
report nothing, and return after the last collective stage. Every other stage (proxy, diagnosis,
evaluation, surgery without reconstruction, save) runs on rank 0 alone, with the world released
(`distributed.release`) until the next collective stage; a reconstructing surgery is computed by every
rank (rank 0 broadcasts the allocation's groups, `steps.compute_surgery`), then rank 0 goes on alone
with the pruned model.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core import distributed, eventlog, lock, preflight, steps
from prune_core.cache import StageCache, stage_key, state_dir
from prune_core.errors import BadInput, Interrupted
from prune_core.events import Event, EventSink, Notice, RunDone, StageDone, StagePlan, StageStarted, null_sink
from prune_core.provenance import now_iso
from prune_core.report import RunReport, commit_model, prepare_folder
from prune_core.run_record import RunRecord, build_report
from prune_core.steps import Ctx
from prune_core.verify import Trial
from sessions import Session


# ---------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    compute: Callable[[Ctx], Any]
    deps: tuple[str, ...] = ()  # upstream stages read (their identities enter the key when they ran)
    keys: tuple[str, ...] = ()  # session keys ("section" or "section.key") that enter the key
    enabled: Callable[[Session, bool], bool] = lambda s, write: True
    save: Callable[[Path, Any], None] | None = None  # persisted stages: state/<name>/<key>/
    load: Callable[[Path], Any] | None = None
    identity: Callable[[Any], str] | None = None  # what downstream keys see (default: this stage's key)
    expensive: bool = False  # announced with an estimate before it recomputes in a what-if
    keep: int = 8  # values of this stage kept in a Memo (big ones: 1)


def _needs_block(s: Session, write: bool) -> bool:
    return s.correction.temperature != 0.0 or s.correction.tau != 0.0


def _proxy_on(s: Session, write: bool) -> bool:
    return s.data.proxy_samples > 0


def _eval_any(s: Session, write: bool) -> bool:
    return s.evaluation.before or s.evaluation.after


def _needs_surgery(s: Session, write: bool) -> bool:
    return s.evaluation.after or (write and s.output.save_model)


ALLOCATION_KEYS = ("normalization", "correction.temperature", "correction.tau", "pruning.ratio",
                   "pruning.min_rate", "pruning.max_rate", "pruning.protect_layers", "pruning.early_layers",
                   "pruning.early_max_rate", "pruning.depth_weight", "pruning.attention_weight",
                   "pruning.blocks", "pruning.allocation", "pruning.depth_ramp",
                   "pruning.global_share")

# every [distill] setting but checkpoint_seconds (how often a checkpoint is written changes no result)
DISTILL_KEYS = ("distill.steps", "distill.lr", "distill.batch_size", "distill.train", "distill.ce_weight",
                "distill.ce_windows", "session.seed")

STAGES: tuple[Stage, ...] = (
    Stage("model", "load the model", steps.load_model,
          keys=("model.id", "model.revision", "model.dtype", "model.device", "model.trust_remote_code"),
          identity=steps.model_identity, keep=1),
    Stage("calibration", "calibration windows", steps.load_calibration, deps=("model",),
          keys=("data.dataset", "data.num_samples", "data.seq_len", "data.proxy_samples", "data.generated_samples",
                "session.seed"),
          identity=lambda c: c.fingerprint, keep=2),
    Stage("importance", "importance pass", steps.compute_importance, deps=("model", "calibration"),
          keys=("importance.method", "importance.aggregation", "importance.fisher_scale", "importance.stats_sample",
                "importance.stats_every",
                "data.batch_size"),
          save=steps.save_importance, load=steps.load_importance, expensive=True, keep=2),
    Stage("block_losses", "loss increase per skipped block and layer", steps.compute_block_losses,
          deps=("model",), keys=("data.dataset", "correction.samples", "correction.seq_len", "session.seed",
                                 "data.batch_size"),
          enabled=_needs_block, save=steps.save_json_value, load=steps.load_block_losses, expensive=True),
    Stage("allocation", "correction, normalization and global selection", steps.compute_allocation,
          deps=("model", "importance", "block_losses"), keys=ALLOCATION_KEYS, keep=16),
    Stage("proxy_base", "dense loss on the held-out calibration windows", steps.compute_proxy_base,
          deps=("model", "calibration"), enabled=_proxy_on, save=steps.save_json_value, load=steps.load_json_value),
    Stage("proxy", "proxy loss of the allocation", steps.compute_proxy, deps=("model", "calibration", "allocation",
                                                                              "proxy_base"),
          enabled=_proxy_on, keep=64),
    Stage("diagnosis", "extreme-pruning diagnosis, fixes scored by the proxy", steps.compute_diagnosis,
          deps=("importance", "allocation", "proxy"), keys=("diagnosis",)),
    Stage("eval_data", "held-out evaluation tokens", steps.load_eval_data, deps=("model",),
          keys=("evaluation.dataset", "data.dataset", "evaluation.max_tokens"), enabled=_eval_any, keep=1),
    Stage("eval_before", "perplexity before pruning", steps.eval_before, deps=("model", "eval_data"),
          keys=("evaluation.seq_len",), enabled=lambda s, w: s.evaluation.before,
          save=steps.save_json_value, load=steps.load_json_value, expensive=True),
    Stage("surgery", "remove pruned heads and channels, compensate", steps.compute_surgery,
          deps=("model", "calibration", "importance", "allocation"), keys=("pruning.compensate", "pruning.ridge",
                                                                           "pruning.error_feedback"),
          enabled=_needs_surgery, keep=1),
    Stage("distill", "distil the dense model's predictions into the pruned one", steps.compute_distill,
          deps=("model", "calibration", "surgery"), keys=DISTILL_KEYS,
          enabled=lambda s, w: _needs_surgery(s, w) and s.distill.steps > 0, expensive=True, keep=1),
    Stage("proxy_final", "proxy loss of the final model (after compensation and distillation)",
          steps.compute_proxy_final, deps=("model", "calibration", "surgery", "distill"),
          enabled=lambda s, w: _proxy_on(s, w) and _needs_surgery(s, w), keep=4),
    Stage("eval_after", "perplexity after pruning", steps.eval_after, deps=("surgery", "distill", "eval_data"),
          keys=("evaluation.seq_len",), enabled=lambda s, w: s.evaluation.after,
          save=steps.save_json_value, load=steps.load_json_value, expensive=True),
    Stage("save_model", "save the pruned model", steps.save_model, deps=("surgery", "distill"),
          enabled=lambda s, write: write and s.output.save_model, keep=1),
    Stage("save", "write the results folder", lambda ctx: None, deps=("allocation", "diagnosis"),
          enabled=lambda s, write: write),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


# ---------------------------------------------------------------------------------------------- memo
class Memo:
    """Stage values kept in memory between runs of one process: a what-if is a run with the memo."""

    def __init__(self) -> None:
        self._values: dict[str, OrderedDict[str, tuple[str, Any]]] = {}

    def get(self, stage: str, key: str) -> tuple[str, Any] | None:
        slot = self._values.get(stage)
        if slot is None or key not in slot:
            return None
        slot.move_to_end(key)
        return slot[key]

    def put(self, stage: str, key: str, identity: str, value: Any) -> None:
        slot = self._values.setdefault(stage, OrderedDict())
        slot[key] = (identity, value)
        slot.move_to_end(key)
        while len(slot) > _BY_NAME[stage].keep:
            slot.popitem(last=False)

    def drop(self, stage: str) -> None:
        self._values.pop(stage, None)

    def latest(self, stage: str) -> Any:
        """The most recently used value of `stage` (e.g. the loaded model), or None."""
        slot = self._values.get(stage)
        return next(reversed(slot.values()))[1] if slot else None

    def replace_latest(self, stage: str, value: Any) -> None:
        """Swap the most recent value of `stage` for `value` (same key): benchmarks' own baselines use it."""
        slot = self._values[stage]
        key = next(reversed(slot))
        slot[key] = (slot[key][0], value)

    def __contains__(self, stage: str) -> bool:
        return bool(self._values.get(stage))


# ---------------------------------------------------------------------------------------------- helpers
def results_dir_for(session: Session, out: Path | None = None) -> Path:
    """Where a session's results go: `--out DIR`, or `<output_dir>/<name>/`."""
    return Path(out) if out is not None else Path(session.session.output_dir) / session.session.name


def ensure_writable(results_dir: Path) -> None:
    if results_dir.exists() and not results_dir.is_dir():
        raise BadInput(f"results path {str(results_dir)!r} is a file", "choose another --out folder or session name")


def has_checkpoint(results_dir: Path) -> bool:
    """An interrupted pass of this results folder can be resumed."""
    return StageCache(state_dir(results_dir)).has_checkpoint()


def _session_value(session: Session, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    obj = getattr(session, section)
    if section == "evaluation" and key == "dataset":
        return session.eval_dataset
    return obj.model_dump(mode="json") if not key else getattr(obj, key)


def _selected(until: str | None) -> tuple[Stage, ...]:
    """Every stage (until=None), or `until` and the stages it needs, in the declared order."""
    if until is None:
        return STAGES
    if until not in _BY_NAME:
        raise BadInput(f"unknown stage {until!r}", f"use one of: {', '.join(STAGE_NAMES)}")
    needed, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_BY_NAME[name].deps)
    return tuple(s for s in STAGES if s.name in needed)


def _key(stage: Stage, session: Session, idents: dict[str, str]) -> str:
    return stage_key({"stage": stage.name,
                      "session": {k: _session_value(session, k) for k in stage.keys},
                      "deps": {d: idents[d] for d in stage.deps if d in idents}})


def _estimate(stage: Stage, session: Session, memo: Memo) -> float | None:
    """A rough time for an expensive stage: from this process's last pass when there is one."""
    mv = memo.latest("model")
    if mv is None:
        return None
    params = float(mv.facts.get("total_parameters", 0) or 0)
    flops = 2.0e10  # a modest CPU; a GPU is far faster, and an over-estimate is the safe side
    if stage.name == "importance":
        last = memo.latest("importance")
        tokens = session.data.num_samples * session.data.seq_len
        if last is not None and getattr(last, "tokens", 0):
            return float(last.seconds) * tokens / max(float(last.tokens), 1.0)
        return 6.0 * params * tokens / flops
    if stage.name == "block_losses":
        layers = float(mv.facts.get("layers", 1))
        return (3 * layers + 1) * 2.0 * params * session.correction.samples * session.correction.seq_len / flops
    if stage.name in ("eval_before", "eval_after"):
        return 2.0 * params * session.evaluation.max_tokens / flops
    return None


def plan(session: Session, memo: Memo | None = None, *, until: str | None = None, write: bool = False,
         results_dir: Path | None = None, fresh: bool = False) -> tuple[list[str], list[str]]:
    """(stages that will compute, stages reused) for a run with this memo, without running anything.

    A stage whose upstream will compute is assumed to compute too, unless the disk cache holds its key.
    """
    memo = memo or Memo()
    cache = StageCache(state_dir(results_dir)) if results_dir is not None else None
    idents: dict[str, str] = {}
    unknown: set[str] = set()
    compute, reused = [], []
    for stage in _selected(until):
        if not stage.enabled(session, write):
            continue
        if any(d in unknown for d in stage.deps):
            unknown.add(stage.name)
            compute.append(stage.name)
            continue
        key = _key(stage, session, idents)
        hit = None if fresh else memo.get(stage.name, key)
        if hit is not None:
            idents[stage.name] = hit[0]
            reused.append(stage.name)
        elif not fresh and cache is not None and stage.load is not None and cache.has(stage.name, key):
            idents[stage.name] = key
            reused.append(stage.name)
        else:
            unknown.add(stage.name)
            compute.append(stage.name)
    return compute, reused


# ---------------------------------------------------------------------------------------------- ranks
COLLECTIVE = ("importance", "block_losses")  # stages every rank takes part in (their passes all-reduce)


def _is_collective(stage: str, session: Session) -> bool:
    """Every rank takes part in this stage: a COLLECTIVE one, or a surgery that reconstructs (its Gram
    sums are all-reduced, `compensation/reconstruct.py`)."""
    return stage in COLLECTIVE or (stage == "surgery" and session.pruning.compensate == "reconstruct")


class _Lead:
    """Rank 0's side of a run shared by several ranks: tells the others what it does at each collective
    stage, and that it stopped when it fails before the last one. Inactive (does nothing) otherwise."""

    def __init__(self, world: distributed.World, pending: list[str]) -> None:
        self.world, self.pending = world, pending
        self.inside = False  # inside an announced stage: the others fail or stop with this rank

    def before(self, stage: str, computing: bool) -> None:
        if stage in self.pending:
            distributed.rejoin()
            distributed.announce(self.world, "compute" if computing else "skip")
            self.inside = True

    def after(self, stage: str) -> None:
        """The stage is over: rank 0 runs alone (no collective calls) until the next collective stage."""
        if stage in self.pending:
            self.pending.remove(stage)
            self.inside = False
            distributed.release()

    def abort(self, exc: BaseException) -> None:
        if self.pending and not self.inside:
            self.pending.clear()
            distributed.announce(self.world, "abort", exc)
            distributed.release()


_LEAD = _Lead(distributed.World(), [])


def _collective(session: Session, until: str | None, write: bool) -> list[str]:
    return [s.name for s in _selected(until) if s.enabled(session, write) and _is_collective(s.name, session)]


def _follow(session: Session, world: distributed.World, *, write: bool, until: str | None = None,
            should_stop: Callable[[], bool] | None = None, **_: Any) -> RunReport:
    """A rank other than 0: the model and windows, then each collective stage rank 0 computes; no writes."""
    started = now_iso()
    todo = _collective(session, until, write)
    values: dict[str, Any] = {}
    stop = should_stop or (lambda: False)

    def ctx(stage: str) -> Ctx:
        return Ctx(session=session, stage=stage, key="", values=values, results_dir=None, checkpoint_dir=None,
                   on_event=null_sink, should_stop=stop, in_place=True)

    try:
        if todo:
            values["model"] = steps.load_model(ctx("model"))
        if "importance" in todo or "surgery" in todo:
            values["calibration"] = steps.load_calibration(ctx("calibration"))
        for name in todo:
            if distributed.follow(world):
                values[name] = _BY_NAME[name].compute(ctx(name))
    finally:
        distributed.release()
    return build_report(session, RunRecord(), None, started)


# ---------------------------------------------------------------------------------------------- run
def _guarded(fn: Callable[..., RunReport]) -> Callable[..., RunReport]:
    """A writing run holds its results folder's lock (`lock.py`) and logs every event (`eventlog.py`)."""

    @functools.wraps(fn)
    def run_locked(session: Session, *, out_dir: Path | None = None, write: bool = True,
                   on_event: EventSink = null_sink, session_file: Path | None = None, **kw: Any) -> RunReport:
        global _LEAD
        world = distributed.setup(session.model.device)
        if world.active and not world.is_main:  # rank 0 holds the lock and writes; this rank follows it
            return _follow(session, world, write=write, **kw)
        outer, _LEAD = _LEAD, _Lead(world, _collective(session, kw.get("until"), write) if world.active else [])
        try:
            preflight.before_run(session, results_dir_for(session, out_dir), write=write)  # nothing written on exit 2
            if not write:
                return fn(session, out_dir=out_dir, write=write, on_event=on_event, **kw)
            folder = results_dir_for(session, out_dir)
            ensure_writable(folder)
            partial = kw.get("until") not in (None, "save")  # e.g. the model alone: the run's log stays
            with lock.hold(folder, on_event=on_event, session_file=session_file), \
                    eventlog.tee(folder, on_event, append=partial) as logged:
                return fn(session, out_dir=out_dir, write=write, on_event=logged, **kw)
        except BaseException as exc:
            _LEAD.abort(exc)
            raise
        finally:
            _LEAD = outer

    return run_locked


@_guarded
def run(
    session: Session,
    *,
    out_dir: Path | None = None,
    until: str | None = None,
    memo: Memo | None = None,
    fresh: bool = False,
    write: bool = True,
    on_event: EventSink = null_sink,
    should_stop: Callable[[], bool] | None = None,
    session_file: Path | None = None,
) -> RunReport:
    """Run the declared stages of `session` in order (up to `until`) and return the run's report.

    Stages whose key is in `memo` (this process) or in the results folder's stage cache are reused;
    `fresh` recomputes everything. Without a `memo` the run owns the model and prunes it in place;
    with one, surgery works on a copy so the memo stays usable for further what-ifs. `write` writes
    the results folder (and the model when `[output] save_model`); a what-if passes `write=False`.
    A writing run holds the folder's lock (`lock.FolderLocked` when another run has it) and logs
    every event to `<results>/events.ndjson` (`_guarded`); `session_file`, the file `session` was read
    from, is recorded in the lock so that `prune attach` and the workbench can load it.
    """
    results_dir = results_dir_for(session, out_dir)
    ensure_writable(results_dir)
    own = memo is None
    memo = Memo() if memo is None else memo
    stop = should_stop or (lambda: False)
    started = now_iso()
    cache = StageCache(state_dir(results_dir))
    record = RunRecord()
    idents: dict[str, str] = {}
    selected = [s for s in _selected(until) if s.enabled(session, write)]

    if write:  # finish an interrupted swap of the results folder; drop what an interrupted run staged
        prepare_folder(results_dir)
    compute, reused = plan(session, memo, until=until, write=write, results_dir=results_dir, fresh=fresh)
    estimates = {n: e for n in compute if _BY_NAME[n].expensive
                 and (e := _estimate(_BY_NAME[n], session, memo)) is not None}
    on_event(StagePlan(recompute=tuple(compute), estimates=estimates, reused=tuple(reused)))
    announced = [n for n in compute if _BY_NAME[n].expensive]
    if announced and reused:
        parts = [f"{n} (~{_fmt_seconds(estimates[n])})" if n in estimates else n for n in announced]
        on_event(Notice(f"will compute: {', '.join(parts)}", level="info", stage=announced[0]))

    def try_fix(fixed: Session) -> Trial | None:
        """The proxy loss and achieved ratio of `fixed` in a what-if, or None when it would need a new
        importance pass."""
        todo, _ = plan(fixed, memo, until="proxy", write=False, results_dir=results_dir)
        if "importance" in todo or "model" in todo or "calibration" in todo:
            return None
        sub = run(fixed, out_dir=results_dir, until="proxy", memo=memo, write=False,
                  on_event=_quiet(on_event), should_stop=stop)
        loss = sub.metrics.get("proxy", {}).get("loss")
        achieved = sub.metrics.get("ratio", {}).get("achieved")
        return None if loss is None else Trial(float(loss), None if achieved is None else float(achieved))

    for stage in selected:
        if stop():
            raise Interrupted(f"stopped before stage {stage.name!r}", "run the same command again to resume")
        key = _key(stage, session, idents)
        record.keys[stage.name] = key
        on_event(StageStarted(stage=stage.name, description=stage.description,
                              total=_total(stage, session)))
        t0 = time.perf_counter()
        hit = None if fresh else memo.get(stage.name, key)
        ctx = Ctx(session=session, stage=stage.name, key=key, values=record.values,
                  results_dir=results_dir if write or stage.save is not None else None,
                  checkpoint_dir=cache.checkpoint_dir(stage.name, key), on_event=_inner(on_event, stage.name),
                  should_stop=stop, in_place=own, try_fix=try_fix if stage.name == "diagnosis" else None)
        cached = True
        if stage.name in _LEAD.pending:  # several ranks: tell the others whether this stage computes
            _LEAD.before(stage.name, computing=hit is None and (fresh or stage.load is None
                                                                or not cache.has(stage.name, key)))
        if hit is not None:
            identity, value = hit
            summary = "reused from this session's memory"
        elif not fresh and stage.load is not None and cache.has(stage.name, key):
            value = stage.load(cache.folder(stage.name, key))
            identity = key
            summary = "reused from the stage cache"
        else:
            cached = False
            if fresh and stage.save is not None:
                cache.drop(stage.name, key)
            if stage.name == "save":
                value = _write_results(session, record, results_dir, started, on_event)
            else:
                value = stage.compute(ctx)
            identity = stage.identity(value) if stage.identity else key
            if stage.save is not None:
                stage.save(cache.folder(stage.name, key), value)
                cache.mark_complete(stage.name, key, {"stage": stage.name})
                shutil.rmtree(cache.checkpoint_dir(stage.name, key), ignore_errors=True)
            summary = ctx.summary
        _LEAD.after(stage.name)
        if stage.name == "save_model" and "save" not in {s.name for s in selected}:
            commit_model(results_dir)  # the model alone (no results rewrite): swapped in by itself
        if stage.name not in ("save", "save_model"):  # both write into this run's staging folder
            memo.put(stage.name, key, identity, value)
        idents[stage.name] = identity
        record.values[stage.name] = value
        seconds = time.perf_counter() - t0
        record.seconds[stage.name] = seconds
        (record.cached if cached else record.computed).append(stage.name)
        if stage.name == "surgery" and value.in_place:
            memo.drop("model")  # the run pruned the model in place: it is no longer the original
        on_event(StageDone(stage=stage.name, seconds=seconds, cached=cached, summary=summary,
                           result=dict(ctx.result) if not cached else {}))
        if stage.name == "diagnosis":
            for finding in value.findings:
                on_event(finding.to_event())

    report = record.values.get("save") or build_report(session, record, results_dir if write else None, started)
    if write and results_dir is not None and "save_model" in record.computed:
        from prune_core.recovery import stale_recovery

        stale = stale_recovery(results_dir)
        if stale:
            on_event(Notice(stale, level="warning", stage="save_model"))
    on_event(RunDone(results_dir=str(results_dir), metrics=report.metrics, report=report))
    return report


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def _total(stage: Stage, session: Session) -> int | None:
    if stage.name == "importance":
        return -(-session.data.num_samples // session.data.batch_size)
    return None


def _inner(sink: EventSink, stage: str) -> EventSink:
    """Forward an inner step's events, except its own start/finish of the stage (the pipeline reports those)."""

    def forward(event: Event) -> None:
        if isinstance(event, StageStarted | StageDone) and event.stage == stage:
            return
        sink(event)

    return forward


def _quiet(sink: EventSink) -> EventSink:
    """A nested what-if (scoring a fix) reports only its notices, marked as the fix's (not the run's own)."""

    def forward(event: Event) -> None:
        if isinstance(event, Notice):
            sink(Notice(f"scoring a fix: {event.message}", level="info", stage="diagnosis"))

    return forward


def _write_results(session: Session, record: RunRecord, results_dir: Path, started: str,
                   on_event: EventSink) -> RunReport:
    report = build_report(session, record, results_dir, started)
    return report.write(results_dir)
