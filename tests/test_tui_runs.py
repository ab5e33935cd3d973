"""Run-view bookkeeping fixed for issue 12: resumed passes, stopped passes, cached stages, ratio gaps,
state shown without colour, and Evaluate forcing both perplexities on. Pure Python, no app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prune_core.events import BatchDone, Notice, StageDone, StageStarted
from sessions import Session
from tui import jobs
from tui.estimate import Geometry, estimate
from tui.results_model import AllocationView
from tui.runstate import RunState
from tui.screens.run import chart_note, progress_lines


def batch(n: int, total: int = 8, resumed: int = 0) -> BatchDone:
    return BatchDone("importance", n, total, 4.0, 4.1, 100.0, 24.0, {}, resumed_from=resumed)


def test_a_resumed_pass_starts_at_its_checkpoint_not_at_zero() -> None:
    rs = RunState()
    rs.reset()
    rs.apply(StageStarted("importance", "importance pass", total=8))
    rs.apply(Notice("resuming from batch 5/8", "info", "importance"))
    assert (rs.stages["importance"].done, rs.stages["importance"].total) == (5, 8)


def test_a_stopped_pass_shows_no_eta_and_a_stopping_one_says_so() -> None:
    rs = RunState()
    rs.reset()
    rs.apply(batch(3))
    assert "ETA" in str(progress_lines(rs))
    rs.stopping = True
    assert "stopping after batch 4/8" in str(progress_lines(rs))
    rs.finish("interrupted")
    text = str(progress_lines(rs))
    assert "ETA" not in text and "stopped at batch 3/8" in text


def test_the_chart_note_follows_the_run() -> None:
    rs = RunState()
    rs.reset()
    assert chart_note(rs) == "waiting for the first batch"
    rs.apply(StageStarted("importance"))
    rs.apply(StageDone("importance", 0.1, cached=True))
    assert "cache" in chart_note(rs)
    failed = RunState()
    failed.reset()
    failed.finish("failed", "boom")
    assert "failed" in chart_note(failed)


def test_a_missed_target_is_flagged() -> None:
    ok = AllocationView(rows=[], target_ratio=0.5, achieved_ratio=0.49, removed=49, prunable=100)
    short = AllocationView(rows=[], target_ratio=0.5, achieved_ratio=0.198, removed=20, prunable=100)
    assert ok.ratio_gap() == ""
    assert "19.8% is below the target 50%" in short.ratio_gap()


def test_the_estimate_is_calibrated_by_a_measured_pass() -> None:
    geo = Geometry(parameters=135_000_000, prunable=100_000_000, layers=30, hidden=576, heads=9)
    guess = estimate(geo, method="taylor", seq_len=128, num_samples=16, batch_size=4, cpu_flops=1e9)
    measured = estimate(geo, method="taylor", seq_len=128, num_samples=16, batch_size=4, cpu_flops=1e9,
                        measured=(100.0, 128))
    assert abs(measured.seconds - 16 * 128 / 100.0) < 1e-6 and guess.seconds != measured.seconds


def test_generation_and_distillation_are_priced_at_the_passs_own_speed() -> None:
    """The quick start on smollm2-135m: a taylor pass over 96 windows of 128 at 256 tokens/s takes 48 s;
    24 distillation steps of 4 took about a minute on the same machine, and generating 64 windows (64 at a
    time) about 44 s."""
    from tui.estimate import GENERATION_SLOWDOWN, around_pass

    geo = Geometry(parameters=135_000_000, prunable=100_000_000, layers=30, hidden=576, heads=9)
    chosen = estimate(geo, method="taylor", seq_len=128, num_samples=96, batch_size=4, measured=(256.0, 128))
    assert chosen.seconds == pytest.approx(48.0)
    around = around_pass(geo, chosen, generated_samples=64, distill_steps=24, distill_batch_size=4)
    # per token: the pass costs 3 forwards; distillation 4 (student forward + backward, teacher forward)
    assert around.distill_seconds == pytest.approx(24 * 4 * 128 * 4 / (256.0 * 3))
    assert around.generation_seconds == pytest.approx(64 * 128 * GENERATION_SLOWDOWN / (256.0 * 3))
    assert 35 < around.generation_seconds < 55 and 50 < around.distill_seconds < 70
    none = around_pass(geo, chosen, generated_samples=0, distill_steps=0, distill_batch_size=4)
    assert (none.generation_seconds, none.distill_seconds) == (0.0, 0.0)


def test_checkbox_and_radio_state_shows_without_colour() -> None:
    from tui.widgets.fields import MarkedCheckbox, MarkedRadioButton

    assert MarkedCheckbox("", value=True).BUTTON_INNER == "X"
    assert MarkedCheckbox("", value=False).BUTTON_INNER == " "
    assert MarkedRadioButton("a", value=True).BUTTON_INNER != MarkedRadioButton("b", value=False).BUTTON_INNER


def test_evaluate_forces_both_perplexities_on() -> None:
    seen: dict[str, Any] = {}

    class Recorder:
        def run(self, session: Session, **kw: Any) -> str:
            seen.update(session=session, **kw)
            return "report"

    ctx = jobs.JobContext(Recorder(), memo=None, sink=lambda e: None, should_stop=lambda: False)  # type: ignore[arg-type]
    off = Session().with_updates({"evaluation.before": False, "evaluation.after": False})
    assert jobs.evaluate(ctx, off) == "report"
    assert seen["session"].evaluation.before and seen["session"].evaluation.after
    # every stage (eval_before is no dependency of eval_after), nothing written
    assert seen.get("until") is None and seen["write"] is False


def test_the_what_if_panel_shows_the_saved_models_proxy_beside_the_masked_one() -> None:
    from tui.results_model import from_report
    from tui.screens.whatif import compare_text

    summary: list[dict[str, Any]] = []  # no per-layer rows: the totals come from metrics.json
    metrics = {"ratio": {"target": 0.2, "achieved": 0.2}, "parameters": {"prunable_before": 100, "removed": 20},
               "proxy": {"loss": 4.8363, "dense": 4.1, "final": 4.6512}}
    data = from_report({"metrics": metrics, "summary": summary, "findings": []})
    text = compare_text(data.allocation, None).plain
    assert "proxy loss 4.8363 (dense 4.1000) · saved model 4.6512" in text
    del metrics["proxy"]["final"]
    assert "saved model" not in compare_text(from_report({"metrics": metrics, "summary": summary}).allocation,
                                             None).plain


def test_saving_the_model_of_a_what_if_writes_its_own_results_folder(tmp_path: Path) -> None:
    """Save model (m) on the session the folder holds: model/ alone, the run's log kept (appended). On a
    what-if: a new `<name>-whatif1` folder whose metrics describe that model; the original is untouched."""
    import json

    from tests.helpers import tiny_session
    from tui.engine import Pipeline

    session = tiny_session(tmp_path, "saved", **{"evaluation.before": False, "evaluation.after": False,
                                                 "output.save_model": False})
    engine = Pipeline()
    memo = engine.new_memo()
    first = jobs.run_session(jobs.JobContext(engine, memo, lambda e: None, lambda: False), session)
    folder = first.results_dir
    log = (folder / "events.ndjson").read_text()
    metrics = (folder / "metrics.json").read_text()
    ctx = jobs.JobContext(engine, memo, lambda e: None, lambda: False, out_dir=folder)

    _, where, new = jobs.save_model(ctx, session)
    assert (where, new) == (folder, False) and (folder / "model" / "model.safetensors").is_file()
    assert (folder / "events.ndjson").read_text().startswith(log), "the run's own log is kept"
    assert (folder / "metrics.json").read_text() == metrics

    whatif = session.with_updates({"pruning.ratio": 0.5})
    report, where, new = jobs.save_model(ctx, whatif)
    assert (where, new) == (folder.parent / "saved-whatif1", True)
    saved = json.loads((where / "metrics.json").read_text())
    assert saved["ratio"]["target"] == 0.5 and saved["mask_sha256"] == report.metrics["mask_sha256"]
    assert (where / "model" / "model.safetensors").is_file()
    assert (folder / "metrics.json").read_text() == metrics, "the folder shown before keeps its results"
    assert jobs.save_model(ctx, whatif)[1:] == (where, True), "the same what-if again: its folder, not a new one"
    assert jobs.save_model(ctx, session.with_updates({"pruning.ratio": 0.4}))[1] == folder.parent / "saved-whatif2"


def test_a_run_that_fails_before_any_stage_says_so() -> None:
    from tui.screens.run import stage_lines

    rs = RunState()
    rs.reset()
    assert "No run yet" in stage_lines(rs).plain
    rs.finish("failed", "data.dataset: no such file or folder")
    assert stage_lines(rs).plain == "The run failed before its first stage: data.dataset: no such file or folder"


def test_serious_findings_count_critical_and_high_only() -> None:
    from tui.results_model import FindingView, serious_findings

    def finding(severity: str) -> FindingView:
        return FindingView(issue="x", severity=severity, description="", recommendation="")

    assert serious_findings([finding("info"), finding("warning")]) == ""
    assert serious_findings([finding("high"), finding("critical"), finding("critical"), finding("info")]) == \
        "2 critical, 1 high"
