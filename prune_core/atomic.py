"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash never leaves a half-written file that looks complete: readers see the old file or the new one.
Every file written here gets the usual permissions (0666 less the umask: 0644 with the common umask
022), also when the writer replaced the temporary file with its own (safetensors writes 0600 files);
`usual_permissions()` does the same for files and folders written by other libraries.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


def usual_permissions(path: str | os.PathLike[str], *, recursive: bool = False) -> None:
    """Give a file FILE_MODE and a folder FOLDER_MODE (`recursive`: everything below it too)."""
    root = Path(path)
    paths = [root, *root.rglob("*")] if recursive and root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, FOLDER_MODE if p.is_dir() else FILE_MODE)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path` (with FILE_MODE)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # again: the writer may have replaced the file (safetensors: 0600)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=default, allow_nan=True) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Let `writer` write the file at a temporary path (e.g. safetensors.save_file), then rename it."""
    with atomic_path(path) as tmp:
        writer(tmp)


def flush_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file below `folder` (before a marker file declares the folder complete)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def swap_in(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Replace the folder `target` by the complete folder `tmp` (renames only): an existing target is
    moved aside first and put back if the rename fails, and removed once the new one is in place."""
    tmp, target = Path(tmp), Path(target)
    old: Path | None = None
    try:
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
