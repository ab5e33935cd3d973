"""Support for the TUI tests: a deterministic fake Workbench, fixed model/dataset lists, wait helpers.

The fake speaks the Workbench contract (events, attributes, methods) with fixed numbers, so the
snapshot tests and the flow tests that do not need real gradients are fast and byte-for-byte
reproducible. The end-to-end pilot and tmux tests use the real engine on the tiny model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest

from prune_core.errors import Interrupted
from prune_core.events import BatchDone, EventSink, Notice, StageDone, StageStarted
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


@dataclass
class FakeFinding:
    issue: str
    severity: str
    description: str
    recommendation: str
    fix: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeAllocation:
    summary: pd.DataFrame
    target_ratio: float
    achieved_ratio: float
    removed_parameters: int
    prunable_parameters: int
    reachable: bool = True
    message: str = ""


def fake_allocation(session: Session) -> FakeAllocation:
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
    return FakeAllocation(pd.DataFrame(rows), p.ratio, removed / prunable, removed, prunable)


class FakeWorkbench:
    """The Workbench contract with fixed numbers; `gate` (if set) must be released for each batch."""

    batches = 4
    instances: ClassVar[list[FakeWorkbench]] = []

    def __init__(self, session: Session, results_dir: Path | None, *, on_event: EventSink,
                 should_stop: Callable[[], bool] | None = None, fresh: bool = False,
                 gate: threading.Semaphore | None = None, checkpoint: bool = False) -> None:
        self.session = session
        self.results_dir = Path(results_dir) if results_dir else Path(session.session.output_dir) / session.session.name
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.fresh = fresh
        self.gate = gate
        self._checkpoint = checkpoint
        self.loaded: Any = None
        self.importance: Any = None
        self.allocation: Any = None
        self.previous_allocation: Any = None
        self.findings: list[Any] = []
        self.metrics: dict[str, Any] = {}
        self.perplexity: dict[str, Any] = {}
        self.done_batches = 0
        self.calls: list[str] = []
        FakeWorkbench.instances.append(self)

    def _stage(self, name: str, seconds: float, summary: str = "", total: int | None = None) -> None:
        self.on_event(StageStarted(stage=name, description=name, total=total))
        self.on_event(StageDone(stage=name, seconds=seconds, summary=summary))

    def prepare(self) -> None:
        self.calls.append("prepare")
        self._stage("model", 0.5, "llama, 4 layers")
        self._stage("data", 0.1, "8 × 32 tokens")
        self.loaded = object()

    def has_checkpoint(self) -> bool:
        return self._checkpoint

    def compute_importance(self) -> Any:
        self.calls.append("compute_importance")
        if self.importance is not None:
            return self.importance
        self.on_event(StageStarted(stage="importance", description="taylor pass", total=self.batches))
        start = self.done_batches
        for b in range(start + 1, self.batches + 1):
            if self.gate is not None:
                self.gate.acquire()
            self.done_batches = b
            self.on_event(BatchDone(stage="importance", batch=b, total=self.batches, loss=5.0 - 0.1 * b,
                                    mean_loss=5.0 - 0.05 * b, tokens_per_s=1234.0, eta_s=float(self.batches - b),
                                    layer_stats=layer_stats(b), resumed_from=start))
            if self.should_stop() and b < self.batches:
                raise Interrupted(f"stopped after batch {b}", "resume the run")
        self.on_event(StageDone(stage="importance", seconds=2.0, summary="4 batches"))
        self.importance = type("Imp", (), {"stats": layer_stats(self.batches), "stats_label": "gradient"})()
        return self.importance

    def allocate(self, session: Session | None = None) -> Any:
        self.calls.append("allocate")
        if session is not None:
            self.session = session
        self.compute_importance()
        self.on_event(StageStarted(stage="allocation", description="allocation"))
        if self.allocation is not None:
            self.previous_allocation = self.allocation
        self.allocation = fake_allocation(self.session)
        self.on_event(StageDone(stage="allocation", seconds=0.01))
        return self.allocation

    def diagnose(self) -> list[Any]:
        self.calls.append("diagnose")
        self._stage("diagnosis", 0.01)
        findings = []
        if self.session.normalization.level == "none":
            findings.append(FakeFinding("gradient_scale_ratio", "high",
                                        "Per-layer mean |g| spans 1000× (1e-4 … 1e-1).",
                                        "Normalize importance per block (log) before ranking.",
                                        {"normalization.level": "block", "normalization.method": "log"}))
        if self.session.pruning.max_rate > 0.9:
            findings.append(FakeFinding("blocks_over_pruned", "warning", "1 block pruned beyond 90 %.",
                                        "Cap the rate per block.", {"pruning.max_rate": 0.8}))
        findings.append(FakeFinding("note", "info", "Calibration used 256 tokens.", "More samples steady it."))
        self.findings = findings
        return findings

    def evaluate(self) -> dict[str, Any]:
        self.calls.append("evaluate")
        self._stage("eval_before", 0.2)
        self._stage("eval_after", 0.2)
        self.perplexity = {"before": {"ppl": 1000.5}, "after": {"ppl": 1200.25}}
        return self.perplexity

    def save_model(self) -> Path:
        self.calls.append("save_model")
        self._stage("save_model", 0.1)
        return self.results_dir / "model"

    def generate_sample(self, prompt: str, max_new_tokens: int = 40) -> tuple[str, str]:
        self.calls.append("generate")
        return prompt + " there was a king", prompt + " king king king"

    def save_results(self) -> Path:
        self.calls.append("save_results")
        self._stage("save", 0.05)
        self.on_event(Notice(message="results written", level="info", stage="save"))
        return self.results_dir


def fake_factory(**kwargs: Any) -> Callable[..., FakeWorkbench]:
    def make(session: Session, results_dir: Path | None, *, on_event: EventSink,
             should_stop: Callable[[], bool] | None = None, fresh: bool = False) -> FakeWorkbench:
        return FakeWorkbench(session, results_dir, on_event=on_event, should_stop=should_stop, fresh=fresh, **kwargs)
    return make


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
        if app.busy is None and not any(w.is_running for w in app.workers):
            await pilot.pause()
            return
    raise AssertionError(f"the app did not settle within {cap_s} s (busy={app.busy})")


async def wait_for(pilot: Any, condition: Callable[[], bool], cap_s: float = 120.0, what: str = "") -> None:
    """Pause until `condition()` holds (deterministic: no fixed sleeps)."""
    import time

    deadline = time.monotonic() + cap_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)
