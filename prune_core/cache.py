"""The stage cache: each persisted stage's output lives under `state/<stage>/<key>/`, keyed by a hash
of exactly its inputs, with a `COMPLETE` marker written last (a folder without it is ignored).

The pipeline (`pipeline.py`) is the only caller: it asks `has()`, then `load`s through the stage's own
loader or computes and `save`s through the stage's saver, then `mark_complete()`. An interrupted pass
keeps its checkpoint under `state/checkpoints/<stage>-<key>/`. Re-running a session where only cheap
knobs changed finds the expensive stages under the same keys and reuses them.

`COMPLETE` lists the sha256 of every file of the stage folder; `has()` checks them (once per
process and COMPLETE file) and refuses a folder whose files changed after they were written
(RunFailed naming the file and saying `--fresh`). A COMPLETE without checksums (an older version)
counts as absent: the stage is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from prune_core.atomic import write_json
from prune_core.digest import file_sha256
from prune_core.errors import RunFailed

STATE = "state"


def stage_key(inputs: dict[str, Any]) -> str:
    """A short, stable hash of a stage's inputs (canonical JSON, sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_dir(results_dir: Path) -> Path:
    return Path(results_dir) / STATE


_VERIFIED: dict[tuple[str, int, int], bool] = {}


def _verify(marker: Path) -> bool:
    """Whether the stage folder of `marker` is complete and intact; RunFailed when a file changed."""
    folder = marker.parent
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    files = doc.get("sha256") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        return False  # written by an older version (or damaged): computed again
    for rel, digest in files.items():
        path = folder / str(rel)
        if ".." in Path(str(rel)).parts or not path.is_file() or file_sha256(path) != digest:
            raise RunFailed(f"the cached stage file {path} is missing or corrupt (it does not match its sha256 "
                            f"in {marker})", f"run again with --fresh to recompute it (or delete {folder})")
    return True


class StageCache:
    """Folders under `<results>/state/` addressed by (stage, key)."""

    def __init__(self, state: Path) -> None:
        self.root = Path(state)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        """A completed stage folder whose files match their checksums (RunFailed when they do not)."""
        marker = self.folder(stage, key) / "COMPLETE"
        if not marker.is_file():
            return False
        try:
            stamp = (str(marker.resolve()), marker.stat().st_mtime_ns, marker.stat().st_size)
        except OSError:
            return False
        if stamp not in _VERIFIED:
            _VERIFIED[stamp] = _verify(marker)
        return _VERIFIED[stamp]

    def mark_complete(self, stage: str, key: str, inputs: dict[str, Any]) -> None:
        folder = self.folder(stage, key)
        files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != "COMPLETE" and not p.name.startswith(".")}
        write_json(folder / "COMPLETE", {"stage": stage, "key": key, "inputs": inputs, "sha256": files})

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
