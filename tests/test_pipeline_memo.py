"""The pipeline recomputes only what changed: what-ifs with a Memo, the plan announced first, one stage order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from prune_core import pipeline
from prune_core.events import Event, Notice, StageDone, StagePlan
from tests.helpers import tiny_session

ROOT = Path(__file__).resolve().parents[1]


def _run(session, memo, **kw):
    events: list[Event] = []
    report = pipeline.run(session, memo=memo, on_event=events.append, **kw)
    computed = [e.stage for e in events if isinstance(e, StageDone) and not e.cached]
    return report, events, computed


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("memo")
    session = tiny_session(tmp, name="memo", **{"evaluation.before": False, "evaluation.after": False,
                                                "output.save_model": False})
    memo = pipeline.Memo()
    report, _, computed = _run(session, memo, until="diagnosis", write=False)
    assert {"model", "calibration", "importance", "allocation", "proxy", "diagnosis"} <= set(computed)
    return session, memo, report


def test_pruning_what_if_recomputes_nothing_upstream_of_allocation(base) -> None:
    session, memo, first = base
    changed = session.with_updates({"pruning.ratio": 0.45})
    report, events, computed = _run(changed, memo, until="diagnosis", write=False)
    assert computed == ["allocation", "proxy", "diagnosis"]
    plan = next(e for e in events if isinstance(e, StagePlan))
    assert plan.recompute == ("allocation", "proxy", "diagnosis")
    assert report.achieved_ratio > first.achieved_ratio
    assert report.mask_sha256 != first.mask_sha256
    # and back: nothing upstream recomputes (the memo keeps a few allocations; the fixes' what-ifs may
    # have pushed the first one out, and then only the cheap stages run again) and the mask is identical
    again, _, computed = _run(session, memo, until="diagnosis", write=False)
    assert again.mask_sha256 == first.mask_sha256
    assert set(computed) <= {"allocation", "proxy", "diagnosis"}


def test_temperature_what_if_computes_block_losses_only_and_says_so_first(base) -> None:
    session = base[0].with_updates({"session.name": "memo-t"})  # its own results folder and stage cache
    memo = pipeline.Memo()
    _run(session, memo, until="proxy", write=False)  # no diagnosis: nothing has measured block losses yet
    changed = session.with_updates({"correction.temperature": 1.0})
    _, events, computed = _run(changed, memo, until="proxy", write=False)
    assert computed == ["block_losses", "allocation", "proxy"]
    first_done = next(i for i, e in enumerate(events) if isinstance(e, StageDone))
    notices = [i for i, e in enumerate(events) if isinstance(e, Notice) and "block_losses" in e.message]
    assert notices and notices[0] < first_done, "the recompute is announced before any stage runs"


def test_fix_scores_are_recorded_on_findings(base) -> None:
    _, _, report = base
    for f in report.findings:
        if f.get("fix") and f["verdict"] != "untested":
            assert f["proxy_before"] is not None and f["proxy_after"] is not None
            assert f["recommended"] == (f["verdict"] != "worse")


def test_stage_order_is_declared_once() -> None:
    """No module outside the pipeline calls stage functions in sequence."""
    stage_funcs = {"load_model", "load_calibration", "compute_importance", "compute_block_losses",
                   "compute_allocation", "compute_proxy", "compute_diagnosis", "compute_surgery", "eval_before",
                   "eval_after", "save_model"}
    offenders = []
    for path in [*ROOT.glob("prune_core/**/*.py"), *ROOT.glob("cli/*.py"), *ROOT.glob("tui/**/*.py")]:
        if path.name in ("pipeline.py", "steps.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        if len(calls & stage_funcs) >= 2:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_magnitude_runs_end_to_end_without_a_calibration_pass(tmp_path: Path) -> None:
    """The data-free baseline through `prune run`: no batches, a results folder like any other."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from tests.helpers import write_session

    path = write_session(tmp_path / "m.toml", tiny_session(tmp_path, name="mag", **{"importance.method": "magnitude"}))
    result = CliRunner().invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert "batch_done" not in kinds and kinds[-1] == "summary"
    metrics = json.loads((tmp_path / "runs" / "mag" / "metrics.json").read_text())
    assert metrics["importance"]["method"] == "magnitude" and metrics["importance"]["batches"] == 0
    assert (tmp_path / "runs" / "mag" / "model" / "pruning.json").is_file()
