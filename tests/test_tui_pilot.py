"""End to end with the keyboard on the real engine: set up a tiny-model session step by step, run it,
watch the chart update, apply a diagnosis fix, change the ratio in what-if, save, quit, then reopen
the saved session and the results folder. Every wait is on a condition (workers done, state reached)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

import sessions
from prune_core.events import BatchDone, Event
from sessions import Session
from tests.test_tui_support import run_from_palette, settle, shown, wait_for
from tui import engine
from tui.app import PruneApp
from tui.screens.dialogs import ConfirmScreen
from tui.screens.results import ResultsScreen
from tui.screens.setup import SetupScreen
from tui.widgets.charts import LayerStatsChart
from tui.widgets.findings import FindingsList

pytestmark = pytest.mark.anyio
SIZE = (80, 24)


async def type_into(pilot, app: PruneApp, field_id: str, text: str) -> None:  # type: ignore[no-untyped-def]
    """The focused field must be `field_id`; its text is selected on focus, so typing replaces it."""
    assert isinstance(app.focused, Input) and app.focused.id == field_id, app.focused
    await pilot.press(*text)


async def test_keyboard_walk_run_fix_whatif_save_reopen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the schema's plain defaults: the recommended ones protect all four layers of the tiny model
    monkeypatch.setattr("tui.state.recommended", lambda: sessions.Session())
    path = tmp_path / "walk.toml"
    out = tmp_path / "runs"
    keys = [m["key"] for m in engine.builtin_models()]
    app = PruneApp(path, cpu_flops=50e9)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        setup = app.screen
        assert isinstance(setup, SetupScreen) and setup.step == "model"
        # 1 Model: pick tiny-llama in the list of built-ins; Enter also inspects it in a worker
        await pilot.press(*["down"] * (keys.index("tiny-llama") - keys.index("smollm2-135m")), "enter")
        await wait_for(pilot, lambda: app.state.model_info is not None and app.state.model_info.spec == "tiny-llama",
                       what="model inspected")
        assert app.state.model_info.layers == 4 and app.state.model_info.prunable_parameters > 0  # type: ignore[union-attr]
        assert "4 layers" in shown(setup.query_one("#model-info"))
        # 2 Dataset: shakespeare is the first entry
        await pilot.press("pagedown")
        assert setup.step == "dataset"
        await pilot.press("enter")
        await settle(app, pilot)
        assert "tokens" in shown(setup.query_one("#dataset-stats"))
        # 3 Method: taylor (the highlighted first button)
        await pilot.press("pagedown", "enter")
        assert setup.step == "method" and app.state.form_data["importance"]["method"] == "taylor"
        # 4 Length
        await pilot.press("pagedown")
        await type_into(pilot, app, "f-data--seq_len", "32")
        await pilot.press("tab")
        await type_into(pilot, app, "f-data--num_samples", "8")
        await pilot.press("tab")
        await type_into(pilot, app, "f-data--generated_samples", "2")  # + 2 windows the model writes itself
        await pilot.press("tab")
        await type_into(pilot, app, "f-data--batch_size", "4")
        assert "◀ chosen" in shown(setup.query_one("#estimate"))
        # 5 Pruning
        await pilot.press("pagedown")
        await type_into(pilot, app, "f-pruning--ratio", "0.3")
        # 6 Review: results next to the test, then save (ctrl+s) and run (ctrl+r)
        await pilot.press("pagedown")
        assert setup.step == "review"
        await pilot.press("tab")
        await type_into(pilot, app, "f-session--output_dir", str(out))
        assert not app.state.problems, app.state.problems
        assert app.title == "prune — walk *"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.title == "prune — walk" and path.is_file()
        s = sessions.load(path)
        assert (s.model.id, s.data.dataset, s.importance.method) == ("tiny-llama", "shakespeare", "taylor")
        assert (s.data.seq_len, s.data.num_samples, s.data.batch_size, s.pruning.ratio) == (32, 8, 4, 0.3)
        assert s.data.generated_samples == 2

        await pilot.press("ctrl+r")
        assert app.state.run_state.status != "idle"  # started (a fast machine may already be done)
        run_chart = app.get_screen("run").query_one(LayerStatsChart)
        await settle(app, pilot, cap_s=300)
        assert app.state.run_state.status == "done", app.state.run_state.error
        assert app.state.run_state.batches_received >= 1 and app.state.run_state.batch is not None
        assert app.state.run_state.batch.total == 3  # 8 dataset + 2 generated windows in batches of 4
        assert run_chart.received >= 1 and run_chart.redraws > 0
        assert {"model", "calibration", "importance", "allocation", "diagnosis", "save"} <= set(app.state.run_state.stages)
        results_dir = out / "walk"
        assert (results_dir / "metrics.json").is_file()

        # results, then diagnosis: apply the first finding that has a fix
        assert isinstance(app.screen, ResultsScreen)
        assert app.state.results is not None and app.state.results.allocation is not None
        assert len(app.state.results.allocation.rows) == 4
        await pilot.press("d")
        await pilot.pause()
        findings = app.screen.query_one(FindingsList)
        fixable = [i for i, f in enumerate(findings.findings) if f.recommended]  # verified by the proxy
        assert fixable, [f.issue for f in findings.findings]
        assert app.focused is findings
        await pilot.press(*["down"] * fixable[0])
        fix = findings.selected.fix  # type: ignore[union-attr]
        await pilot.press("f")
        await settle(app, pilot)
        for key, value in fix.items():
            section, _, name = key.partition(".")
            assert getattr(getattr(app.state.session, section), name) == value
        assert app.title == "prune — walk *"

        # what-if: a new ratio, allocated at once with the previous allocation kept beside it; w opens the
        # panel without focusing a text field (a single-key command stays a command), Tab enters the ratio
        await pilot.press("w")
        await pilot.pause()
        assert not isinstance(app.focused, Input)
        await pilot.press("tab")
        await type_into(pilot, app, "f-pruning--ratio", "0.25")
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.state.session.pruning.ratio == 0.25
        assert app.state.results.allocation.target_ratio == 0.25  # type: ignore[union-attr]
        assert app.state.results.previous is not None and app.state.results.previous.target_ratio == 0.3

        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.title == "prune — walk"
        assert sessions.load(path).pruning.ratio == 0.25
        await pilot.press("ctrl+q")  # nothing unsaved, nothing running: quits at once
        await pilot.pause()
    assert app.return_code == 0

    # reopen the saved session: it opens on the review step with the saved values
    again = PruneApp(path, cpu_flops=50e9)
    async with again.run_test(size=SIZE) as pilot:
        await settle(again, pilot)
        assert isinstance(again.screen, SetupScreen) and again.screen.step == "review"
        assert again.title == "prune — walk"
        assert again.state.session == sessions.load(path)

    # reopen the results folder: results and diagnosis are read back, nothing is recomputed
    folder = PruneApp(results_dir, cpu_flops=50e9)
    async with folder.run_test(size=SIZE) as pilot:
        await settle(folder, pilot)
        assert isinstance(folder.screen, ResultsScreen)
        r = folder.state.results
        assert r is not None and r.from_folder and r.allocation is not None
        assert len(r.allocation.rows) == 4 and r.findings and r.stats
        assert not folder.state.engine_ready and folder.state.run_state.stages == {}
        assert "walk" in shown(folder.screen.query_one("#results-headline"))


async def test_interrupted_run_is_resumable_on_reopen(tmp_path: Path) -> None:
    """Real engine: stop after the first batch (the flag is set from the event sink, so it is exact),
    then reopening the session offers to resume, and the pass continues from the checkpoint."""
    session = Session().with_updates({
        "session.name": "resume", "session.output_dir": str(tmp_path / "runs"), "model.id": "tiny-llama",
        "model.device": "cpu", "data.num_samples": 8, "data.seq_len": 32, "data.batch_size": 2,
        "importance.checkpoint_seconds": 0.0})
    path = sessions.save(session, tmp_path / "resume.toml")
    app = PruneApp(path, cpu_flops=50e9)
    sink = app.sink

    def stop_after_first_batch(event: Event) -> None:
        sink(event)
        if isinstance(event, BatchDone):
            app._stop.set()  # what confirming "Cancel the run?" does

    app.sink = stop_after_first_batch  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot, cap_s=300)
        assert app.state.run_state.status == "interrupted", app.state.run_state.error
        assert app.state.run_state.checkpoint is not None and app.state.run_state.checkpoint.batch == 1
        assert app.screen.id == "run"
        await pilot.press("ctrl+q")
        await pilot.pause()

    again = PruneApp(path, cpu_flops=50e9)
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(again.screen, ConfirmScreen), cap_s=120, what="resume question")
        await pilot.press("y")
        await settle(again, pilot, cap_s=300)
        assert again.state.run_state.status == "done", again.state.run_state.error
        assert again.state.run_state.batch is not None and again.state.run_state.batch.resumed_from == 1
        assert again.state.run_state.batch.batch == 4


async def test_tui_run_writes_what_prune_run_writes(tmp_path: Path) -> None:
    """One tiny-model session through `prune run` and through the workbench (ctrl+r): the same pruning
    (mask_sha256), the same perplexities, and the pruned model saved in both results folders."""
    import json

    from typer.testing import CliRunner

    from cli.main import app as cli_app
    from tests.helpers import tiny_session

    session = tiny_session(tmp_path, "parity", **{"output.save_model": True, "evaluation.before": True,
                                                  "evaluation.after": True})
    path = sessions.save(session, tmp_path / "parity.toml")
    cli_dir = tmp_path / "cli"
    result = CliRunner().invoke(cli_app, ["run", str(path), "--out", str(cli_dir)])
    assert result.exit_code == 0, result.output

    app = PruneApp(path, cpu_flops=50e9)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot, cap_s=300)
        assert app.state.run_state.status == "done", app.state.run_state.error
        assert isinstance(app.screen, ResultsScreen)
        assert "PPL" in shown(app.screen.query_one("#results-headline"))
    tui_dir = tmp_path / "runs" / "parity"

    cli_metrics = json.loads((cli_dir / "metrics.json").read_text(encoding="utf-8"))
    tui_metrics = json.loads((tui_dir / "metrics.json").read_text(encoding="utf-8"))
    assert cli_metrics["mask_sha256"] and tui_metrics["mask_sha256"] == cli_metrics["mask_sha256"]
    for which in ("before", "after"):
        assert tui_metrics["perplexity"][which]["ppl"] == pytest.approx(cli_metrics["perplexity"][which]["ppl"])
    for folder in (cli_dir, tui_dir):
        assert (folder / "model" / "pruning.json").is_file(), folder
        assert (folder / "model" / "config.json").is_file(), folder

    # reopening the session shows its finished results at once (read back, nothing recomputed)
    again = PruneApp(path, cpu_flops=50e9)
    async with again.run_test(size=SIZE) as pilot:
        await settle(again, pilot)
        assert again.state.results is not None and again.state.results.from_folder
        assert isinstance(again.screen, ResultsScreen) and again.state.run_state.stages == {}
        assert again.state.results.metrics["mask_sha256"] == cli_metrics["mask_sha256"]


async def test_tune_from_the_palette_applies_the_best_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a run, the palette's "Tune the knobs" runs `prune tune` on the app's memo (no new
    importance pass), then shows the best session's allocation and proxy, unsaved until ctrl+s."""
    from prune_core.tune import TuneResult
    from tests.helpers import tiny_session
    from tui import jobs

    results: list[TuneResult] = []
    real_tune = jobs.tune_knobs

    def short_tune(ctx, session, budget_s: float = 60.0):  # type: ignore[no-untyped-def]
        import prune_core.tune as tune_mod

        original = tune_mod.tune

        def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["budget_s"] = 8.0
            out = original(*args, **kwargs)
            results.append(out)
            return out

        monkeypatch.setattr(tune_mod, "tune", recording)
        return real_tune(ctx, session, budget_s)

    monkeypatch.setattr(jobs, "tune_knobs", short_tune)
    session = tiny_session(tmp_path, "tuned", **{"evaluation.before": False, "evaluation.after": False,
                                                 "output.save_model": False})
    path = sessions.save(session, tmp_path / "tuned.toml")
    app = PruneApp(path, cpu_flops=50e9)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot, cap_s=300)
        assert app.state.run_state.status == "done", app.state.run_state.error
        await run_from_palette(app, pilot, "tune the knobs", "Tune")
        await wait_for(pilot, lambda: bool(results), what="tune finished", cap_s=300)
        await settle(app, pilot, cap_s=300)
        result = results[0]
        assert len(result.trials) > 1 and result.best_proxy <= result.base_proxy
        assert app.state.session == result.best
        assert app.state.results is not None and app.state.results.allocation is not None
        assert app.state.results.metrics.get("proxy", {}).get("loss") == pytest.approx(result.best_proxy)
        # the importance pass is reused from the memo, not recomputed
        assert app.state.run_state.stages["importance"].status in ("done", "cached")
        if result.best_updates:
            assert app.title == "prune — tuned *"
