"""Recovery fine-tuning (prune_core/recovery.py, `prune recover`): LoRA lowers the loss, resume is
bit-identical, the merged folder loads back exactly, bad input exits 2, a damaged checkpoint is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from prune_core import recovery
from prune_core.adapters import get_adapter
from prune_core.data import calibration_tokens
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import Progress
from prune_core.export import load_pruned, save_pruned
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session, write_session

runner = CliRunner()
# remove 1 of 2 KV heads in layers 0-1 and half the MLP channels of layers 1-3
PRUNE = {0: {"attention": [1]}, 1: {"attention": [0], "mlp": list(range(0, 128, 2))},
         2: {"mlp": list(range(64))}, 3: {"mlp": list(range(64, 128))}}
FAST = {"steps": 6, "lr": 5e-3, "rank": 4, "alpha": 8.0, "batch_size": 2, "seq_len": 32, "checkpoint_seconds": 0.0}


def make_results(tmp_path: Path, name: str = "run") -> tuple[Path, object]:
    """A folder holding model/ (a pruned tiny-llama saved by save_pruned); the session it records."""
    session = tiny_session(tmp_path, recovery__steps=6, recovery__batch_size=2, recovery__seq_len=32,
                           evaluation__max_tokens=512)
    model, tokenizer = build_tiny("tiny-llama")
    report = apply_pruning(model, get_adapter(model), PRUNE)
    folder = tmp_path / name
    save_pruned(model, tokenizer, folder / "model", kept=report.kept, source={"id": "tiny-llama"},
                session=session.resolved().to_dict())
    return folder, session


def stop_during(step: int) -> dict[str, Any]:
    """on_event / should_stop of a Ctrl-C arriving during fine-tuning step `step` (1-based)."""
    flag = {"stop": False}

    def sink(event: object) -> None:
        if isinstance(event, Progress) and event.stage == recovery.STAGE and event.done == step:
            flag["stop"] = True

    return {"on_event": sink, "should_stop": lambda: flag["stop"]}


def test_lora_lowers_the_training_loss(tmp_path: Path) -> None:
    folder, _ = make_results(tmp_path)
    model, tokenizer = load_pruned(folder / "model")
    settings = recovery.RecoverySettings(**{**FAST, "steps": 12, "dataset": "shakespeare"})
    tokens = calibration_tokens(tokenizer, "shakespeare", 24, 32, seed=0)

    def loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(m(input_ids=tokens, labels=tokens).loss)

    before = loss(model)
    outcome = recovery.train(model, tokens, settings, seed=0)
    after = loss(outcome.model)
    assert after < before - 0.05, (before, after)
    assert len(outcome.losses) == 12 and all(math.isfinite(v) for v in outcome.losses)
    assert outcome.trainable_parameters > 0
    # LoRA went only where the layout names projections: the removed KV head left no 0-row module behind
    assert outcome.targets and all(t.startswith("model.layers.") for t in outcome.targets)
    assert not any("lora" in n for n, _ in outcome.model.named_parameters())  # merged and unloaded


def test_lora_setup_lets_no_transformers_deprecation_warning_through(tmp_path: Path) -> None:
    """peft reads transformers' deprecated `is_gradient_checkpointing`: that FutureWarning is silenced
    where get_peft_model is called, and only there (the process's warning filters are left as they were)."""
    import warnings

    folder, _ = make_results(tmp_path)
    model, tokenizer = load_pruned(folder / "model")
    settings = recovery.RecoverySettings(**{**FAST, "steps": 1, "dataset": "shakespeare"})
    tokens = calibration_tokens(tokenizer, "shakespeare", 2, 32, seed=0)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recovery.train(model, tokens, settings, seed=0)
        assert warnings.filters[0][0] == "always", "the filter is restored once peft is set up"
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert list(warnings.filters) == filters


def test_targets_follow_the_fused_layout() -> None:
    model, _ = build_tiny("tiny-phi3")
    names = {t.rsplit(".", 1)[-1] for t in recovery.lora_targets(model)}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_interrupt_and_resume_is_bit_identical_and_loads_back(tmp_path: Path) -> None:
    plain, session = make_results(tmp_path, "plain")
    result = recovery.recover(plain, session=session, **FAST)
    assert result.after["ppl"] < result.before["ppl"]
    report = json.loads((plain / recovery.REPORT).read_text())
    assert report["before"]["ppl"] == result.before["ppl"] and len(report["losses"]) == 6
    assert not (plain / recovery.CHECKPOINT_DIR).exists()  # cleared once finished

    stopped, _ = make_results(tmp_path, "stopped")
    with pytest.raises(Interrupted, match="after step 2/6"):
        recovery.recover(stopped, session=session, **stop_during(2), **FAST)
    assert (stopped / recovery.CHECKPOINT_DIR / recovery.MANIFEST).is_file()
    assert not (stopped / recovery.RECOVERED).exists()
    again = recovery.recover(stopped, session=session, **FAST)
    assert again.resumed_from == 2 and again.losses == result.losses

    a = load_file(str(plain / "recovered" / "model.safetensors"))
    b = load_file(str(stopped / "recovered" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original = load_file(str(plain / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], original[k]) for k in a)  # the fine-tuning changed the weights

    # the saved folder gives the in-memory merged model's logits exactly
    model, tokenizer = load_pruned(plain / "model")
    tokens = calibration_tokens(tokenizer, "shakespeare", 12, 32, seed=0)
    merged = recovery.train(model, tokens, recovery.RecoverySettings(**FAST, dataset="shakespeare"), seed=0).model
    loaded, _ = load_pruned(plain / "recovered")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, loaded(input_ids=ids).logits)
    recipe = json.loads((plain / "recovered" / "pruning.json").read_text())
    assert recipe["layers"][0]["attention"]["kept"] == [0]
    assert recipe["source"]["recovery"]["steps"] == 6


def test_a_corrupt_checkpoint_is_refused_naming_the_file_and_fresh(tmp_path: Path) -> None:
    folder, session = make_results(tmp_path)
    with pytest.raises(Interrupted):
        recovery.recover(folder, session=session, **stop_during(1), **FAST)
    ckpt = folder / recovery.CHECKPOINT_DIR
    state = next(ckpt.glob("state-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(RunFailed) as info:
        recovery.recover(folder, session=session, **FAST)
    assert str(state) in str(info.value) and "--fresh" in str(info.value)
    done = recovery.recover(folder, session=session, fresh=True, **FAST)
    assert done.resumed_from == 0 and (folder / "recovered" / "pruning.json").is_file()


def test_other_settings_do_not_resume(tmp_path: Path) -> None:
    folder, session = make_results(tmp_path)
    with pytest.raises(Interrupted):
        recovery.recover(folder, session=session, **stop_during(1), **FAST)
    with pytest.raises(BadInput, match=r"settings\.lr"):
        recovery.recover(folder, session=session, **{**FAST, "lr": 1e-3})


def test_session_gives_the_defaults(tmp_path: Path) -> None:
    s = tiny_session(tmp_path, recovery__steps=7, recovery__lr=0.001, data__dataset="wikipedia")
    settings = recovery.RecoverySettings.from_session(s, rank=3)
    assert (settings.steps, settings.lr, settings.rank, settings.dataset) == (7, 0.001, 3, "wikipedia")


@pytest.mark.parametrize(("args", "needle"), [
    (["--steps", "0"], "steps must be"),
    (["--lr", "nan"], "lr must be a finite"),
    (["--lr", "-1"], "lr must be a finite"),
    (["--rank", "0"], "rank must be"),
    (["--seq-len", "1"], "seq_len must be"),
    (["--dataset", "no-such-dataset"], "unknown dataset"),
])
def test_cli_bad_input_exits_2(tmp_path: Path, args: list[str], needle: str) -> None:
    folder, _ = make_results(tmp_path)
    res = runner.invoke(app, ["recover", str(folder), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Fix:" in res.output
    assert not (folder / "recovered").exists()


def test_cli_bad_folders_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["recover", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["recover", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no pruning.json" in res.output
    folder, _ = make_results(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["recover", str(folder), "--out", str(tmp_path / "busy")])
    assert res.exit_code == 2 and "not a pruned-model folder" in res.output


def test_cli_runs_with_session_file_and_json(tmp_path: Path) -> None:
    folder, session = make_results(tmp_path)
    path = write_session(tmp_path / "s.toml", session.with_updates({"recovery.steps": 3, "recovery.lr": 0.005}))
    res = runner.invoke(app, ["recover", str(folder / "model"), "--session", str(path), "--json",
                              "--checkpoint-seconds", "0"])
    assert res.exit_code == 0, res.output
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["kind"] == "recovery" and len(last["losses"]) == 3 and last["settings"]["lr"] == 0.005
    work = folder / "model-recovery"  # a bare model folder gets its own work folder beside it
    assert (work / "recovered" / "pruning.json").is_file() and (work / "recovery.json").is_file()


def test_workbench_recover_action_runs_the_job(tmp_path: Path) -> None:
    from tui.commands import commands
    from tui.jobs import JobContext
    from tui.jobs import recover as recover_job
    from tui.messages import RecoverRequested

    made = {name: make() for name, _, make in commands() if name.startswith("Recover")}
    assert isinstance(made["Recover (LoRA fine-tune)"], RecoverRequested) and made["Recover fresh"].fresh
    folder, session = make_results(tmp_path)
    events: list[object] = []
    ctx = JobContext(pipeline=None, memo=None, sink=events.append, should_stop=lambda: False,  # type: ignore[arg-type]
                     out_dir=folder)
    result = recover_job(ctx, session.with_updates({"recovery.steps": 2, "recovery.checkpoint_seconds": 0.0}))
    assert len(result.losses) == 2 and (folder / "recovered" / "pruning.json").is_file()
    assert any(isinstance(e, Progress) and e.stage == recovery.STAGE for e in events)


def test_a_new_run_into_the_folder_says_the_recovered_model_is_stale(tmp_path: Path) -> None:
    from prune_core import pipeline
    from prune_core.events import Notice

    session = tiny_session(tmp_path, recovery__steps=6, recovery__batch_size=2, recovery__seq_len=32,
                           evaluation__max_tokens=512, evaluation__before=False, output__save_model=True)
    folder = tmp_path / "results"

    def warnings(s: object) -> list[str]:
        events: list[object] = []
        pipeline.run(s, out_dir=folder, on_event=events.append)
        return [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]

    assert not any("recover" in w for w in warnings(session))
    result = recovery.recover(folder, session=session, **FAST)
    assert json.loads((folder / recovery.REPORT).read_text())["model_sha256"] == result.model_sha256 != ""
    assert recovery.stale_recovery(folder) is None
    stale = [w for w in warnings(session.with_updates({"pruning.ratio": 0.4})) if "recover" in w]
    assert len(stale) == 1 and f"prune recover {folder}" in stale[0]
    assert (folder / recovery.RECOVERED / "model.safetensors").is_file(), "the user's recovered model is kept"
