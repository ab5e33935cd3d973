"""The stage cache: each stage's output lives under `state/` keyed by a hash of exactly its inputs.

Re-running a session where only cheap knobs changed ([pruning], [normalization], T/tau,
[diagnosis]) finds the importance pass (and block losses) under the same key and reuses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prune_core.atomic import write_json


def stage_key(inputs: dict[str, Any]) -> str:
    """A short, stable hash of a stage's inputs (canonical JSON, sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageCache:
    """Folders and JSON files under `<results>/state/` addressed by (stage, key)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def json_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def has_folder(self, stage: str, key: str) -> bool:
        return (self.folder(stage, key) / "COMPLETE").is_file()

    def mark_complete(self, stage: str, key: str, inputs: dict[str, Any]) -> None:
        write_json(self.folder(stage, key) / "COMPLETE", {"stage": stage, "key": key, "inputs": inputs})

    def read_json(self, stage: str, key: str) -> dict[str, Any] | None:
        path = self.json_path(stage, key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def write_json(self, stage: str, key: str, data: dict[str, Any]) -> None:
        write_json(self.json_path(stage, key), data)

    def checkpoint_dir(self, stage: str, key: str) -> Path:
        return self.root / "checkpoints" / f"{stage}-{key}"
