"""Support for the TUI tests: a deterministic fake pipeline, fixed model/dataset lists, wait helpers.

The fake speaks the `tui.engine.Pipeline` contract (events, RunReport) with fixed numbers, so the
snapshot tests and the flow tests that do not need real gradients are fast and byte-for-byte
reproducible. The end-to-end pilot and tmux tests use the real engine on the tiny model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest

from prune_core.errors import BadInput, Interrupted
from prune_core.events import BatchDone, EventSink, Notice, StageDone, StageStarted
from prune_core.report import RunReport
from sessions import Session

LAYERS = 4
MODELS = [
    {"key": "smollm2-135m", "description": "SmolLM2-135M-Instruct (LLaMA, 30 layers)", "family": "llama",
     "parameters": 134_515_008, "cached": False},
    {"key": "tiny-llama", "description": "random tiny LLaMA (4 layers, hidden 64)", "family": "llama",
     "parameters": 164_608, "cached": True},
]
DATASETS = [
    {"key": "shakespeare", "description": "Shakespeare's 38 plays", "kind": "builtin", "cached": True},
    {"key": "wikitext2", "description": "WikiText-2 raw", "kind": "hub", "cached": False},
    {"key": "<path>", "description": "a local .txt/.jsonl/.parquet file or folder", "kind": "local", "cached": True},
]
PREVIEW = "ACT I\nSCENE I. Athens. The palace of THESEUS.\nEnter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n"


def layer_stats(batch: int) -> dict[str, dict[str, list[float]]]:
    """Deterministic per-layer statistics that move a little with the batch number."""
    out: dict[str, dict[str, list[float]]] = {}
    for bi, block in enumerate(("attention", "mlp", "layer")):
        out[block] = {}
        for si, stat in enumerate(("mean", "std", "norm", "max", "min")):
            out[block][stat] = [10.0 ** (-(layer + 1) + 0.1 * si + 0.05 * bi) * (1 + 0.01 * batch)
                                for layer in range(LAYERS)]
    return out


FINDINGS_NONE = {"issue": "gradient_scale_ratio", "severity": "high",
                 "description": "Per-layer mean |g| spans 1000× (1e-4 … 1e-1).",
                 "recommendation": "Normalize importance per block (log) before ranking.",
                 "fix": {"normalization.level": "block", "normalization.method": "log"}}
FINDING_RATE = {"issue": "blocks_over_pruned", "severity": "warning", "description": "1 block pruned beyond 90 %.",
                "recommendation": "Cap the rate per block.", "fix": {"pruning.max_rate": 0.8}}
FINDING_NOTE = {"issue": "note", "severity": "info", "description": "Calibration used 256 tokens.",
                "recommendation": "More samples steady it.", "fix": {}}


def fake_summary(session: Session) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A per-layer allocation summary and the matching metrics entries, from the pruning settings."""
    p = session.pruning
    rows = []
    removed = 0
    for layer in range(LAYERS):
        share = p.ratio * (0.4 + 0.4 * layer)
        if session.normalization.level != "none":
            share = p.ratio
        share = max(p.min_rate, min(p.max_rate, share, 1.0))
        if layer in p.protect_layers:
            share = 0.0
        ap, mp = round(2 * share), round(172 * share)
        before = 2 * 8192 + 172 * 192
        after = before - ap * 8192 - mp * 192
        removed += before - after
        rows.append({"layer_idx": layer, "attention_groups": 2, "attention_pruned": ap, "attention_rate": ap / 2,
                     "mlp_groups": 172, "mlp_pruned": mp, "mlp_rate": mp / 172, "params_before": before,
                     "params_after": after})
    prunable = LAYERS * (2 * 8192 + 172 * 192)
    metrics = {"parameters": {"prunable_before": prunable, "removed": removed},
               "ratio": {"target": p.ratio, "achieved": removed / prunable, "reachable": True, "message": ""},
               "mask_sha256": f"fake-{p.ratio}-{session.normalization.level}"}
    return pd.DataFrame(rows), metrics


class FakeMemo:
    """Stage values by name (the newest only), like `pipeline.Memo.latest`."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def latest(self, stage: str) -> Any:
        return self.values.get(stage)


@dataclass
class FakeModel:
    model: str
    tokenizer: Any = None


class FakePipeline:
    """The `tui.engine.Pipeline` contract with fixed numbers and timings.

    `gate` (if set) must be released for each importance batch; an interrupted pass keeps its batches
    as a "checkpoint" (per results folder) that the next run resumes from; `checkpoint=True` makes
    every session look interrupted.
    """

    batches = 4
    instances: ClassVar[list[FakePipeline]] = []

    def __init__(self, gate: threading.Semaphore | None = None, checkpoint: bool = False) -> None:
        self.gate = gate
        self.checkpoint = checkpoint
        self.checkpoints: dict[str, int] = {}
        self.calls: list[tuple[str, str | None]] = []
        self.done_batches = 0
        FakePipeline.instances.append(self)

    def new_memo(self) -> FakeMemo:
        return FakeMemo()

    def results_dir_for(self, session: Session, out_dir: Path | None = None) -> Path:
        return Path(out_dir) if out_dir else Path(session.session.output_dir) / session.session.name

    def has_checkpoint(self, session: Session, out_dir: Path | None = None) -> bool:
        return self.checkpoint or str(self.results_dir_for(session, out_dir)) in self.checkpoints

    def read(self, folder: Path) -> Any:
        raise BadInput(f"{folder} is not a results folder", "run the session first")

    def loaded(self, memo: FakeMemo, stage: str) -> Any:
        return memo.latest(stage)

    def generate(self, model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
        return prompt + (" there was a king" if model == "original" else " king king king")

    @staticmethod
    def _stage(on_event: EventSink, name: str, seconds: float, summary: str = "", total: int | None = None,
               cached: bool = False) -> None:
        on_event(StageStarted(stage=name, description=name, total=total))
        on_event(StageDone(stage=name, seconds=seconds, summary=summary, cached=cached))

    def _importance(self, folder: str, on_event: EventSink, stop: Callable[[], bool]) -> None:
        on_event(StageStarted(stage="importance", description="taylor pass", total=self.batches))
        start = self.checkpoints.pop(folder, 0)
        for b in range(start + 1, self.batches + 1):
            if self.gate is not None:
                self.gate.acquire()
            self.done_batches = b
            on_event(BatchDone(stage="importance", batch=b, total=self.batches, loss=5.0 - 0.1 * b,
                               mean_loss=5.0 - 0.05 * b, tokens_per_s=1234.0, eta_s=float(self.batches - b),
                               layer_stats=layer_stats(b), resumed_from=start))
            if stop() and b < self.batches:
                self.checkpoints[folder] = b
                raise Interrupted(f"stopped after batch {b}", "resume the run")
        on_event(StageDone(stage="importance", seconds=2.0, summary="4 batches"))

    def run(self, session: Session, *, out_dir: Path | None = None, until: str | None = None, memo: Any = None,
            fresh: bool = False, write: bool = True, on_event: EventSink | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunReport:
        self.calls.append(("run", until))
        sink = on_event or (lambda e: None)
        stop = should_stop or (lambda: False)
        memo = memo if memo is not None else FakeMemo()
        folder = self.results_dir_for(session, out_dir)
        metrics: dict[str, Any] = {}
        if "model" in memo.values:
            self._stage(sink, "model", 0.0, cached=True)
        else:
            self._stage(sink, "model", 0.5, "llama, 4 layers")
            memo.values["model"] = FakeModel("original")
        if until == "model":
            return RunReport(session=session)
        self._stage(sink, "calibration", 0.1, "8 × 32 tokens")
        key = (session.importance.method, session.data.num_samples, session.data.seq_len)
        if not fresh and memo.values.get("importance") == key:
            self._stage(sink, "importance", 0.0, cached=True)
        else:
            self._importance(str(folder), sink, stop)
            memo.values["importance"] = key
        self._stage(sink, "allocation", 0.01)
        summary, alloc = fake_summary(session)
        metrics.update(alloc)
        findings = []
        if until in (None, "diagnosis"):
            self._stage(sink, "diagnosis", 0.01)
            if session.normalization.level == "none":
                findings.append(FINDINGS_NONE)
            if session.pruning.max_rate > 0.9:
                findings.append(FINDING_RATE)
            findings.append(FINDING_NOTE)
        ppl: dict[str, Any] = {}
        ev = session.evaluation
        if until in (None, "eval_after") and ev.before:
            self._stage(sink, "eval_before", 0.2)
            ppl["before"] = {"ppl": 1000.5}
        if until in ("surgery", "distill", "eval_after", "save_model") or (
                until is None and (ev.after or session.output.save_model)):
            self._stage(sink, "surgery", 0.05)
            memo.values["surgery"] = FakeModel("pruned")
            if session.distill.steps and until != "surgery":
                self._stage(sink, "distill", 0.05)
                memo.values["distill"] = FakeModel("pruned")
        if until in (None, "eval_after") and ev.after:
            self._stage(sink, "eval_after", 0.2)
            ppl["after"] = {"ppl": 1200.25}
        metrics["perplexity"] = ppl
        if write and session.output.save_model and until in (None, "save_model"):
            self._stage(sink, "save_model", 0.1)
        if write and until is None:
            self._stage(sink, "save", 0.05)
            sink(Notice(message="results written", level="info", stage="save"))
        return RunReport(session=session, metrics=metrics, summary=summary, findings=tuple(findings),
                         stats=layer_stats(self.batches), stats_label="gradient",
                         results_dir=folder if write else None)


def fake_pipeline(**kwargs: Any) -> FakePipeline:
    return FakePipeline(**kwargs)


@pytest.fixture
def fixed_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed built-in model / dataset lists and text preview (no dependence on the local cache)."""
    import tui.engine as engine

    monkeypatch.setattr(engine, "builtin_models", lambda: [dict(m) for m in MODELS])
    monkeypatch.setattr(engine, "dataset_names", lambda: [dict(d) for d in DATASETS])
    monkeypatch.setattr(engine, "preview_text", lambda dataset, chars=1200: (PREVIEW, 4_300_000))
    monkeypatch.setattr(engine, "measure_cpu_flops", lambda seconds=0.2: 50e9)
    monkeypatch.setattr(engine, "cuda_available", lambda: False)


def plain(renderable: Any, width: int = 120) -> str:
    """A Rich renderable (what a Static shows) as plain text."""
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def shown(widget: Any) -> str:
    """The plain text a Static-like widget currently shows."""
    visual = widget.render()
    inner = getattr(visual, "_renderable", None)
    return plain(inner if inner is not None else visual)


async def settle(app: Any, pilot: Any, cap_s: float = 120.0) -> None:
    """Wait until no worker runs and no job is pending (polls; cap keeps a broken test from hanging)."""
    import time

    deadline = time.monotonic() + cap_s
    while time.monotonic() < deadline:
        await app.workers.wait_for_complete()
        await pilot.pause()
        if app.state.busy is None and not any(w.is_running for w in app.workers):
            await pilot.pause()
            return
    raise AssertionError(f"the app did not settle within {cap_s} s (busy={app.state.busy})")


async def wait_for(pilot: Any, condition: Callable[[], bool], cap_s: float = 120.0, what: str = "") -> None:
    """Pause until `condition()` holds (deterministic: no fixed sleeps)."""
    import time

    deadline = time.monotonic() + cap_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)


async def run_from_palette(app: Any, pilot: Any, query: str, label: str) -> None:
    """Open the command palette (ctrl+p), type `query`, wait for a hit whose prompt holds `label`,
    check that it is the highlighted one and run it (enter)."""
    from textual.command import CommandList, CommandPalette

    await pilot.press("ctrl+p")
    await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="palette")
    await pilot.press(*query)
    commands = app.screen.query_one(CommandList)
    await wait_for(pilot, lambda: any(label in str(commands.get_option_at_index(i).prompt)
                                      for i in range(commands.option_count)), what="palette hits")
    if commands.highlighted is None:
        await pilot.press("down")
    assert label in str(commands.get_option_at_index(commands.highlighted or 0).prompt)
    await pilot.press("enter")
