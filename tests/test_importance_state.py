"""Checkpoint / resume of the importance pass, identity checks, and NaN/Inf handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prune_core import atomic
from prune_core.adapters import get_adapter
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import BatchDone, Checkpointed, Notice
from prune_core.importance import run_importance
from prune_core.importance import state as state_module
from prune_core.tiny import build_tiny

TOKENS = torch.randint(0, 256, (10, 12), generator=torch.Generator().manual_seed(11))  # 5 batches of 2
IDENTITY = {"model_fingerprint": "abc", "data_fingerprint": "def"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny("tiny-qwen2")[0]


def stop_after(k: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= k

    return should_stop


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def checkpoint_meta(folder: Path) -> dict:
    return json.loads((folder / manifest_of(folder)["meta"]).read_text())


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / manifest_of(folder)["tensors"])


@pytest.mark.parametrize("method", ["taylor_2nd", "wanda"])
def test_interrupted_pass_resumes_to_identical_scores(
    model: torch.nn.Module, tmp_path: Path, method: str
) -> None:
    adapter = get_adapter(model)
    full = run_importance(model, adapter, TOKENS, method=method, batch_size=2, identity=IDENTITY)
    ckpt = tmp_path / "ckpt"
    events: list = []
    with pytest.raises(Interrupted, match=r"after batch 2/5"):
        run_importance(
            model,
            adapter,
            TOKENS,
            method=method,
            batch_size=2,
            identity=IDENTITY,
            checkpoint_dir=ckpt,
            checkpoint_seconds=3600,
            should_stop=stop_after(2),
            on_event=events.append,
        )
    assert any(isinstance(e, Checkpointed) and e.batch == 2 for e in events)
    assert checkpoint_meta(ckpt)["next_batch"] == 2

    events = []
    resumed = run_importance(
        model,
        adapter,
        TOKENS,
        method=method,
        batch_size=2,
        identity=IDENTITY,
        checkpoint_dir=ckpt,
        checkpoint_seconds=3600,
        on_event=events.append,
    )
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert "resuming from batch 2/5" in notices
    done = [e for e in events if isinstance(e, BatchDone)]
    assert [e.batch for e in done] == [3, 4, 5] and all(e.resumed_from == 2 for e in done)
    assert torch.equal(resumed.attention, full.attention)
    assert torch.equal(resumed.mlp, full.mlp)
    for k in ("o_proj", "down_proj"):
        assert torch.equal(resumed.input_sums[k], full.input_sums[k])
    if method == "taylor_2nd":
        assert torch.equal(resumed.first_order["mlp"], full.first_order["mlp"])
    assert resumed.stats == full.stats
    assert [b["loss"] for b in resumed.batch_stats] == [b["loss"] for b in full.batch_stats]
    assert resumed.input_tokens == full.input_tokens and resumed.tokens == full.tokens
    assert resumed.metadata["resumed_from"] == 2
    # a finished pass removes its checkpoint
    assert not ckpt.exists() or not any(ckpt.iterdir())


def test_checkpoint_every_batch_and_interrupt_without_folder(model: torch.nn.Module, tmp_path: Path) -> None:
    adapter = get_adapter(model)
    events: list = []
    run_importance(
        model,
        adapter,
        TOKENS,
        method="taylor",
        batch_size=2,
        checkpoint_dir=tmp_path / "c",
        checkpoint_seconds=0,
        on_event=events.append,
    )
    assert [e.batch for e in events if isinstance(e, Checkpointed)] == [1, 2, 3, 4]  # not after the last one
    with pytest.raises(Interrupted, match="not kept"):
        run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, should_stop=lambda: True)


def test_checkpoint_with_other_identity_is_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    adapter = get_adapter(model)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        run_importance(
            model,
            adapter,
            TOKENS,
            method="taylor",
            batch_size=2,
            identity=IDENTITY,
            checkpoint_dir=ckpt,
            should_stop=stop_after(1),
        )
    other = {**IDENTITY, "model_fingerprint": "zzz"}
    with pytest.raises(BadInput, match=r"caller\.model_fingerprint") as info:
        run_importance(
            model, adapter, TOKENS, method="taylor", batch_size=2, identity=other, checkpoint_dir=ckpt
        )
    assert "--fresh" in str(info.value) and str(ckpt) in str(info.value)
    with pytest.raises(BadInput, match=r"engine\.batch_size"):
        run_importance(
            model, adapter, TOKENS, method="taylor", batch_size=5, identity=IDENTITY, checkpoint_dir=ckpt
        )
    with pytest.raises(BadInput, match=r"engine\.method"):
        run_importance(
            model, adapter, TOKENS, method="taylor_2nd", batch_size=2, identity=IDENTITY, checkpoint_dir=ckpt
        )
    with pytest.raises(BadInput, match=r"tokens_sha256"):
        run_importance(
            model,
            adapter,
            TOKENS.flip(0),
            method="taylor",
            batch_size=2,
            identity=IDENTITY,
            checkpoint_dir=ckpt,
        )
    # the refused checkpoint is still there and still resumes with the right inputs
    result = run_importance(
        model, adapter, TOKENS, method="taylor", batch_size=2, identity=IDENTITY, checkpoint_dir=ckpt
    )
    assert result.metadata["resumed_from"] == 1


def test_crash_while_writing_leaves_previous_checkpoint_usable(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = get_adapter(model)
    ckpt = tmp_path / "ckpt"
    full = run_importance(model, adapter, TOKENS, method="taylor_2nd", batch_size=2, identity=IDENTITY)
    real_write_json = atomic.write_json
    calls = {"n": 0}

    def crashing_write_json(path, obj, default=None):
        if Path(path).name == "manifest.json":
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint dies after its data files, before the switch
                raise KeyboardInterrupt("power cut")
        return real_write_json(path, obj, default)

    monkeypatch.setattr(state_module, "write_json", crashing_write_json)
    with pytest.raises(KeyboardInterrupt):
        run_importance(
            model,
            adapter,
            TOKENS,
            method="taylor_2nd",
            batch_size=2,
            identity=IDENTITY,
            checkpoint_dir=ckpt,
            checkpoint_seconds=0,
        )
    monkeypatch.setattr(state_module, "write_json", real_write_json)
    assert checkpoint_meta(ckpt)["next_batch"] == 2  # the second checkpoint is the valid one
    assert len(list(ckpt.glob("state-*.safetensors"))) == 2  # the orphan of the third is ignored
    resumed = run_importance(
        model, adapter, TOKENS, method="taylor_2nd", batch_size=2, identity=IDENTITY, checkpoint_dir=ckpt
    )
    assert resumed.metadata["resumed_from"] == 2
    assert torch.equal(resumed.mlp, full.mlp) and torch.equal(resumed.attention, full.attention)


def test_corrupt_checkpoint_is_run_failed(model: torch.nn.Module, tmp_path: Path) -> None:
    adapter = get_adapter(model)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        run_importance(
            model,
            adapter,
            TOKENS,
            method="taylor",
            batch_size=2,
            checkpoint_dir=ckpt,
            should_stop=stop_after(1),
        )
    (ckpt / manifest_of(ckpt)["tensors"]).write_bytes(b"garbage")
    with pytest.raises(RunFailed, match="corrupt"):
        run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, checkpoint_dir=ckpt)
    (ckpt / "manifest.json").write_text("[1, 2]")  # valid JSON, but not a manifest
    with pytest.raises(RunFailed, match=r"manifest\.json is not a JSON object"):
        run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, checkpoint_dir=ckpt)


def test_nan_weight_names_batch_and_parameter(tmp_path: Path) -> None:
    model = build_tiny("tiny-llama")[0]
    adapter = get_adapter(model)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = float("inf")
    for method in ("taylor", "wanda"):
        with pytest.raises(RunFailed, match=r"batch 1/5") as info:
            run_importance(model, adapter, TOKENS, method=method, batch_size=2)
        assert "model.layers.2.mlp.up_proj.weight" in str(info.value)
        assert "float32" in str(info.value) and "shorter sequences" in str(info.value)


def _nan_in_batch(model: torch.nn.Module, batch: int, *, backward: bool):
    """Hook that poisons the forward (or only the backward) of layer 1's o_proj in the given 1-based batch."""
    o_proj = model.model.layers[1].self_attn.o_proj
    seen = {"n": 0}

    def hook(module, args, output):
        if not torch.is_grad_enabled() and backward:
            return None
        seen["n"] += 1
        if backward:
            if seen["n"] == batch:
                output.register_hook(lambda g: torch.full_like(g, float("nan")))
            return None
        return output * float("nan") if seen["n"] >= batch else None  # also in the diagnosing re-run

    return o_proj.register_forward_hook(hook)


@pytest.mark.parametrize("backward", [False, True])
def test_nan_in_later_batch_checkpoints_what_came_before(tmp_path: Path, backward: bool) -> None:
    model = build_tiny("tiny-mistral")[0]
    adapter = get_adapter(model)
    ref_dir = tmp_path / "ref"
    with pytest.raises(Interrupted):
        run_importance(
            model,
            adapter,
            TOKENS,
            method="taylor_2nd",
            batch_size=2,
            identity=IDENTITY,
            checkpoint_dir=ref_dir,
            should_stop=stop_after(2),
        )
    reference = checkpoint_tensors(ref_dir)

    ckpt = tmp_path / "ckpt"
    handle = _nan_in_batch(model, 3, backward=backward)
    try:
        with pytest.raises(RunFailed, match=r"batch 3/5") as info:
            run_importance(
                model,
                adapter,
                TOKENS,
                method="taylor_2nd",
                batch_size=2,
                identity=IDENTITY,
                checkpoint_dir=ckpt,
                checkpoint_seconds=3600,
            )
    finally:
        handle.remove()
    message = str(info.value)
    if backward:  # finite loss, NaN gradient: named by the first parameter backward met it in
        assert "gradient of layers.1." in message
    else:
        assert "layers.1.self_attn.o_proj" in message
    meta = checkpoint_meta(ckpt)
    assert meta["next_batch"] == 2 and len(meta["batch_stats"]) == 2
    saved = checkpoint_tensors(ckpt)
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.isfinite(saved[key]).all(), key
        # streaming mode takes a failing batch back out by subtraction: equal up to rounding
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # and the pass resumes from there once the cause is gone
    resumed = run_importance(
        model, adapter, TOKENS, method="taylor_2nd", batch_size=2, identity=IDENTITY, checkpoint_dir=ckpt
    )
    assert resumed.metadata["resumed_from"] == 2 and torch.isfinite(resumed.mlp).all()


def test_a_failed_batch_that_cannot_be_taken_back_keeps_the_periodic_checkpoint(tmp_path: Path) -> None:
    """On CPU a failed batch is taken back out by running it again; if that fails too, the sums in memory
    are damaged and must not be checkpointed: the periodic checkpoint before the batch is what resumes."""
    model = build_tiny("tiny-llama")[0]
    adapter = get_adapter(model)
    reference = run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, identity=IDENTITY)
    o_proj = model.model.layers[1].self_attn.o_proj
    calls = {"n": 0}

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return None
        calls["n"] += 1
        if calls["n"] == 3:  # batch 3: a NaN gradient
            output.register_hook(lambda g: torch.full_like(g, float("nan")))
        if calls["n"] == 4:  # its recomputation fails
            raise RuntimeError("recomputation failed")
        return None

    ckpt = tmp_path / "ckpt"
    handle = o_proj.register_forward_hook(hook)
    try:
        with pytest.raises(RunFailed, match=r"batch 3/5") as info:
            run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, identity=IDENTITY,
                           checkpoint_dir=ckpt, checkpoint_seconds=0)
    finally:
        handle.remove()
    assert "the last periodic checkpoint" in str(info.value)
    assert checkpoint_meta(ckpt)["next_batch"] == 2  # written after batch 2, never after the failure
    resumed = run_importance(model, adapter, TOKENS, method="taylor", batch_size=2, identity=IDENTITY,
                             checkpoint_dir=ckpt)
    assert resumed.metadata["resumed_from"] == 2
    torch.testing.assert_close(resumed.mlp, reference.mlp, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(resumed.attention, reference.attention, rtol=1e-5, atol=1e-8)


def test_deferred_mode_nan_leaves_sums_untouched() -> None:
    from prune_core.importance.accumulate import GradientAccumulator, NonFiniteGradient

    model = build_tiny("tiny-llama")[0]
    lin = model.model.layers[0].mlp.down_proj
    named = [("w", lin.weight), ("u", model.model.layers[3].mlp.up_proj.weight)]
    ids = TOKENS[:2]
    with GradientAccumulator(named, second_order=True, streaming=False) as acc:
        acc.accumulate(model(ids, labels=ids, use_cache=False).loss, 22.0)
        before = {k: t.clone() for k, t in acc.state_tensors().items()}
        h = lin.register_forward_hook(
            lambda m, a, out: out.register_hook(lambda g: g * float("nan")) and None
        )
        try:
            with pytest.raises(NonFiniteGradient) as info:
                acc.accumulate(model(ids, labels=ids, use_cache=False).loss, 22.0)
        finally:
            h.remove()
    assert info.value.key == "w"
    assert all(torch.equal(before[k], t) for k, t in acc.state_tensors().items())
    assert acc.batches == 1
