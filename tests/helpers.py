"""Shared test helpers: tiny-model session files and a CLI runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sessions
from sessions import Session


def tiny_session(tmp_path: Path, name: str = "tiny", **updates: Any) -> Session:
    """A fast session on the built-in tiny-llama model and the shakespeare text."""
    base = {
        "session.name": name,
        "session.output_dir": str(tmp_path / "runs"),
        "model.id": "tiny-llama",
        "model.device": "cpu",
        "data.dataset": "shakespeare",
        "data.num_samples": 8,
        "data.seq_len": 32,
        "data.batch_size": 2,
        "evaluation.seq_len": 64,
        "evaluation.max_tokens": 1024,
        "importance.checkpoint_seconds": 0.0,
        "pruning.ratio": 0.3,
    }
    base.update({k.replace("__", "."): v for k, v in updates.items()})
    return Session().with_updates(base)


def write_session(path: Path, session: Session) -> Path:
    sessions.save(session, path)
    return path
