"""Self-generated calibration windows: reproducible, valid token ids, the caller's random state untouched,
and appended to the dataset's windows by the calibration stage (changing every cache key downstream)."""

from __future__ import annotations

import pytest
import torch

from prune_core import pipeline
from prune_core.errors import BadInput, Interrupted
from prune_core.events import Progress
from prune_core.selfgen import generated_windows
from prune_core.tiny import build_tiny
from tests.helpers import tiny_session


def test_windows_are_reproducible_valid_and_leave_the_rng_alone() -> None:
    model, tok = build_tiny("tiny-llama")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    events: list = []
    a = generated_windows(model, tok, 5, 16, seed=7, batch_size=2, on_event=events.append)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generated_windows(model, tok, 5, 16, seed=7, batch_size=2)
    c = generated_windows(model, tok, 5, 16, seed=8, batch_size=2)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < model.get_input_embeddings().num_embeddings
    assert [e.done for e in events if isinstance(e, Progress)] == [2, 4, 5]
    with pytest.raises(Interrupted, match="generating"):
        generated_windows(model, tok, 5, 16, seed=7, should_stop=lambda: True)
    with pytest.raises(BadInput):
        generated_windows(model, tok, 0, 16, seed=7)


def test_the_calibration_stage_appends_generated_windows(tmp_path) -> None:
    base = tiny_session(tmp_path, evaluation__before=False, evaluation__after=False, output__save_model=False)
    memo = pipeline.Memo()
    plain = pipeline.run(base, memo=memo, write=False)
    calib_plain = memo.latest("calibration")
    mixed = pipeline.run(base.with_updates({"data.generated_samples": 6}), memo=memo, write=False)
    calib_mixed = memo.latest("calibration")
    n = base.data.num_samples
    assert calib_mixed.tokens.shape == (n + 6, base.data.seq_len)
    assert torch.equal(calib_mixed.tokens[:n], calib_plain.tokens)
    assert torch.equal(calib_mixed.proxy, calib_plain.proxy)  # the proxy stays held-out dataset text
    assert calib_mixed.fingerprint != calib_plain.fingerprint
    assert mixed.metrics["importance"]["tokens"] == (n + 6) * base.data.seq_len
    assert mixed.metrics["importance"]["cache_key"] != plain.metrics["importance"]["cache_key"]
    assert "importance" not in mixed.metrics["stages_cached"]
