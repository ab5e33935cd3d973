"""On the real smollm2-135m (few, short samples): reconstruction beats plain removal on held-out text,
the proxy scores every what-if, and `tune` improves the proxy without a new importance pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from prune_core import pipeline
from prune_core.events import StageDone
from prune_core.tune import tune
from sessions import Session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Session, pipeline.Memo, Path]:
    tmp = tmp_path_factory.mktemp("smol")
    session = Session().with_updates({
        "session.name": "smol", "session.output_dir": str(tmp), "model.id": "smollm2-135m", "model.device": "cpu",
        "data.num_samples": 8, "data.seq_len": 64, "data.batch_size": 4, "data.proxy_samples": 2,
        "pruning.ratio": 0.2, "evaluation.seq_len": 256, "evaluation.max_tokens": 2048,
        "evaluation.before": False, "output.save_model": False, "pruning.compensate": "none",
    })
    return session, pipeline.Memo(), tmp


def test_reconstruct_beats_plain_removal_and_recomputes_surgery_only(smol) -> None:
    session, memo, _ = smol
    plain = pipeline.run(session, memo=memo, write=False)
    events: list = []
    recon = pipeline.run(session.with_updates({"pruning.compensate": "reconstruct"}), memo=memo, write=False,
                         on_event=events.append)
    computed = [e.stage for e in events if isinstance(e, StageDone) and not e.cached]
    assert computed == ["surgery", "proxy_final", "eval_after"]
    assert recon.proxy["loss"] == plain.proxy["loss"], "the allocation's (masked) proxy does not see compensation"
    assert recon.proxy["final"] < plain.proxy["final"], "the saved model's proxy does"
    assert recon.mask_sha256 == plain.mask_sha256
    assert recon.perplexity["after"]["ppl"] < plain.perplexity["after"]["ppl"]
    assert recon.metrics["compensation"]["mode"] == "reconstruct"
    assert plain.proxy["loss"] > plain.proxy["dense"]


def test_tune_improves_the_proxy_from_the_memo(smol) -> None:
    session, memo, _ = smol
    result = tune(session, budget_s=20, memo=memo, corrections=False)
    assert result.best_proxy <= result.base_proxy
    assert len(result.trials) >= 3


def test_generated_windows_and_error_feedback_help_on_another_domain(smol) -> None:
    """The recommended additions (BENCHMARKS.md "Quality"): windows the model writes itself plus error feedback
    in the reconstruction lower perplexity on text of a domain never calibrated on."""
    session, memo, _ = smol
    base = session.with_updates({"pruning.compensate": "reconstruct", "evaluation.dataset": "wikipedia",
                                 "pruning.ratio": 0.4})
    plain = pipeline.run(base, memo=memo, write=False)
    better = pipeline.run(base.with_updates({"data.generated_samples": 16, "pruning.error_feedback": 0.5}),
                          memo=memo, write=False)
    assert better.metrics["compensation"]["error_feedback"] == 0.5
    assert better.perplexity["after"]["ppl"] < 0.95 * plain.perplexity["after"]["ppl"]


def test_distillation_after_surgery_helps_on_both_domains(smol) -> None:
    """The recommended distill stage (BENCHMARKS.md "Quality"): a few steps toward the dense model's
    predictions lower held-out perplexity in-domain and on another domain; only distill and eval rerun."""
    session, memo, _ = smol
    base = session.with_updates({"pruning.compensate": "reconstruct", "pruning.ratio": 0.4,
                                 "data.generated_samples": 16, "pruning.error_feedback": 0.5})
    distilled = base.with_updates({"distill.steps": 8, "distill.lr": 1e-4, "distill.ce_weight": 1.0})
    for dataset in ("wikipedia", "shakespeare"):
        plain = pipeline.run(base.with_updates({"evaluation.dataset": dataset}), memo=memo, write=False)
        events: list = []
        better = pipeline.run(distilled.with_updates({"evaluation.dataset": dataset}), memo=memo, write=False,
                              on_event=events.append)
        computed = [e.stage for e in events if isinstance(e, StageDone) and not e.cached]
        assert computed[-1] == "eval_after" and "importance" not in computed and "surgery" not in computed
        assert better.metrics["distill"]["steps"] == 8
        assert better.perplexity["after"]["ppl"] < 0.97 * plain.perplexity["after"]["ppl"], dataset
