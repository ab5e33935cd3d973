"""Checkpoint / resume of the importance pass: safetensors for the sums, JSON for everything else.

Layout of `checkpoint_dir`:
    manifest.json              {"format", "version", "seq", "tensors": "state-000007.safetensors",
                                "meta": "meta-000007.json", "sha256": {file: sha256 of each}}
    state-000007.safetensors   the accumulation sums (Σg, Σn·g², Σx, Σx² ...)
    meta-000007.json           next batch, identity, losses, per-batch stats, token counts, seconds

A save writes the new tensor and meta files (each atomically: temp file, fsync, rename), then
atomically replaces the small manifest, then deletes the files of the previous checkpoint. A crash
at any point leaves a manifest that points at complete files, so the previous checkpoint stays
usable. `identity` (what identifies the inputs: model and data fingerprints, method, batch size,
...) is stored in the meta file; a checkpoint with a different identity is refused with BadInput.

Each file's sha256 is in the manifest and checked on load: a checkpoint whose tensors or meta were
changed after it was written (flipped bits, an edited `next_batch`) is refused with RunFailed naming
the file and saying `--fresh`; the engine also cross-checks the meta's batch counts.

Checkpoints of other passes may sit beside `checkpoint_dir` (the stage cache keeps one folder per
set of inputs, `state/checkpoints/<stage>-<key>/`: an interrupted pass, then a run with another
`num_samples`). `other_checkpoints()` finds them and `stored_identity()` reads what each was made
for, so the engine says why it starts afresh and removes them once its own pass completes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prune_core.atomic import write_json, write_with
from prune_core.digest import file_sha256, read_manifest
from prune_core.errors import BadInput, RunFailed

FORMAT = "prune-importance-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the keys whose values differ ("key: stored → current")."""
    a, b = (
        _flatten(json.loads(json.dumps(stored, default=str))),
        _flatten(json.loads(json.dumps(current, default=str))),
    )
    return [
        f"{k}: {_short(a.get(k, '<missing>'))} → {_short(b.get(k, '<missing>'))}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<missing>") != b.get(k, "<missing>")
    ]


class CheckpointStore:
    """Reads and writes the checkpoint of one importance pass in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _manifest(self) -> dict[str, Any] | None:
        manifest = read_manifest(self.folder / MANIFEST, lambda why: self._corrupt(f"{MANIFEST} {why}"))
        if manifest is None:
            return None
        if manifest.get("format") != FORMAT:
            raise BadInput(
                f"{self.folder} holds something that is not an importance checkpoint",
                f"point checkpoint_dir at an empty folder, or delete {self.folder}",
            )
        return manifest

    def _corrupt(self, what: str) -> RunFailed:
        return RunFailed(
            f"corrupt importance checkpoint in {self.folder} ({what})",
            f"delete {self.folder} (or run with --fresh) to start the pass over",
        )

    def damaged(self, name: str, what: str) -> RunFailed:
        """A checkpoint file that does not match what was written: refused, never resumed (exit code 1)."""
        return RunFailed(
            f"the importance checkpoint file {self.folder / name} {what}, so it cannot be resumed safely",
            f"run again with --fresh to start the pass over (or delete {self.folder})",
        )

    def exists(self) -> bool:
        return (self.folder / MANIFEST).exists()

    def load(self, device: torch.device | str = "cpu") -> Checkpoint | None:
        """The current checkpoint, or None when the folder holds none."""
        manifest = self._manifest()
        if manifest is None:
            return None
        if manifest.get("version") != VERSION:
            raise self._corrupt(f"checkpoint format version {manifest.get('version')}, expected {VERSION}")
        sums = manifest.get("sha256")
        names = (manifest.get("meta"), manifest.get("tensors"))
        if not isinstance(sums, dict) or not all(isinstance(n, str) and "/" not in n for n in names):
            raise self.damaged(MANIFEST, "lists no checksums (written by another version, or edited)")
        for name in names:
            path = self.folder / name
            if not path.is_file():
                raise self.damaged(name, "is missing")
            if file_sha256(path) != sums.get(name):
                raise self.damaged(name, "is corrupt: it does not match its sha256 in manifest.json")
        try:
            meta = json.loads((self.folder / manifest["meta"]).read_text(encoding="utf-8"))
            tensors = load_file(self.folder / manifest["tensors"], device=str(device))
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged file
            raise self._corrupt(str(exc)) from exc
        if not isinstance(meta, dict):
            raise self.damaged(str(manifest["meta"]), "is not a JSON object")
        return Checkpoint(meta=meta, tensors=tensors, path=self.folder)

    def stored_identity(self) -> dict[str, Any] | None:
        """The identity the checkpoint was made for, read without its tensors (None when unreadable)."""
        try:
            manifest = self._manifest()
            name = manifest.get("meta") if manifest is not None else None
            if not isinstance(name, str) or "/" in name:
                return None
            meta = json.loads((self.folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, BadInput, RunFailed):
            return None
        identity = meta.get("identity") if isinstance(meta, dict) else None
        return identity if isinstance(identity, dict) else None

    def check_identity(self, stored: dict[str, Any], current: dict[str, Any]) -> None:
        diffs = identity_differences(stored, current)
        if diffs:
            raise BadInput(
                f"the checkpoint in {self.folder} was made for different inputs ({'; '.join(diffs)})",
                f"delete {self.folder} (or run with --fresh) to start the pass over, "
                "or restore the settings it was made with to resume it",
            )

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        """Write a new checkpoint and switch the manifest to it; returns the manifest path."""
        old = self._manifest() if self.exists() else None
        seq = int(old.get("seq", 0)) + 1 if old else 1
        names = {"tensors": f"state-{seq:06d}.safetensors", "meta": f"meta-{seq:06d}.json"}
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        write_with(self.folder / names["tensors"], lambda tmp: save_file(cpu, str(tmp)))
        write_json(self.folder / names["meta"], meta)
        sums = {name: file_sha256(self.folder / name) for name in names.values()}
        write_json(self.folder / MANIFEST, {"format": FORMAT, "version": VERSION, "seq": seq, **names,
                                            "sha256": sums})
        self._remove_stale(keep=set(names.values()))
        return self.folder / MANIFEST

    def _remove_stale(self, keep: set[str]) -> None:
        for path in self.folder.glob("*"):
            is_ours = path.name.startswith(("state-", "meta-", ".state-", ".meta-"))
            if is_ours and path.name not in keep:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint (after a successful pass); the folder is removed if left empty."""
        if not self.folder.exists():
            return
        manifest_ok = self.exists()
        self._remove_stale(keep=set())
        if manifest_ok:
            (self.folder / MANIFEST).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: the caller keeps other files there
            self.folder.rmdir()


def other_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints of the same stage made for other inputs, beside `folder`.

    Only in the stage cache's layout, `<results>/state/checkpoints/<stage>-<key>/`: the folders
    `<stage>-*` beside it that hold a checkpoint. A `checkpoint_dir` anywhere else has none.
    """
    folder = Path(folder)
    stage, dash, _ = folder.name.rpartition("-")
    if folder.parent.name != "checkpoints" or not dash or not stage:
        return []
    try:
        siblings = sorted(folder.parent.iterdir())
    except OSError:
        return []
    return [p for p in siblings if p != folder and p.name.rpartition("-")[0] == stage and p.is_dir()
            and not p.is_symlink() and CheckpointStore(p).exists()]
