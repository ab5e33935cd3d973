"""The dense stream the importance pass records for reconstruction's error feedback: the dense model's
own layer outputs, the same reconstruction as running the dense layers again, and used only where it
belongs (same tokens and batches, a session that reconstructs with feedback)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prune_core.compensation.reconstruct as rc
from prune_core import pipeline
from prune_core.adapters import get_adapter
from prune_core.compensation import prune_and_reconstruct
from prune_core.dense_stream import StreamRecorder, budget_bytes, stream_bytes
from prune_core.importance import run_importance
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session

PRUNE = {0: {"mlp": list(range(0, 128, 3))}, 1: {"attention": [1], "mlp": list(range(40))},
         3: {"mlp": list(range(64))}}


def tokens(n: int = 10, t: int = 16, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def recorded(model: nn.Module, ids: torch.Tensor, batch_size: int, mids: bool) -> object:
    rec = StreamRecorder(ids, batch_size, mids=mids)
    result = run_importance(model, get_adapter(model), ids, method="taylor", batch_size=batch_size, recorder=rec)
    return result.dense_stream


def layer_io(model: nn.Module, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer of a plain no-grad forward: its input, its attention's output, its output."""
    adapter = get_adapter(model)
    seen: list[dict[str, torch.Tensor]] = [{} for _ in adapter.layers(model)]
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        handles.append(layer.register_forward_pre_hook(
            lambda _m, a, k, i=i: seen[i].__setitem__("in", (a[0] if a else k["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(getattr(layer, adapter.attn_name).register_forward_hook(
            lambda _m, _a, y, i=i: seen[i].__setitem__("attn", (y[0] if isinstance(y, tuple) else y).clone())))
        handles.append(layer.register_forward_hook(
            lambda _m, _a, y, i=i: seen[i].__setitem__("out", (y[0] if isinstance(y, tuple) else y).clone())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_recorded_outputs_are_the_dense_models_layer_outputs() -> None:
    model, _ = build_tiny("tiny-llama")
    ids = tokens()
    stream = recorded(model, ids, 4, mids=True)
    assert stream is not None and sorted(stream.outputs) == [0, 1, 2]  # batches of 4, 4 and 2 windows
    for b, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 10)]):
        for li, io in enumerate(layer_io(model, ids[lo:hi])):
            torch.testing.assert_close(stream.outputs[b][li], io["out"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stream.mids[b][li], io["in"] + io["attn"], rtol=1e-5, atol=1e-5)
    assert recorded(model, ids, 4, mids=False).mids is None


def test_gradient_checkpointing_records_the_same_stream() -> None:
    # the checkpointed layers run forward twice (the second time inside the backward): same slots, same values
    model, _ = build_tiny("tiny-llama")
    ids = tokens()
    plain = recorded(model, ids, 4, mids=True)
    rec = StreamRecorder(ids, 4, mids=True)
    again = run_importance(model, get_adapter(model), ids, method="taylor", batch_size=4, recorder=rec,
                           gradient_checkpointing=True).dense_stream
    assert again is not None
    for b in plain.outputs:
        for li in range(len(plain.outputs[b])):
            torch.testing.assert_close(again.outputs[b][li], plain.outputs[b][li])
            torch.testing.assert_close(again.mids[b][li], plain.mids[b][li])


@pytest.mark.parametrize("mids", [True, False])
def test_reconstruction_with_the_recorded_stream_equals_running_the_dense_layers(
        mids: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dense, _ = build_tiny("tiny-llama")
    ids = tokens()
    stream = recorded(dense, ids, 4, mids=mids)
    ran: list[int] = []
    original = rc._dense_layer

    def counted(layer: nn.Module, attention: nn.Module, inputs: list, calls: list, li: int) -> tuple:
        ran.append(li)
        return original(layer, attention, inputs, calls, li)

    monkeypatch.setattr(rc, "_dense_layer", counted)
    a = copy.deepcopy(dense)
    prune_and_reconstruct(a, get_adapter(a), PRUNE, ids, ridge=0.3, batch_size=4, error_feedback=0.5,
                          dense_stream=stream)
    # with mid-layer states nothing of the dense model runs again; without, only the layer whose
    # attention is pruned (for its stream after the attention)
    assert ran == ([] if mids else [1])
    ran.clear()
    b = copy.deepcopy(dense)
    prune_and_reconstruct(b, get_adapter(b), PRUNE, ids, ridge=0.3, batch_size=4, error_feedback=0.5)
    assert ran == [0, 1, 2, 3]  # from the first pruned layer on, every layer on the dense stream
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        torch.testing.assert_close(p, pb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_stream_of_other_tokens_or_batches_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    dense, _ = build_tiny("tiny-llama")
    ids = tokens()
    stream = recorded(dense, ids, 4, mids=True)
    ran: list[int] = []
    original = rc._dense_layer
    monkeypatch.setattr(rc, "_dense_layer", lambda *a: ran.append(a[-1]) or original(*a))
    for other_ids, batch in ((tokens(seed=1), 4), (ids, 2)):
        ran.clear()
        m = copy.deepcopy(dense)
        prune_and_reconstruct(m, get_adapter(m), PRUNE, other_ids, batch_size=batch, error_feedback=0.5,
                              dense_stream=stream)
        assert ran == [0, 1, 2, 3]


def test_the_pipeline_records_the_stream_only_for_feedback_reconstruction(tmp_path) -> None:
    base = tiny_session(tmp_path, pruning__compensate="reconstruct", pruning__blocks="mlp",
                        evaluation__before=False, evaluation__after=False, data__proxy_samples=0)
    for feedback, kept in ((0.5, True), (0.0, False)):
        memo = pipeline.Memo()
        pipeline.run(base.with_updates({"pruning.error_feedback": feedback}), until="importance", memo=memo,
                     write=False)
        stream = memo.latest("importance").dense_stream
        assert (stream is not None) is kept
        if kept:
            assert stream.mids is None  # MLP only: no attention refit needs the mid-layer state
            assert len(stream.outputs) == 4 and len(stream.outputs[0]) == 4  # 8 windows in batches of 2


def test_stream_size() -> None:
    # smollm2-135m, the quick start's 160 windows of 128 tokens, float32, 30 layers, MLP only
    assert stream_bytes(160, 128, 576, 30, 4, mids=False) == 1_415_577_600
    assert stream_bytes(160, 128, 576, 30, 4, mids=True) == 2 * 1_415_577_600


def test_ranks_on_one_machine_share_the_stream_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    alone = budget_bytes()
    assert 0 < alone <= 2 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4
    assert budget_bytes() == alone // 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")  # srun: 2 tasks on each of 3 nodes
    assert budget_bytes() == alone // 2
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "garbage")
    assert budget_bytes() == alone


def test_only_the_outputs_are_recorded_when_the_mid_layer_states_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import prune_core.dense_stream as ds

    outputs = stream_bytes(160, 128, 576, 30, 4, mids=False)
    for budget, want_with_attention, want_mlp_only in ((2 * outputs, True, False), (outputs, False, False),
                                                       (outputs - 1, None, None)):
        monkeypatch.setattr(ds, "budget_bytes", lambda b=budget: b)
        assert ds.fitting_mids(160, 128, 576, 30, 4, True) is want_with_attention
        assert ds.fitting_mids(160, 128, 576, 30, 4, False) is want_mlp_only


def test_the_surgery_lets_go_of_the_stream(tmp_path) -> None:
    session = tiny_session(tmp_path, pruning__compensate="reconstruct", pruning__error_feedback=0.5,
                           evaluation__before=False, evaluation__after=True, data__proxy_samples=0)
    memo = pipeline.Memo()
    pipeline.run(session, until="importance", memo=memo, write=False)
    assert memo.latest("importance").dense_stream is not None
    pipeline.run(session, until="surgery", memo=memo, write=False)
    assert memo.latest("importance").dense_stream is None  # not held through distillation or by the memo
