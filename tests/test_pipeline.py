"""End-to-end tests of `prune run`: every results file and key, the stage cache, bad input."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.helpers import tiny_session, write_session

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("e2e")
    path = write_session(tmp / "s.toml", tiny_session(tmp, name="e2e"))
    code, out, err = run_cli("run", str(path), "--json")
    assert code == 0, err
    return tmp / "runs" / "e2e", events_of(out)


def test_results_folder_has_every_file(finished_run: tuple[Path, list[dict]]) -> None:
    res, _ = finished_run
    for rel in [
        "session.toml", "metrics.json",
        "analysis/global_group_table.csv", "analysis/pruning_summary_by_layer.csv",
        "analysis/pruning_summary_by_layer.txt", "analysis/gradient_statistics.json",
        "analysis/gradient_diagnosis.json", "visualization/gradient_analysis.png",
        "model/model.safetensors", "model/config.json", "model/pruning.json",
        "state/calibration_tokens.safetensors",
    ]:
        assert (res / rel).is_file(), rel
    assert not list(res.rglob("*.tmp")), "no temporary files are left behind"


def test_session_toml_is_resolved_with_provenance(finished_run: tuple[Path, list[dict]]) -> None:
    res, _ = finished_run
    data = tomllib.loads((res / "session.toml").read_text())
    assert data["evaluation"]["dataset"] == "shakespeare"  # the implicit default written out
    assert data["pruning"]["ratio"] == 0.3
    prov = data["provenance"]
    for key in ["project", "torch", "transformers", "datasets", "git", "device", "dtype", "model_id",
                "model_revision", "model_fingerprint", "data_fingerprint", "started", "finished", "world_size"]:
        assert key in prov, key
    assert len(prov["data_fingerprint"]) == 64
    assert prov["world_size"] == 1


def test_metrics_json_keys(finished_run: tuple[Path, list[dict]]) -> None:
    res, _ = finished_run
    m = json.loads((res / "metrics.json").read_text())
    p = m["parameters"]
    assert p["total_before"] - p["total_after"] == p["prunable_before"] - p["prunable_after"] == p["removed"] > 0
    assert p["total_after_surgery"] == p["total_after"]
    assert m["ratio"]["target"] == 0.3
    assert 0.3 <= m["ratio"]["achieved"] < 0.4
    for which in ("before", "after"):
        ppl = m["perplexity"][which]
        assert ppl["ppl"] > 1 and ppl["seq_len"] == 64 and ppl["dataset"] == "shakespeare"
    assert set(m["stage_seconds"]) >= {"model", "calibration", "importance", "allocation", "surgery", "eval_before",
                                        "eval_after", "diagnosis", "save_model"}
    assert len(m["mask_sha256"]) == 64


def test_json_events_and_summary(finished_run: tuple[Path, list[dict]]) -> None:
    _, events = finished_run
    kinds = [e["kind"] for e in events]
    assert "batch_done" in kinds and "stage_started" in kinds and "run_done" in kinds
    assert events[-1]["kind"] == "summary"
    assert sum(1 for e in events if e["kind"] == "batch_done") == 4  # 8 samples / batch 2


def test_ratio_change_reuses_importance_and_matches_fresh_run(tmp_path: Path) -> None:
    first = write_session(tmp_path / "a.toml", tiny_session(tmp_path, name="wi", **{"evaluation.after": False}))
    assert run_cli("run", str(first), "--json")[0] == 0
    second = write_session(tmp_path / "a.toml", tiny_session(tmp_path, name="wi", **{"evaluation.after": False,
                                                                                     "pruning.ratio": 0.45}))
    code, out, err = run_cli("run", str(second), "--json")
    assert code == 0, err
    events = events_of(out)
    imp = [e for e in events if e["kind"] == "stage_done" and e["stage"] == "importance"]
    assert imp and imp[0]["cached"] is True
    assert not any(e["kind"] == "batch_done" for e in events)
    metrics = json.loads((tmp_path / "runs" / "wi" / "metrics.json").read_text())
    assert "importance" in metrics["stages_cached"]
    fresh = write_session(tmp_path / "b.toml", tiny_session(tmp_path, name="fresh", **{"evaluation.after": False,
                                                                                       "pruning.ratio": 0.45}))
    assert run_cli("run", str(fresh), "--json", "--fresh")[0] == 0
    fresh_metrics = json.loads((tmp_path / "runs" / "fresh" / "metrics.json").read_text())
    assert fresh_metrics["mask_sha256"] == metrics["mask_sha256"]
    assert "importance" not in fresh_metrics["stages_cached"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "does not exist"),
        ("[pruning\nratio = 0.2", "invalid TOML"),
        ("[pruning]\nrato = 0.2\n", "unknown key"),
        ("[pruning]\nratio = 1.5\n", "pruning.ratio"),
        ("[model]\nid = 'no-such-model-xyz'\ndevice='cpu'\n", "no-such-model-xyz"),
        ("[model]\nid = 'tiny-llama'\ndevice='cpu'\n[data]\ndataset = 'no-such-dataset.bin'\n", "no-such-dataset"),
        ("[model]\nid = 'tiny-llama'\ndevice='cpu'\n[pruning]\nprotect_layers = [99]\n", "protect_layers"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content + f"\n[session]\noutput_dir = '{tmp_path / 'runs'}'\n"
                        if "[session]" not in content else content)
    code, out, err = run_cli("run", str(path))
    assert code == 2, (out, err)
    assert needle in err
    assert err.strip().startswith("error:")
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_final_proxy_sees_the_saved_model_and_equals_the_masked_proxy_without_compensation(tmp_path: Path) -> None:
    """The masked proxy equals removal without compensation, so with compensate = "none" and no
    distillation the final model's proxy is the same number; reconstruction changes it."""
    from prune_core import pipeline

    base = tiny_session(tmp_path, **{"data.proxy_samples": 2, "evaluation.before": False,
                                     "output.save_model": False, "pruning.compensate": "none"})
    memo = pipeline.Memo()
    plain = pipeline.run(base, memo=memo, write=False)
    assert plain.proxy["final"] == pytest.approx(plain.proxy["loss"], rel=1e-5)
    rebuilt = pipeline.run(base.with_updates({"pruning.compensate": "reconstruct"}), memo=memo, write=False)
    assert rebuilt.proxy["loss"] == plain.proxy["loss"], "the allocation's proxy does not see compensation"
    assert rebuilt.proxy["final"] != pytest.approx(plain.proxy["final"], rel=1e-6)
    off = pipeline.run(base.with_updates({"evaluation.after": False}), memo=memo, write=False)
    assert "final" not in off.proxy, "no surgery, no final proxy"


def test_min_rate_that_removes_more_than_the_ratio_is_announced(tmp_path: Path) -> None:
    from prune_core import pipeline
    from prune_core.events import Notice

    events: list[object] = []
    session = tiny_session(tmp_path, **{"pruning.ratio": 0.1, "pruning.min_rate": 0.6, "data.proxy_samples": 0})
    report = pipeline.run(session, until="allocation", write=False, on_event=events.append)
    assert report.achieved_ratio > 0.5
    warnings = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert any("min_rate 0.6 alone removes" in m and "lower [pruning] min_rate" in m for m in warnings), warnings
    inert = tiny_session(tmp_path, **{"pruning.early_max_rate": 0.3, "data.proxy_samples": 0})
    events.clear()
    pipeline.run(inert, until="allocation", write=False, on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert any("early_max_rate = 0.3 has no effect while early_layers = 0" in m for m in warnings), warnings
