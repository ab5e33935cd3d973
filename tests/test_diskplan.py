"""Disk space: the saved model's price matches the files a run writes, a run that could not save its model
is refused before any work, and checkpoints that would not fit are skipped with one warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from prune_core import diskplan, pipeline
from prune_core.adapters import get_adapter
from prune_core.errors import Interrupted
from prune_core.events import Checkpointed, Notice
from prune_core.importance import run_importance
from prune_core.memplan import plan_for_session
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session, write_session

runner = CliRunner()
FAST = {"evaluation.before": False, "evaluation.after": False, "data.proxy_samples": 0}


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_disk_bytes_by_hand() -> None:
    counts = {"attention": 1000, "mlp": 3000, "norms": 10, "total": 6010}
    buffers = {"grad_sum": 400, "fisher": 400, "scratch": 99, "input_stats": 8}
    got = diskplan.disk_bytes(counts, buffers, element_bytes=2, ratio=0.25, save_model=True, distill_steps=3)
    # 1000 of the 4000 block parameters go: (6010 − 1000) × 2 bytes; Σg + Fisher + input sums; 3 × 4 bytes × (3000 + 10)
    assert got == {"saved_model": 10020, "importance_checkpoint": 808, "distill_checkpoint": 36120, "peak": 72240}
    off = diskplan.disk_bytes(counts, buffers, element_bytes=2, ratio=0.25, save_model=False)
    assert off["saved_model"] == 0 and off["distill_checkpoint"] == 0 and off["peak"] == 1616


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_the_saved_models_price_is_within_the_margin_of_its_files(tmp_path: Path, ratio: float) -> None:
    session = tiny_session(tmp_path, **FAST, **{"pruning.ratio": ratio})
    report = pipeline.run(session, write=True)
    files = sum(p.stat().st_size for p in (report.results_dir / "model").glob("*.safetensors"))
    priced = plan_for_session(session)["disk"]["saved_model"]
    assert abs(files - priced) <= diskplan.MARGIN * priced, (files, priced)


def test_a_run_whose_model_would_not_fit_is_refused_before_any_work(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskplan, "free_bytes", lambda folder: 1000)
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, **FAST))
    before = _tree(tmp_path)
    for args in (["validate", str(path)], ["run", str(path)]):
        r = runner.invoke(app, args)
        out = r.stdout + r.stderr
        assert r.exit_code == 2 and "session.output_dir" in out and "GiB free" in out, out
        assert "output.save_model = false" in out and "Traceback" not in out, out
    assert _tree(tmp_path) == before  # nothing written
    # without a saved model the same disk is enough for the run's small files
    lean = write_session(tmp_path / "lean.toml", tiny_session(tmp_path, **FAST, **{"output.save_model": False}))
    r = runner.invoke(app, ["validate", str(lean)])
    assert r.exit_code == 0, r.stdout + r.stderr


def test_plan_prints_the_disk_figures(tmp_path: Path) -> None:
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, **FAST, **{"distill.steps": 2}))
    r = runner.invoke(app, ["plan", str(path)])
    assert r.exit_code == 0 and "disk (the results folder holds at most" in r.stdout, r.stdout
    assert "distill checkpoint" in r.stdout
    r = runner.invoke(app, ["plan", str(path), "--json"])
    disk = json.loads(r.stdout)["disk"]
    assert disk["peak"] == max(disk["saved_model"], 2 * disk["importance_checkpoint"], 2 * disk["distill_checkpoint"])


def test_an_importance_checkpoint_that_would_not_fit_is_skipped(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny("tiny-llama")[0]
    tokens = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    monkeypatch.setattr(diskplan, "free_bytes", lambda folder: 1000)
    events: list = []
    with pytest.raises(Interrupted, match="no checkpoint could be written") as caught:
        run_importance(model, get_adapter(model), tokens, method="taylor_2nd", batch_size=2,
                       checkpoint_dir=tmp_path / "c", checkpoint_seconds=0, should_stop=stop, on_event=events.append)
    assert "starts over" in (caught.value.fix or "")
    assert not any(isinstance(e, Checkpointed) for e in events) and not (tmp_path / "c" / "manifest.json").exists()
    warned = [e for e in events if isinstance(e, Notice) and "no importance checkpoint written" in e.message]
    assert len(warned) == 1 and "free disk space" in warned[0].message
