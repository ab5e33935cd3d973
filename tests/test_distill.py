"""Distillation after surgery: the pruned model moves toward the dense model's predictions, only the
parameters it names change, and the pipeline's distill stage trains against the *dense* model in a run
that owns the model as in a what-if."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from prune_core import pipeline
from prune_core.adapters import get_adapter
from prune_core.compensation.distill import DistillSettings, distill, kl_loss, window_order
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import Checkpointed, Notice, Progress, StageDone
from prune_core.recovery_checkpoint import CheckpointStore
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session

PRUNE = {0: {"mlp": list(range(0, 128, 2))}, 1: {"attention": [1], "mlp": list(range(64))}}


def _windows(n: int = 8, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def _pair() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    dense, _ = build_tiny("tiny-llama")
    adapter = get_adapter(dense)
    student = copy.deepcopy(dense)
    apply_pruning(student, adapter, PRUNE)
    return dense, student, adapter


def _kl(student: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kl_loss(student(input_ids=ids).logits[:, :-1], dense(input_ids=ids).logits[:, :-1]))


def test_kl_loss_is_the_mean_per_position_kl_divergence() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    brute = sum(float((pt[b, i] * (pt[b, i].log() - ps[b, i].log())).sum()) for b in range(2) for i in range(3)) / 6
    assert float(kl_loss(s, t)) == pytest.approx(brute, rel=1e-5)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_window_order_is_a_seeded_permutation_per_pass() -> None:
    order = window_order(5, steps=4, batch_size=3, seed=7)  # 12 slots: two full passes and a part
    assert len(order) == 12
    assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order[5:10].tolist()) == list(range(5))
    assert torch.equal(order, window_order(5, steps=4, batch_size=3, seed=7))
    assert not torch.equal(order, window_order(5, steps=4, batch_size=3, seed=8))


def test_distillation_brings_the_pruned_model_toward_the_dense_one() -> None:
    dense, student, adapter = _pair()
    ids = _windows()
    embed = student.get_input_embeddings().weight.clone()
    before = _kl(student, dense, ids)
    events: list[object] = []
    report = distill(student, dense, adapter, ids, DistillSettings(steps=12, lr=3e-3, batch_size=4), seed=0,
                     on_event=events.append)
    after = _kl(student, dense, ids)
    assert after < 0.7 * before, (before, after)
    assert len(report.losses) == 12 and all(math.isfinite(x) for x in report.losses)
    assert [e.done for e in events if isinstance(e, Progress)] == list(range(1, 13))
    # the embeddings (tied to the output head) are not trained; nothing is left requiring gradients
    assert torch.equal(student.get_input_embeddings().weight, embed)
    assert not any(p.requires_grad for p in student.parameters())
    assert student.training is False


def test_mlp_only_leaves_attention_and_norms_alone() -> None:
    dense, student, adapter = _pair()
    fixed = {n: p.clone() for n, p in student.named_parameters() if "mlp" not in n}
    mlp = {n: p.clone() for n, p in student.named_parameters() if "mlp" in n}
    distill(student, dense, adapter, _windows(), DistillSettings(steps=3, lr=1e-3, batch_size=2, train="mlp"), seed=0)
    params = dict(student.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in fixed.items())
    assert all(not torch.equal(params[n], p) for n, p in mlp.items())


def test_a_float16_student_trains_in_float32_and_comes_back_in_float16() -> None:
    dense, student, adapter = _pair()
    student.half()
    distill(student, dense, adapter, _windows(), DistillSettings(steps=2, lr=1e-3, batch_size=2), seed=0)
    assert {p.dtype for p in student.parameters()} == {torch.float16}


def test_cross_entropy_weight_adds_the_next_token_loss() -> None:
    dense, student, adapter = _pair()
    ids = _windows()
    a = distill(copy.deepcopy(student), dense, adapter, ids, DistillSettings(steps=1, lr=1e-9, batch_size=8), seed=0)
    b = distill(copy.deepcopy(student), dense, adapter, ids,
                DistillSettings(steps=1, lr=1e-9, batch_size=8, ce_weight=0.5), seed=0)
    with torch.no_grad():
        logits = student(input_ids=ids).logits[:, :-1]
        ce = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    assert b.losses[0] == pytest.approx(a.losses[0] + 0.5 * ce, rel=1e-4)


def test_cross_entropy_on_the_dataset_windows_only() -> None:
    # windows 0-2 are "the dataset's", 3-7 generated: the CE term is the mean over the step's dataset windows
    dense, student, adapter = _pair()
    ids = _windows()
    order = window_order(8, 2, 4, 0)
    kl_only = distill(copy.deepcopy(student), dense, adapter, ids, DistillSettings(steps=2, lr=1e-9, batch_size=4),
                      seed=0)
    some = distill(copy.deepcopy(student), dense, adapter, ids,
                   DistillSettings(steps=2, lr=1e-9, batch_size=4, ce_weight=0.5, ce_rows=3), seed=0)
    with torch.no_grad():
        logits = student(input_ids=ids).logits[:, :-1]
    for step in range(2):
        rows = [int(i) for i in order[step * 4:(step + 1) * 4] if int(i) < 3]
        ce = 0.0 if not rows else float(torch.nn.functional.cross_entropy(
            logits[rows].reshape(-1, logits.shape[-1]), ids[rows][:, 1:].reshape(-1)))
        assert some.losses[step] == pytest.approx(kl_only.losses[step] + 0.5 * ce, rel=1e-4)


def test_the_stage_reads_ce_windows(tmp_path: Path) -> None:
    base = tiny_session(tmp_path, data__generated_samples=4, distill__steps=1, distill__ce_weight=1.0,
                        evaluation__before=False, data__proxy_samples=0)
    losses = {}
    for which in ("all", "dataset"):
        r = pipeline.run(base.with_updates({"distill.ce_windows": which}), write=False)
        losses[which] = r.metrics["distill"]["loss_first"]
    assert losses["all"] != losses["dataset"]


def test_a_stop_between_steps_interrupts_and_bad_input_is_refused() -> None:
    dense, student, adapter = _pair()
    calls = iter([False, False, True])
    with pytest.raises(Interrupted, match="after step 2/5"):
        distill(student, dense, adapter, _windows(), DistillSettings(steps=5, lr=1e-3, batch_size=2), seed=0,
                should_stop=lambda: next(calls))
    assert not any(p.requires_grad for p in student.parameters())
    with pytest.raises(BadInput, match="not \\[windows"):
        distill(student, dense, adapter, torch.zeros(8, dtype=torch.long), DistillSettings(1, 1e-3, 2), seed=0)
    with pytest.raises(BadInput, match="train"):
        distill(student, dense, adapter, _windows(), DistillSettings(1, 1e-3, 2, train="heads"), seed=0)


def test_a_non_finite_loss_stops_with_the_fix_and_leaves_the_weights() -> None:
    dense, student, adapter = _pair()
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))
    before = {n: p.clone() for n, p in student.named_parameters()}
    with pytest.raises(RunFailed, match=r"distillation loss at step 1/3 is nan.*\[distill\] lr"):
        distill(student, dense, adapter, _windows(), DistillSettings(3, 1e-3, 2), seed=0)
    assert all(torch.equal(p, before[n]) or torch.isnan(p).all() for n, p in student.named_parameters())


def _distilled(session, memo=None):
    events: list[object] = []
    report = pipeline.run(session, memo=memo, write=False, on_event=events.append)
    done = {e.stage: e for e in events if isinstance(e, StageDone)}
    return report, done


def test_the_distill_stage_runs_after_surgery_against_the_dense_model(tmp_path: Path) -> None:
    base = tiny_session(tmp_path, **{"evaluation.before": False, "output.save_model": False,
                                     "distill.steps": 4, "distill.lr": 3e-3, "distill.batch_size": 2})
    memo = pipeline.Memo()
    plain, done = _distilled(base.with_updates({"distill.steps": 0}), memo)
    assert "distill" not in done
    whatif, done = _distilled(base, memo)
    assert [s for s in done if not done[s].cached] == ["distill", "proxy_final", "eval_after"], \
        "surgery comes from the memo"
    assert whatif.proxy["final"] != plain.proxy["final"], "the final proxy sees the distillation"
    assert whatif.proxy["loss"] == plain.proxy["loss"], "the allocation's (masked) proxy does not"
    assert done["distill"].result["steps"] == 4
    ppl_plain, ppl_whatif = plain.perplexity["after"]["ppl"], whatif.perplexity["after"]["ppl"]
    assert ppl_whatif != ppl_plain
    # the memo's surgery is untouched: the plain run again gives the same perplexity from the memo
    again, _ = _distilled(base.with_updates({"distill.steps": 0}), memo)
    assert again.perplexity["after"]["ppl"] == ppl_plain
    # a run that owns the model (surgery in place otherwise) still distils from the dense model
    owned, done = _distilled(base)
    assert owned.perplexity["after"]["ppl"] == pytest.approx(ppl_whatif, rel=1e-6)
    assert owned.metrics["distill"]["steps"] == 4 and owned.metrics["distill"]["train"] == "layers"
    assert "distill" not in plain.metrics


def _stop_at(n: int):
    """should_stop that answers True from its n-th call on (one call per step)."""
    calls = iter(range(10_000))
    return lambda: next(calls) >= n


def test_a_stopped_distillation_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    dense, student, adapter = _pair()
    ids, settings = _windows(), DistillSettings(steps=6, lr=3e-3, batch_size=2, ce_weight=0.5)
    whole = copy.deepcopy(student)
    full = distill(whole, dense, adapter, ids, settings, seed=3)
    store = CheckpointStore(tmp_path / "ck")
    events: list[object] = []
    with pytest.raises(Interrupted, match=r"after step 4/6.*resumes at step 4"):
        distill(student, dense, adapter, ids, settings, seed=3, store=store, checkpoint_seconds=3600,
                should_stop=_stop_at(4), on_event=events.append)
    assert [e.batch for e in events if isinstance(e, Checkpointed)] == [4] and store.exists()
    resumed = distill(student, dense, adapter, ids, settings, seed=3, store=store, on_event=events.append)
    assert any(isinstance(e, Notice) and "from step 4/6" in e.message for e in events)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    for (name, a), b in zip(student.named_parameters(), whole.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    dense, student, adapter = _pair()
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(Interrupted):
        distill(copy.deepcopy(student), dense, adapter, _windows(), DistillSettings(4, 1e-3, 2), seed=0, store=store,
                checkpoint_seconds=0, should_stop=_stop_at(2))
    with pytest.raises(RunFailed, match=r"other settings.*--fresh"):
        distill(student, dense, adapter, _windows(), DistillSettings(4, 2e-3, 2), seed=0, store=store)


def test_a_run_stopped_in_the_distill_stage_resumes_there(tmp_path: Path) -> None:
    session = tiny_session(tmp_path, **{"evaluation.before": False, "output.save_model": False,
                                        "distill.steps": 5, "distill.lr": 3e-3, "distill.batch_size": 2,
                                        "distill.checkpoint_seconds": 0.0})
    fresh = pipeline.run(session.with_updates({"session.name": "whole"}), write=True)
    events: list[object] = []
    with pytest.raises(Interrupted, match="distillation stopped after step 3/5"):
        pipeline.run(session, write=True, on_event=events.append, should_stop=lambda: any(
            isinstance(e, Progress) and e.stage == "distill" and e.done == 3 for e in events))
    checkpoints = list((tmp_path / "runs").rglob("checkpoints/distill-*/manifest.json"))
    assert len(checkpoints) == 1
    events.clear()
    again = pipeline.run(session, write=True, on_event=events.append)
    assert any(isinstance(e, Notice) and "resuming the distillation from step 3/5" in e.message for e in events)
    assert again.metrics["distill"]["loss_last"] == pytest.approx(fresh.metrics["distill"]["loss_last"], rel=1e-5)
    assert not checkpoints[0].exists()


def test_a_checkpoint_that_would_not_fit_on_the_disk_is_not_written(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import prune_core.diskplan as diskplan

    monkeypatch.setattr(diskplan, "free_bytes", lambda folder: 1000)
    dense, student, adapter = _pair()
    store, events = CheckpointStore(tmp_path / "ck"), []
    with pytest.raises(Interrupted, match="starts over"):
        distill(student, dense, adapter, _windows(), DistillSettings(4, 1e-3, 2), seed=0, store=store,
                checkpoint_seconds=0, should_stop=_stop_at(3), on_event=events.append)
    assert not store.exists() and not any(isinstance(e, Checkpointed) for e in events)
    warned = [e for e in events if isinstance(e, Notice) and "no distillation checkpoint" in e.message]
    assert len(warned) == 1 and "free disk space" in warned[0].message
