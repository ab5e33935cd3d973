"""The CLI's other commands: version, new/validate, models/datasets, show, eval, compare, fix."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sessions
from cli.main import app
from tests.helpers import tiny_session, write_session

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    a = write_session(tmp / "a.toml", tiny_session(tmp, name="a"))
    b = write_session(tmp / "b.toml", tiny_session(tmp, name="b", **{"importance.method": "taylor_2nd",
                                                                      "correction.temperature": 1.0}))
    for p in (a, b):
        code, _, err = invoke("run", str(p))
        assert code == 0, err
    return tmp / "runs" / "a", tmp / "runs" / "b"


def test_version() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and out.startswith("prune ")


def test_new_writes_commented_template_that_validates(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    code, _, _ = invoke("new", str(path))
    assert code == 0
    text = path.read_text()
    assert "# " in text and "[pruning]" in text and "early_max_rate" in text
    from sessions.presets import recommended

    assert sessions.load(path) == recommended()  # `prune new` starts from the measured best configuration
    assert invoke("validate", str(path))[0] == 0
    code, _, err = invoke("new", str(path))
    assert code == 2 and "--force" in err


def test_new_into_a_path_that_cannot_be_a_file_is_bad_input(tmp_path: Path) -> None:
    plain = tmp_path / "realfile"
    plain.write_text("not a folder")
    for target in (plain / "x.toml", plain / "a" / "x.toml"):
        code, _, err = invoke("new", str(target))
        assert code == 2, err
        assert f"{plain} is a file, not a folder" in " ".join(err.split()) and "FileExistsError" not in err
    code, _, err = invoke("new", str(tmp_path), "--force")  # a folder, even with --force
    assert code == 2 and "is a folder, not a file" in err and "IsADirectoryError" not in err
    assert plain.read_text() == "not a folder"


def test_validate_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[pruning]\nratio = 0\nmin_rate = 0.8\nmax_rate = 0.2\n[data]\nnum_samples = 2\n"
                    "batch_size = 4\n[importance]\nmethod = 'magic'\n[nope]\nx = 1\n")
    code, _, err = invoke("validate", str(path))
    assert code == 2
    for needle in ["pruning.ratio", "pruning.min_rate", "data.batch_size", "importance.method",
                   "taylor_2nd", "nope: unknown key"]:
        assert needle in err, needle


def test_models_and_datasets_listings() -> None:
    code, out, _ = invoke("models", "--json")
    rows = {r["key"]: r for r in json.loads(out)}
    assert code == 0 and {"smollm2-135m", "tiny-llama", "tiny-mistral", "tiny-qwen2"} <= set(rows)
    assert rows["tiny-llama"]["cached"] is True
    code, out, _ = invoke("datasets", "--json")
    keys = {r["key"] for r in json.loads(out)}
    assert code == 0 and {"shakespeare", "wikitext2", "c4", "ptb"} <= keys
    assert invoke("models")[0] == 0 and invoke("datasets")[0] == 0


def test_show_and_charts(two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    code, out, _ = invoke("show", str(a), "--charts")
    assert code == 0
    assert "perplexity" in out and str(a) in out
    code, out, _ = invoke("show", str(a), "--json")
    obj = json.loads(out)
    assert obj["mask_sha256"] == json.loads((a / "metrics.json").read_text())["mask_sha256"]
    assert invoke("show", str(a.parent / "missing"))[0] == 2


def test_eval_saved_model_matches_run_ppl(two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    code, out, err = invoke("eval", str(a / "model"), "--seq-len", "64", "--max-tokens", "1024",
                            "--device", "cpu", "--json")
    assert code == 0, err
    ppl = json.loads(out)["ppl"]
    expected = json.loads((a / "metrics.json").read_text())["perplexity"]["after"]["ppl"]
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert invoke("eval", str(a))[0] == 2  # a results folder, not a model folder


def test_eval_defaults_to_the_runs_evaluation_settings_and_names_the_pruned_model(
        two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Without options `prune eval` measures the saved model as the run did ([evaluation] seq_len 64, 1024
    tokens), from the results folder's session or, for a model folder moved out of it, pruning.json's;
    its progress never calls the pruned model's perplexity "before pruning"."""
    import shutil

    a, _ = two_runs
    expected = json.loads((a / "metrics.json").read_text())["perplexity"]["after"]
    moved = tmp_path / "moved-model"
    shutil.copytree(a / "model", moved)
    for model_dir in (a / "model", moved):
        code, out, err = invoke("eval", str(model_dir), "--device", "cpu", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert (result["seq_len"], result["max_tokens"], result["dataset"]) == (64, 1024, "shakespeare")
        assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
        assert "before pruning" not in err and "eval_before" not in err
        assert f"perplexity of {model_dir}" in " ".join(err.split())
    code, out, err = invoke("eval", str(moved), "--device", "cpu", "--seq-len", "32", "--json")
    assert code == 0, err
    assert (json.loads(out)["seq_len"], json.loads(out)["max_tokens"]) == (32, 1024)  # an option still wins


def test_compare_taylor_vs_taylor2nd(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    code, out, _ = invoke("compare", str(a), str(b), "--json")
    assert code == 0
    cmp = json.loads(out)
    assert 0.0 <= cmp["overlap"]["jaccard"] <= 1.0
    assert cmp["identical"] is False
    code, out, _ = invoke("compare", str(a), str(a), "--json")
    assert json.loads(out)["overlap"]["jaccard"] == 1.0
    assert invoke("compare", str(a), str(b))[0] == 0


def test_block_correction_is_cached_in_state(two_runs: tuple[Path, Path]) -> None:
    _, b = two_runs
    assert list((b / "state" / "block_losses").glob("*/COMPLETE"))
    m = json.loads((b / "metrics.json").read_text())
    assert "block_losses" in m["stage_seconds"]


def test_fix_lists_and_applies(tmp_path: Path) -> None:
    session = tiny_session(tmp_path, name="fx", **{"pruning.ratio": 0.6})
    path = write_session(tmp_path / "fx.toml", session)
    assert invoke("run", str(path))[0] == 0
    res = tmp_path / "runs" / "fx"
    code, out, _ = invoke("fix", str(res), "--json")
    findings = json.loads(out)["findings"]
    assert code == 0 and findings
    idx = next((i for i, f in enumerate(findings, 1) if f.get("fix") and f.get("verdict") != "worse"), None)
    if idx is None:
        pytest.skip("no finding with a fix on this run")
    code, out, err = invoke("fix", str(res), "--apply", str(idx))
    assert code == 0, err
    new_session = tmp_path / "runs" / f"fx-fix{idx}.toml"
    assert new_session.is_file()
    fixed = sessions.load(new_session)
    for key, value in findings[idx - 1]["fix"].items():
        section, name = key.split(".")
        assert getattr(getattr(fixed, section), name) == value
    assert "provenance" not in tomllib.loads(new_session.read_text())
    metrics = json.loads((tmp_path / "runs" / f"fx-fix{idx}" / "metrics.json").read_text())
    assert "importance" in metrics["stages_cached"]
    assert "jaccard" in out.lower() or "overlap" in out.lower()
    assert invoke("fix", str(res), "--apply", "99")[0] == 2
    # applying it again never overwrites the written (here: edited) session file without --force
    edited = new_session.read_text() + "# my notes\n"
    new_session.write_text(edited)
    code, _, err = invoke("fix", str(res), "--apply", str(idx))
    assert code == 2, err
    assert f"{new_session} already exists" in " ".join(err.split()) and "--force" in err
    assert new_session.read_text() == edited
    code, out, err = invoke("fix", str(res), "--apply", str(idx), "--force")
    assert code == 0, err
    assert f"overwrote {new_session}" in " ".join(out.split()) and "# my notes" not in new_session.read_text()


def test_help_text_is_plain_so_session_keys_in_brackets_survive() -> None:
    """`[data] seq_len` in a help string is a session key, never Rich markup to be eaten."""
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["plan", "--help"]).output
    assert "(default [data] seq_len)" in " ".join(out.split())
    out = CliRunner().invoke(app, ["recover", "--help"]).output
    assert "Take [recovery], seed and [evaluation] from" in " ".join(out.split())


def test_a_session_file_given_where_a_results_folder_belongs_says_so(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    session = tmp_path / "s.toml"
    session.write_text('[model]\nid = "tiny-llama"\n', encoding="utf-8")
    for args in (["fix", str(session)], ["show", str(session)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "is a file, not a results folder" in result.output and f"prune run {session}" in result.output


def test_eval_refuses_a_results_folder_whose_model_was_changed(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    a, _ = two_runs
    copy = tmp_path / "tampered"
    shutil.copytree(a, copy)
    weights = next((copy / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = invoke("eval", str(copy / "model"), "--seq-len", "64", "--max-tokens", "256", "--device", "cpu")
    assert code == 2 and out == ""
    assert "sha256" in err and weights.name in err


def test_run_json_ends_with_the_end_event_on_stdout_when_the_run_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 5, "num_key_value_heads": 1,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}))
    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="bad", **{"model.id": str(bad)}))
    code, _, err = invoke("validate", str(path))  # validate reads the config as run does
    assert code == 2 and "not a multiple of the number of attention heads" in err
    assert not (tmp_path / "runs" / "bad").exists()
    code, out, err = invoke("run", str(path), "--json")
    assert code == 2, err  # an invalid config is bad input, named with its reason
    assert "not a multiple of the number of attention heads" in err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["kind"] == "run_failed" and "attention heads" in last["message"]


def test_tune_refuses_a_results_folder_another_run_holds(tmp_path: Path) -> None:
    from prune_core import lock

    path = write_session(tmp_path / "s.toml", tiny_session(tmp_path, name="held", **{"data.proxy_samples": 2}))
    folder = tmp_path / "runs" / "held"
    with lock.hold(folder, command="prune run s.toml"):
        code, _, err = invoke("tune", str(path), "--budget", "1")
    assert code == 3, err
    assert "prune run s.toml" in err
    assert not (folder / "state").exists() and not (folder / "tune").exists()
