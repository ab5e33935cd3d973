"""Checks on a file a command is asked to write, so that a path that cannot be one is bad input (exit 2)."""

from __future__ import annotations

from pathlib import Path

from prune_core.errors import BadInput


def check_new_file(path: Path, *, force: bool = False) -> None:
    """Raise BadInput when `path` cannot become a file: it is a folder, a folder above it is a file, or it
    exists already and `force` is off (the fix then names --force)."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a folder, not a file", f"name a file, e.g. {path / 'session.toml'}")
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise BadInput(f"cannot write {path}: {above} is a file, not a folder",
                               "choose a path inside a folder, or move that file out of the way")
            break
    if path.exists() and not force:
        raise BadInput(f"{path} already exists", "choose another path or pass --force to overwrite it")
