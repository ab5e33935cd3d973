"""Issue 13, "Nothing lost, nothing run": each numbered finding reproduced and shown fixed.

1. an interrupted re-run leaves the previous complete results (and `prune show` agrees with them);
2. a checkpoint or cached stage changed after it was written is refused, naming the file and --fresh;
3. `--out` never overwrites files that are not a results folder's own;
4. trust is never inherited from a folder (`fix --apply`, `RunReport.read`), and is a strict boolean;
5. checks that can be made before the expensive work are made before it, and by `prune validate`;
6. messages are printed as text, never as Rich markup;
7. damaged results folders exit cleanly (2), never with a traceback;
9. minors: the resume hint keeps `--out`, a checkpoint made for other inputs is named and removed,
   every file is written 0644 (umask 022), a session file may start with a byte-order mark.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from prune_core import pipeline, report
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import Notice
from prune_core.fixes import apply_fix
from prune_core.importance import run_importance
from prune_core.report import RunReport
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session, write_session

runner = CliRunner()
FAST = {"evaluation.before": False, "evaluation.after": False, "data.proxy_samples": 0}


def invoke(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout + r.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (ratio 0.2, model saved) to copy and damage."""
    tmp = tmp_path_factory.mktemp("robust")
    session = tiny_session(tmp, name="a", **{**FAST, "pruning.ratio": 0.2})
    pipeline.run(session, out_dir=tmp / "k")
    return tmp / "k"


def copy_of(folder: Path, tmp_path: Path, name: str = "k") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


# ---------------------------------------------------------------------------------------------- 1. atomic folder
class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_interrupted_rerun_leaves_previous_results(finished: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    k = copy_of(finished, tmp_path)
    before = snapshot(k)
    import prune_core.visualize as visualize

    def die(*args: object, **kw: object) -> None:
        raise Killed  # mid-`save`: the model and the tables of the new run are already written (staged)

    monkeypatch.setattr(visualize, "write_gradient_png", die)
    b = tiny_session(tmp_path, name="b", **{**FAST, "pruning.ratio": 0.35})
    with pytest.raises(Killed):
        pipeline.run(b, out_dir=k)
    monkeypatch.undo()
    after = {n: v for n, v in snapshot(k).items() if not n.startswith((".staging/", "state/", "events.ndjson"))}
    assert after == {n: v for n, v in before.items() if not n.startswith(("state/", "events.ndjson"))}
    read = RunReport.read(k)
    assert read.target_ratio == pytest.approx(0.2)
    recipe = json.loads((k / "model" / "pruning.json").read_text())
    assert recipe["session"]["pruning"]["ratio"] == pytest.approx(0.2)
    code, text = invoke("show", str(k))
    assert code == 0 and "target 20.0%" in text, text
    # the next run cleans the staging area and replaces the whole set
    pipeline.run(b, out_dir=k)
    assert not (k / report.STAGING).exists()
    assert RunReport.read(k).target_ratio == pytest.approx(0.35)
    assert json.loads((k / "model" / "pruning.json").read_text())["session"]["pruning"]["ratio"] == pytest.approx(0.35)


def test_crash_during_the_swap_rolls_back(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = copy_of(finished, tmp_path)
    before = RunReport.read(k).metrics["mask_sha256"]
    real = report.os.replace
    calls = {"n": 0}

    def replace(src: object, dst: object) -> None:
        calls["n"] += 1
        if Path(str(dst)) == k / report.MANIFEST:
            raise Killed  # every entry swapped, the manifest (the commit point) not yet
        real(src, dst)

    monkeypatch.setattr(report.os, "replace", replace)
    b = tiny_session(tmp_path, name="b", **{**FAST, "pruning.ratio": 0.35})
    with pytest.raises(Killed):
        pipeline.run(b, out_dir=k)
    monkeypatch.undo()
    assert (k / report.PREVIOUS).is_dir()
    again = RunReport.read(k)  # rolls the interrupted swap back
    assert again.metrics["mask_sha256"] == before and again.target_ratio == pytest.approx(0.2)
    assert not (k / report.PREVIOUS).exists()
    assert report.manifest_problems(k) == []


def test_a_changed_file_is_refused_by_show(finished: Path, tmp_path: Path) -> None:
    k = copy_of(finished, tmp_path)
    metrics = json.loads((k / "metrics.json").read_text())
    metrics["ratio"]["target"] = 0.35
    (k / "metrics.json").write_text(json.dumps(metrics))
    code, text = invoke("show", str(k))
    assert code == 2 and "metrics.json" in text and "manifest" in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------- 2. checksums
TOKENS = torch.randint(0, 256, (10, 12), generator=torch.Generator().manual_seed(11))


def _interrupted(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = build_tiny("tiny-llama")[0]
    from prune_core.adapters import get_adapter

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        run_importance(model, get_adapter(model), TOKENS, method="taylor", batch_size=2, checkpoint_dir=ckpt,
                       should_stop=stop)
    return model, ckpt


def test_flipped_bits_in_a_checkpoint_are_refused(tmp_path: Path) -> None:
    from prune_core.adapters import get_adapter

    model, ckpt = _interrupted(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    tensors = ckpt / manifest["tensors"]
    data = bytearray(tensors.read_bytes())
    for i in range(len(data) - 64, len(data) - 4, 4):
        data[i + 3] ^= 0x40  # exponent bits of float32 values near the end of the grad sums
    tensors.write_bytes(bytes(data))
    with pytest.raises(RunFailed, match="--fresh") as info:
        run_importance(model, get_adapter(model), TOKENS, method="taylor", batch_size=2, checkpoint_dir=ckpt)
    assert manifest["tensors"] in str(info.value)


def test_edited_next_batch_is_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    from prune_core.adapters import get_adapter
    from prune_core.digest import file_sha256

    model, ckpt = _interrupted(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    meta_path = ckpt / manifest["meta"]
    meta = json.loads(meta_path.read_text())
    meta["next_batch"] += 1
    meta_path.write_text(json.dumps(meta))
    manifest["sha256"][manifest["meta"]] = file_sha256(meta_path)  # a careful forger
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFailed, match="batch statistics") as info:
        run_importance(model, get_adapter(model), TOKENS, method="taylor", batch_size=2, checkpoint_dir=ckpt)
    assert "--fresh" in str(info.value)


def test_changed_cached_stage_is_refused_and_fresh_recomputes(finished: Path, tmp_path: Path) -> None:
    k = copy_of(finished, tmp_path)
    [folder] = (k / "state" / "importance").iterdir()
    path = folder / "importance.json"
    path.write_text(path.read_text().replace('"batches": 4', '"batches": 5'))
    session = tiny_session(tmp_path, name="a", **{**FAST, "pruning.ratio": 0.2})
    with pytest.raises(RunFailed, match="--fresh") as info:
        pipeline.run(session, out_dir=k)
    assert "importance.json" in str(info.value)
    assert pipeline.run(session, out_dir=k, fresh=True).metrics["importance"]["batches"] == 4


# ---------------------------------------------------------------------------------------------- 3. --out
def test_out_dot_with_the_users_session_is_refused(tmp_path: Path) -> None:
    own = tmp_path / "proj"
    own.mkdir()
    text = "# my notes\n" + (write_session(tmp_path / "x.toml", tiny_session(tmp_path, **FAST))).read_text()
    (own / "session.toml").write_text(text)
    before = snapshot(own)
    code, out = invoke("run", str(own / "session.toml"), "--out", str(own))
    assert code == 2 and "not a results folder" in out and "Traceback" not in out, out
    assert snapshot(own) == before and sorted(p.name for p in own.iterdir()) == ["session.toml"]


def test_out_folder_holding_only_a_users_metrics_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(BadInput, match="not a results folder"):
        report.check_out_folder(folder)
    report.check_out_folder(tmp_path / "new")  # a new folder is fine
    (tmp_path / "interrupted" / "state").mkdir(parents=True)
    report.check_out_folder(tmp_path / "interrupted")  # so is an interrupted first run's


# ---------------------------------------------------------------------------------------------- 4. trust
def test_malicious_fix_and_trusting_folder_are_refused(finished: Path, tmp_path: Path) -> None:
    k = copy_of(finished, tmp_path)
    session_toml = k / "session.toml"
    session_toml.write_text(session_toml.read_text().replace("trust_remote_code = false", "trust_remote_code = true"))
    diag_path = k / "analysis" / "gradient_diagnosis.json"
    diag = json.loads(diag_path.read_text())
    diag["diagnosis"] = [{"issue": "evil", "severity": "high", "fix": {"model.trust_remote_code": True}},
                         {"issue": "fine", "severity": "high", "fix": {"pruning.max_rate": 0.5}}]
    diag_path.write_text(json.dumps(diag))
    # the folder was changed after its run: refused as a whole
    code, out = invoke("fix", str(k), "--apply", "1")
    assert code == 2 and "manifest" in out
    (k / report.MANIFEST).unlink()  # a folder without a manifest (an older version's) is read as it is
    assert RunReport.read(k).session.model.trust_remote_code is False
    code, out = invoke("fix", str(k), "--apply", "1")
    assert code == 2 and "model.trust_remote_code" in out and "Traceback" not in out, out
    assert not (k.parent / "a-fix1.toml").exists()
    fixed = apply_fix(k, {"pruning.max_rate": 0.5}, tmp_path / "fixed.toml", name="a-fix2")
    assert fixed.model.trust_remote_code is False
    assert "trust_remote_code = false" in (tmp_path / "fixed.toml").read_text()


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"'])
def test_trust_remote_code_is_a_strict_boolean(tmp_path: Path, value: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f"[model]\nid = \"tiny-llama\"\ntrust_remote_code = {value}\n")
    code, out = invoke("validate", str(path))
    assert code == 2 and "model.trust_remote_code" in out


# ---------------------------------------------------------------------------------------------- 5. up front
def _toml(tmp_path: Path, extra: str, name: str = "s.toml") -> Path:
    base = write_session(tmp_path / name, tiny_session(tmp_path, **FAST)).read_text()
    path = tmp_path / name
    path.write_text(base + "\n" + extra)
    return path


def _with(tmp_path: Path, **updates: object) -> Path:
    return write_session(tmp_path / "s.toml", tiny_session(tmp_path, **{**FAST, **updates}))


@pytest.mark.parametrize("updates, key", [
    ({"evaluation.dataset": "./missing-eval.txt", "evaluation.after": True}, "evaluation.dataset"),
    ({"data.dataset": "./no/such/corpus.txt"}, "data.dataset"),
    ({"pruning.protect_layers": [2, 9]}, "pruning.protect_layers"),
    ({"model.id": "./no/such/model"}, "model.id"),
    ({"evaluation.max_tokens": 16, "evaluation.after": True}, "evaluation.max_tokens"),
])
def test_late_checks_are_made_before_any_work(tmp_path: Path, updates: dict, key: str) -> None:
    path = _with(tmp_path, **updates)
    code, out = invoke("validate", str(path))
    assert code == 2 and key in out, out
    code, out = invoke("run", str(path))
    assert code == 2 and key in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()  # nothing written, no state/ left behind


def test_short_local_texts_are_caught_by_validate(tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("to be or not to be\n" * 40)  # ~760 bytes: 90 % calibration, ~76 bytes evaluation
    path = _with(tmp_path, **{"data.dataset": str(corpus), "evaluation.after": True, "evaluation.seq_len": 128,
                              "correction.temperature": 1.0, "correction.samples": 4000})
    code, out = invoke("validate", str(path))
    assert code == 2 and "evaluation.seq_len" in out and "correction.samples" in out, out


def test_cuda_without_cuda_is_caught_by_validate(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = invoke("validate", str(_with(tmp_path, **{"model.device": "cuda"})))
    assert code == 2 and "model.device" in out


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("case", ["output_dir_file", "output_dir_device", "long_output_dir", "long_out",
                                  "out_is_file"])
def test_unwritable_results_folders_are_caught_before_any_work(tmp_path: Path, case: str) -> None:
    (tmp_path / "afile").write_text("mine\n")
    long_name = "x" * 300
    updates: dict[str, object] = {
        "output_dir_file": {"session.output_dir": str(tmp_path / "afile")},
        "output_dir_device": {"session.output_dir": "/dev/null"},
        "long_output_dir": {"session.output_dir": str(tmp_path / long_name)},
    }.get(case, {})
    out_args = {"long_out": ["--out", str(tmp_path / long_name)],
                "out_is_file": ["--out", str(tmp_path / "afile")]}.get(case, [])
    path = _with(tmp_path, **updates)
    key = "--out" if out_args else "session.output_dir"
    before = _tree(tmp_path)
    if not out_args:  # validate checks <output_dir>/<name>, the folder `prune run SESSION` writes
        code, out = invoke("validate", str(path))
        assert code == 2 and key in out and "fix:" in out and "Traceback" not in out, out
    code, out = invoke("run", str(path), *out_args)
    assert code == 2 and key in out and "fix:" in out and "Traceback" not in out, out
    assert "bytes long" in out if "long" in case else "not a folder" in out, out
    assert _tree(tmp_path) == before and (tmp_path / "afile").read_text() == "mine\n"  # nothing written


def test_read_only_results_folder_is_caught_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    path = _with(tmp_path, **{"session.output_dir": str(ro)})
    if os.geteuid() == 0:  # root writes through permission bits: stand in for a folder this user may not write
        real = os.access

        def access(p: object, mode: int, **kw: object) -> bool:
            return False if isinstance(p, str | Path) and Path(p) == ro else real(p, mode, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", access)
    ro.chmod(0o555)
    try:
        for args in (("validate", str(path)), ("run", str(path)), ("run", str(path), "--out", str(ro / "k"))):
            code, out = invoke(*args)
            assert code == 2 and "not writable" in out and "chmod u+w" in out and "Traceback" not in out, out
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_huge_correction_samples_are_caught_before_any_work(tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("to be or not to be\n" * 200)
    path = _with(tmp_path, **{"data.dataset": str(corpus), "correction.temperature": 1.0, "correction.samples": 4000})
    for cmd in ("validate", "run"):
        code, out = invoke(cmd, str(path))
        assert code == 2 and "correction.samples" in out and "num_samples" not in out, out
    assert not (tmp_path / "runs").exists()


def test_the_late_window_message_names_the_settings_asked_for(tmp_path: Path) -> None:
    from prune_core.data import calibration_tokens
    from prune_core.tiny import make_tokenizer

    corpus = tmp_path / "small.txt"
    corpus.write_text("to be or not to be\n" * 200)
    with pytest.raises(BadInput) as info:
        calibration_tokens(make_tokenizer(), str(corpus), 4000, 128, 0, keys=("correction.samples", "correction.seq_len"))
    assert "correction.samples" in str(info.value) and "num_samples" not in str(info.value)


def test_cached_builtin_texts_are_measured_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prune_core import datasources

    monkeypatch.setenv("PRUNE_CACHE_DIR", str(tmp_path / "cache"))
    datasources.write_text_cache("wikipedia", {"calibration": "short text\n" * 100, "evaluation": "x" * 5000}, {})
    path = _with(tmp_path, **{"data.dataset": "wikipedia", "data.num_samples": 4000})
    code, out = invoke("validate", str(path))
    assert code == 2 and "data.num_samples" in out and "wikipedia" in out, out


# ---------------------------------------------------------------------------------------------- 6. markup
@pytest.mark.parametrize("name", ["nope[/].toml", "nope[bold].toml"])
def test_brackets_are_printed_literally(tmp_path: Path, name: str) -> None:
    code, out = invoke("validate", str(tmp_path / name))
    assert code == 2 and name in out and "Traceback" not in out and "MarkupError" not in out


def test_dataset_with_brackets_is_reported_literally(tmp_path: Path) -> None:
    path = _with(tmp_path, **{"data.dataset": "./corpus[/]v2.txt"})
    code, out = invoke("validate", str(path))
    assert code == 2 and "corpus[/]v2.txt" in out and "MarkupError" not in out, out


# ---------------------------------------------------------------------------------------------- 7. damaged folders
DAMAGE = {
    "session_invalid_toml": ("session.toml", b"[model\nid = "),
    "session_binary": ("session.toml", b"\xff\xfe\x00\x00garbage"),
    "metrics_list": ("metrics.json", b"[]"),
    "metrics_wrong_types": ("metrics.json", b'{"ratio": {"target": "x", "achieved": []}, "parameters": "p"}'),
    "table_wrong_columns": ("analysis/global_group_table.csv", b"a,b\n1,2\n"),
    "table_text_layer": ("analysis/global_group_table.csv",
                         b"layer_idx,group_type,group_idx,pruned\nx,attention,0,True\n"),
    "summary_text_layer": ("analysis/pruning_summary_by_layer.csv", b"layer_idx,attention_rate,mlp_rate\nx,y,z\n"),
    "diagnosis_string": ("analysis/gradient_diagnosis.json", b'{"diagnosis": "oops"}'),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_folders_exit_2_without_traceback(finished: Path, tmp_path: Path, case: str) -> None:
    k = copy_of(finished, tmp_path)
    (k / report.MANIFEST).unlink()  # damage the files themselves, not only their manifest
    rel, data = DAMAGE[case]
    (k / rel).write_bytes(data)
    before = snapshot(k)
    for args in (("show", str(k)), ("compare", str(k), str(finished)), ("fix", str(k))):
        code, out = invoke(*args)
        assert code == 2 and "Traceback" not in out, (args, out)
    assert snapshot(k) == before


def test_fix_on_a_folder_without_analysis_says_so(finished: Path, tmp_path: Path) -> None:
    k = copy_of(finished, tmp_path)
    (k / report.MANIFEST).unlink()
    shutil.rmtree(k / "analysis")
    code, out = invoke("fix", str(k))
    assert code == 0 and "no diagnosis" in out and "healthy" not in out


def test_eval_on_a_list_valued_pruning_json(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "pruning.json").write_text("[]")
    code, out = invoke("eval", str(model))
    assert code == 2 and "Traceback" not in out


# ---------------------------------------------------------------------------------------------- 9. minors
def _ctrl_c_three_times(*args: object, **kw: object) -> None:
    """Stands for a run the user stops at once: Ctrl-C, Ctrl-C (the warning), Ctrl-C (confirmed)."""
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this (the main) thread between two bytecodes
    raise AssertionError("the third Ctrl-C did not stop the run")


def _resume_command(out: str) -> list[str]:
    text = " ".join(out.split())  # undo the console's line wrapping
    return shlex.split(text.split("run `")[-1].split("`")[0])


def test_resume_hint_after_repeated_ctrl_c_keeps_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _with(tmp_path)
    out_dir = tmp_path / "my results"
    monkeypatch.setattr(pipeline, "run", _ctrl_c_three_times)
    code, out = invoke("run", str(path), "--out", str(out_dir))
    assert code == 130 and "stopped at once" in out, out
    assert _resume_command(out) == ["prune", "run", str(path), "--out", str(out_dir)]

    import prune_core.tune

    monkeypatch.setattr(prune_core.tune, "tune", _ctrl_c_three_times)
    code, out = invoke("tune", str(path), "--out", str(out_dir), "--budget", "5")
    assert code == 130, out
    assert _resume_command(out) == ["prune", "tune", str(path), "--budget", "5", "--out", str(out_dir)]


def test_interrupted_fix_says_how_to_resume_it(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = copy_of(finished, tmp_path)
    (k / report.MANIFEST).unlink()
    diag_path = k / "analysis" / "gradient_diagnosis.json"
    diag = json.loads(diag_path.read_text())
    diag["diagnosis"] = [{"issue": "fine", "severity": "high", "fix": {"pruning.max_rate": 0.5}}]
    diag_path.write_text(json.dumps(diag))
    monkeypatch.setattr(pipeline, "run", _ctrl_c_three_times)
    code, out = invoke("fix", str(k), "--apply", "1")
    assert code == 130 and "Traceback" not in out, out
    assert _resume_command(out) == ["prune", "run", str(tmp_path / "a-fix1.toml"), "--out", str(tmp_path / "a-fix1")]


def test_checkpoint_for_other_inputs_is_named_and_removed(tmp_path: Path) -> None:
    session = tiny_session(tmp_path, name="n", **{**FAST, "data.num_samples": 16, "data.batch_size": 2,
                                                  "output.save_model": False})
    seen: list[object] = []
    with pytest.raises(Interrupted):
        pipeline.run(session, on_event=seen.append,
                     should_stop=lambda: sum(getattr(e, "kind", "") == "batch_done" for e in seen) >= 2)
    [old] = (tmp_path / "runs" / "n" / "state" / "checkpoints").iterdir()
    events: list[object] = []
    pipeline.run(session.with_updates({"data.num_samples": 12}), on_event=events.append)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any(str(old) in m and "num_samples: 16 → 12" in m and "not resumed" in m for m in notices), notices
    assert any(m.startswith("removed the checkpoint") for m in notices), notices
    assert not old.exists()


def test_checkpoints_outside_the_stage_cache_are_left_alone(tmp_path: Path) -> None:
    from prune_core.adapters import get_adapter

    model, ckpt = _interrupted(tmp_path)  # tmp_path/ckpt: a library caller's own folder
    events: list[object] = []
    run_importance(model, get_adapter(model), TOKENS[:8], method="taylor", batch_size=2,
                   checkpoint_dir=tmp_path / "other", on_event=events.append)
    assert (ckpt / "manifest.json").is_file()
    assert not any(isinstance(e, Notice) and "other inputs" in e.message for e in events)


def test_every_file_is_written_with_the_usual_permissions(finished: Path, tmp_path: Path) -> None:
    from prune_core.atomic import FILE_MODE, FOLDER_MODE

    _, ckpt = _interrupted(tmp_path)
    paths = [p for root in (finished, ckpt) for p in (root, *root.rglob("*")) if not p.name.startswith(".")]
    assert any(p.suffix == ".safetensors" for p in paths) and (finished / "model").is_dir()
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (FOLDER_MODE if p.is_dir() else FILE_MODE)}
    assert not wrong


def test_a_session_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    import sessions
    from cli.runs_cmd import output_folders

    text = "# my notes\n" + _with(tmp_path, **{"session.output_dir": str(tmp_path / "elsewhere")}).read_text()
    (tmp_path / "project").mkdir()
    path = tmp_path / "project" / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    code, out = invoke("validate", str(path))
    assert code == 0, out
    session = sessions.load(path)
    sessions.save(session.with_updates({"pruning.ratio": 0.25}), path)  # rewriting keeps the user's comments
    assert path.read_text(encoding="utf-8").startswith("# my notes") and sessions.load(path).pruning.ratio == 0.25
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    fixed = apply_fix(path, {"pruning.max_rate": 0.5}, tmp_path / "bom-fix.toml", name="bom-fix")
    assert fixed.pruning.max_rate == 0.5 and "# my notes" in (tmp_path / "bom-fix.toml").read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "elsewhere").mkdir()
    assert tmp_path / "elsewhere" in output_folders(tmp_path / "project")  # `prune ps` reads its output_dir
