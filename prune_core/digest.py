"""sha256 of a file, read in 1 MiB blocks (wheel pins, checkpoint checksums, zoo manifests), and the one
reader of a checkpoint's manifest.json (importance and recovery checkpoints)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path, damaged: Callable[[str], Exception]) -> dict[str, Any] | None:
    """A checkpoint's manifest (a JSON object), or None when there is none; `damaged(reason)` is raised when
    it cannot be read or is not a JSON object. Its format and checksums are the caller's to check."""
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise damaged(f"is unreadable ({exc})") from exc
    if not isinstance(manifest, dict):
        raise damaged("is not a JSON object")
    return manifest
