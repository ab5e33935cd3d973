"""The stage cache: each persisted stage's output lives under `state/<stage>/<key>/`, keyed by a hash
of exactly its inputs, with a `COMPLETE` marker written last (a folder without it is ignored).

The pipeline (`pipeline.py`) is the only caller: it asks `has()`, then `load`s through the stage's own
loader or computes and `save`s through the stage's saver, then `mark_complete()`. An interrupted pass
keeps its checkpoint under `state/checkpoints/<stage>-<key>/`. Re-running a session where only cheap
knobs changed finds the expensive stages under the same keys and reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from prune_core.atomic import write_json

STATE = "state"


def stage_key(inputs: dict[str, Any]) -> str:
    """A short, stable hash of a stage's inputs (canonical JSON, sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_dir(results_dir: Path) -> Path:
    return Path(results_dir) / STATE


class StageCache:
    """Folders under `<results>/state/` addressed by (stage, key)."""

    def __init__(self, state: Path) -> None:
        self.root = Path(state)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return (self.folder(stage, key) / "COMPLETE").is_file()

    def mark_complete(self, stage: str, key: str, inputs: dict[str, Any]) -> None:
        write_json(self.folder(stage, key) / "COMPLETE", {"stage": stage, "key": key, "inputs": inputs})

    def drop(self, stage: str, key: str) -> None:
        shutil.rmtree(self.folder(stage, key), ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir(stage, key), ignore_errors=True)

    def checkpoint_dir(self, stage: str, key: str) -> Path:
        return self.root / "checkpoints" / f"{stage}-{key}"

    def has_checkpoint(self) -> bool:
        """Some interrupted pass of this results folder can be resumed."""
        root = self.root / "checkpoints"
        return root.is_dir() and any(p.is_dir() and any(p.iterdir()) for p in root.iterdir())

    def copy_reusable(self, other: StageCache) -> None:
        """Copy every completed stage folder of `other` here (never checkpoints): a fixed session in a
        new results folder then reuses the original run's importance pass instead of recomputing it."""
        if not other.root.is_dir():
            return
        for stage in other.root.iterdir():
            if not stage.is_dir() or stage.name == "checkpoints":
                continue
            for folder in stage.iterdir():
                if (folder / "COMPLETE").is_file() and not (self.root / stage.name / folder.name).exists():
                    shutil.copytree(folder, self.root / stage.name / folder.name)
