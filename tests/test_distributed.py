"""Data-parallel passes: 2 gloo processes on CPU must give what one process gives over the same batches.

The ranks are started with torch.multiprocessing.spawn and the torch.distributed environment a
launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); rank 0 saves what it computed, the
test compares it with a single-process run in this process. Also: an interrupted 2-process pipeline
run resumes to the single-process result, and a resume with another world size is refused; the
reconstruction (`compensate = "reconstruct"`, with and without error feedback) gives the weights of a
single-process run, called directly and as the pipeline's surgery.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from prune_core import distributed
from prune_core.compensation import prune_and_reconstruct
from prune_core.errors import BadInput, Interrupted
from prune_core.events import BatchDone
from prune_core.importance import block_importance, run_importance
from prune_core.importance.registry import METHODS
from tests.helpers import tiny_session

WORLD = 2
SAMPLES, SEQ, BATCH = 7, 16, 2  # 4 batches, the last one smaller: 2 rounds of 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)


def _spawn(fn: Any, *args: Any) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _model() -> Any:
    from prune_core.adapters import get_adapter
    from prune_core.models import resolve_model

    loaded = resolve_model("tiny-llama", dtype="float32", device="cpu")
    model = loaded.model.to(torch.float64)  # float64 sums: a tight tolerance separates order from error
    return model, get_adapter(model)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))


def _passes() -> dict[str, Any]:
    """Every method's scores and sums, and the block losses, over the same batches."""
    model, adapter = _model()
    tokens = _tokens(int(model.config.vocab_size))
    out: dict[str, Any] = {}
    for method in METHODS:
        r = run_importance(model, adapter, tokens, method=method, batch_size=BATCH, checkpoint_seconds=0.0)
        out[method] = {"attention": r.attention, "mlp": r.mlp, "input_sums": r.input_sums,
                       "input_tokens": r.input_tokens, "losses": [b["loss"] for b in r.batch_stats],
                       "stats": r.stats, "batches": r.batches, "tokens": r.tokens}
    blocks = block_importance(model, adapter, tokens, batch_size=BATCH)
    out["block"] = blocks.to_dict()
    return out


def _passes_rank(rank: int, port: int, folder: str) -> None:
    _join(rank, port)
    world = distributed.setup("cpu")
    assert world.size == WORLD and world.rank == rank and world.backend == "gloo"
    try:
        torch.save(_passes(), Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    _spawn(_passes_rank, str(tmp_path))
    single = _passes()
    for rank in range(WORLD):  # every rank ends with the totals
        shared = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        _close(shared, single, f"rank{rank}")
    assert single["taylor"]["batches"] == 4 and single["taylor"]["input_tokens"] == SAMPLES * SEQ
    assert single["block"]["attention"] != [0.0] * len(single["block"]["attention"])


# ---------------------------------------------------------------------------------------------- pipeline
def _session(tmp: Path, name: str) -> Any:
    return tiny_session(tmp, name=name, data__num_samples=8, data__seq_len=16, data__batch_size=2,
                        data__proxy_samples=0, correction__temperature=1.0, correction__samples=4,
                        correction__seq_len=16, evaluation__before=False, evaluation__after=False,
                        output__save_model=False)


def _pipeline_rank(rank: int, port: int, folder: str, stop_after: int) -> None:
    from prune_core import pipeline

    _join(rank, port)
    seen = [0]

    def on_event(event: Any) -> None:
        if isinstance(event, BatchDone):
            seen[0] = max(seen[0], event.batch)

    def should_stop() -> bool:  # asked on rank 0 only: the others stop with it
        return bool(stop_after) and rank == 0 and seen[0] >= stop_after

    session = _session(Path(folder), "shared")
    try:
        pipeline.run(session, on_event=on_event, should_stop=should_stop)
    except Interrupted:
        Path(folder, f"interrupted{rank}").write_text("yes", encoding="utf-8")
    finally:
        # leave together: once (in CI, under load) a rank tearing gloo down while the other still used it
        # aborted ("terminate called without an active exception"); bounded, so a failed rank cannot hang it
        torch.distributed.monitored_barrier(timeout=timedelta(seconds=120))
        distributed.shutdown()


def _metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


def test_interrupted_two_rank_run_resumes_to_the_single_process_result(tmp_path: Path) -> None:
    from prune_core import pipeline

    results = tmp_path / "runs" / "shared"
    _spawn(_pipeline_rank, str(tmp_path), 2)
    assert (tmp_path / "interrupted0").exists() and (tmp_path / "interrupted1").exists()
    assert not (results / "metrics.json").exists()
    assert pipeline.has_checkpoint(results)
    assert not list(tmp_path.glob("runs/*/events.ndjson.*"))

    # another world size is refused, naming both sizes and --fresh; the checkpoint is left alone
    with pytest.raises(BadInput) as refused:
        pipeline.run(_session(tmp_path, "shared"))
    text = str(refused.value)
    assert "world size 2" in text and "world size 1" in text and "--fresh" in text
    assert pipeline.has_checkpoint(results)

    _spawn(_pipeline_rank, str(tmp_path), 0)
    events = [json.loads(line) for line in (results / "events.ndjson").read_text(encoding="utf-8").splitlines()]
    assert any("resuming from batch 2/4" in e.get("message", "") for e in events)
    done = [e["batch"] for e in events if e.get("kind") == "batch_done"]
    assert done == [3, 4]  # global progress, in order, rank 0 alone reports
    shared = _metrics(results)
    provenance = tomllib.loads((results / "session.toml").read_text(encoding="utf-8"))["provenance"]
    assert provenance["world_size"] == 2 and provenance["distributed_backend"] == "gloo"
    assert provenance["devices"] == ["cpu", "cpu"]

    alone = pipeline.run(_session(tmp_path, "alone"))
    assert shared["mask_sha256"] == alone.metrics["mask_sha256"]
    assert shared["importance"]["batches"] == alone.metrics["importance"]["batches"] == 4


# ---------------------------------------------------------------------------------------------- reconstruction
# a refit attention and MLP, a fully removed MLP and attention (constant outputs), refits after them
RECONSTRUCT = {0: {"attention": [1], "mlp": list(range(0, 128, 3))}, 1: {"mlp": list(range(128))},
               2: {"attention": [0, 1], "mlp": list(range(1, 128, 2))}, 3: {"attention": [0], "mlp": list(range(40))}}
FEEDBACK = (0.0, 0.5)


def _reconstructed() -> dict[float, dict[str, torch.Tensor]]:
    """The pruned model's weights after reconstruction, per error feedback, over the same batches."""
    out: dict[float, dict[str, torch.Tensor]] = {}
    for feedback in FEEDBACK:
        model, adapter = _model()
        tokens = _tokens(int(model.config.vocab_size))
        prune_and_reconstruct(model, adapter, RECONSTRUCT, tokens, ridge=1.0, batch_size=BATCH,
                              gram_dtype=torch.float64, error_feedback=feedback)
        out[feedback] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _reconstruct_rank(rank: int, port: int, folder: str) -> None:
    _join(rank, port)
    distributed.setup("cpu")
    try:
        torch.save(_reconstructed(), Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_rank_reconstruction_matches_one_process(tmp_path: Path) -> None:
    _spawn(_reconstruct_rank, str(tmp_path))
    single = _reconstructed()
    for rank in range(WORLD):  # every rank ends with the weights of one process over all windows
        _close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=False), single, f"rank{rank}")
    plain, fed = single[0.0], single[0.5]
    assert "model.layers.1.mlp.bias" in plain and "model.layers.2.self_attn.bias" in plain  # zero blocks' constants
    assert not torch.allclose(plain["model.layers.3.mlp.down_proj.weight"], fed["model.layers.3.mlp.down_proj.weight"])


def _reconstruct_session(tmp: Path, name: str) -> Any:
    return tiny_session(tmp, name=name, data__num_samples=7, data__seq_len=16, data__batch_size=2,
                        data__proxy_samples=0, pruning__compensate="reconstruct", pruning__error_feedback=0.5,
                        evaluation__before=True, evaluation__after=True, evaluation__max_tokens=256,
                        output__save_model=False)


def _reconstruct_pipeline_rank(rank: int, port: int, folder: str) -> None:
    from prune_core import pipeline
    from prune_core.compensation import ridge

    _join(rank, port)
    reductions = [0]
    gram_all_reduce = ridge.GramSums.all_reduce

    def counted(gram: Any, world: distributed.World) -> None:
        reductions[0] += int(world.active)
        gram_all_reduce(gram, world)

    ridge.GramSums.all_reduce = counted  # type: ignore[method-assign]
    try:
        pipeline.run(_reconstruct_session(Path(folder), "shared"))
        Path(folder, f"reductions{rank}").write_text(str(reductions[0]), encoding="utf-8")
    finally:
        ridge.GramSums.all_reduce = gram_all_reduce  # type: ignore[method-assign]
        distributed.shutdown()


def _one_batch_session(tmp: Path, name: str) -> Any:
    # one batch for two ranks (rank 1 reads none) and the first layer kept, so that a rank with a recorded
    # dense stream would skip layer 0 where one without runs it: they must still take the same path
    return _reconstruct_session(tmp, name).with_updates({"data.num_samples": 2, "pruning.protect_layers": [0]})


def _one_batch_rank(rank: int, port: int, folder: str) -> None:
    from prune_core import dense_stream, pipeline

    _join(rank, port)
    if rank == 1:  # as on a node with less memory: this rank records no dense stream
        dense_stream.budget_bytes = lambda: 0  # type: ignore[assignment]
    try:
        pipeline.run(_one_batch_session(Path(folder), "shared"))
    finally:
        distributed.shutdown()


def test_a_rank_without_batches_reconstructs_with_the_others(tmp_path: Path) -> None:
    from prune_core import pipeline

    _spawn(_one_batch_rank, str(tmp_path))
    shared = _metrics(tmp_path / "runs" / "shared")
    alone = pipeline.run(_one_batch_session(tmp_path, "alone")).metrics
    assert shared["mask_sha256"] == alone["mask_sha256"]
    assert shared["perplexity"]["after"]["ppl"] == pytest.approx(alone["perplexity"]["after"]["ppl"], rel=1e-5)


def test_two_rank_pipeline_reconstructs_together(tmp_path: Path) -> None:
    """The surgery is a collective stage when it reconstructs: every rank refits (after rank 0 ran the
    diagnosis and the evaluation alone), and the pruned model is the single-process one."""
    from prune_core import pipeline

    _spawn(_reconstruct_pipeline_rank, str(tmp_path))
    counts = [int(Path(tmp_path, f"reductions{rank}").read_text(encoding="utf-8")) for rank in range(WORLD)]
    assert counts[0] == counts[1] > 0
    shared = _metrics(tmp_path / "runs" / "shared")
    alone = pipeline.run(_reconstruct_session(tmp_path, "alone")).metrics
    assert shared["mask_sha256"] == alone["mask_sha256"]
    assert shared["compensation"] == alone["compensation"]
    for which in ("before", "after"):
        assert shared["perplexity"][which]["ppl"] == pytest.approx(alone["perplexity"][which]["ppl"],
                                                                  rel=1e-5), which
